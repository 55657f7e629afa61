from __future__ import annotations

import os

import pytest

from state.db import Database
from state.layout import StateLayout
from state.registry import ModelRegistry, RegistryError


def _model(folder, marker: str):
    folder.mkdir(parents=True)
    (folder / "modules.json").write_text("[]")
    (folder / "weights.bin").write_text(marker)
    return folder


@pytest.fixture
def registry(tmp_path):
    layout = StateLayout(tmp_path / "state").ensure()
    return ModelRegistry(Database(layout.database).conn, layout)


def _served(registry) -> str:
    return (registry.layout.current / "weights.bin").read_text()


def test_promote_swaps_the_symlink_and_records_history(registry, tmp_path):
    first = registry.register(_model(tmp_path / "a", "A"), metrics={"ndcg@10": 0.5})
    assert first.path.name == str(first.id) and (first.path / "weights.bin").read_text() == "A"
    assert registry.current() is None
    registry.promote(first.id)
    assert _served(registry) == "A" and registry.current().id == first.id
    second = registry.register(_model(tmp_path / "b", "B"), parent_id=first.id)
    registry.promote(second.id)
    assert _served(registry) == "B" and registry.current().id == second.id
    assert [row["action"] for row in registry.history()] == ["promote", "promote"]
    assert os.path.islink(registry.layout.current)
    assert not os.path.isabs(os.readlink(registry.layout.current))  # relocatable state dir


def test_rollback_returns_to_previous_and_then_to_base(registry, tmp_path):
    a = registry.register(_model(tmp_path / "a", "A"))
    b = registry.register(_model(tmp_path / "b", "B"))
    registry.promote(a.id)
    registry.promote(b.id)
    assert registry.rollback().id == a.id
    assert _served(registry) == "A"
    assert registry.rollback() is None
    assert not registry.layout.current.exists()
    with pytest.raises(RegistryError):
        registry.rollback()


def test_models_current_always_names_the_model_in_service(registry, tmp_path):
    """One path for clients: the base model before any promotion and after a rollback to it, a version
    otherwise; a base folder that moved is followed at the next start (reconcile)."""
    base = _model(tmp_path / "base", "BASE")
    assert registry.reconcile(base) == f"models/current names the base model {base}"
    assert _served(registry) == "BASE" and registry.current() is None
    assert registry.reconcile(base) == "consistent"
    a = registry.register(_model(tmp_path / "a", "A"))
    registry.promote(a.id)
    assert _served(registry) == "A" and registry.reconcile(base) == "consistent"
    assert registry.rollback(base) is None
    assert _served(registry) == "BASE" and registry.current() is None
    other_base = _model(tmp_path / "other-base", "OTHER")  # model.base changed in the config
    registry.reconcile(other_base)
    assert _served(registry) == "OTHER" and registry.current() is None
    registry.reconcile(tmp_path / "gone")  # a base that cannot be resolved: no link rather than a wrong one
    assert not registry.layout.current.exists()


def test_a_base_folder_named_like_a_version_is_not_taken_for_one(registry, tmp_path):
    registry.register(_model(tmp_path / "a", "A"))  # version 1 exists, unpromoted
    base = _model(tmp_path / "models" / "1", "BASE")  # a user's base folder happens to be called 1
    registry.reconcile(base)
    assert registry.current() is None and _served(registry) == "BASE"
    assert registry.reconcile(base) == "consistent"


def test_register_rejects_non_model_folders(registry, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError):
        registry.register(tmp_path / "empty")
    assert registry.conn.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 0


def test_reconcile_moves_the_symlink_to_what_the_database_says_serves(registry, tmp_path):
    """The database commits a change of what serves before the link moves: the link is put back in line
    with it, never the other way (a link naming an unrecorded version is not adopted)."""
    a = registry.register(_model(tmp_path / "a", "A"))
    b = registry.register(_model(tmp_path / "b", "B"))
    registry.promote(a.id)
    registry._swap_symlink(b.path)  # a link the database does not back (e.g. left by an older release)
    note = registry.reconcile()
    assert "symlink restored to model" in note and registry.current().id == a.id and _served(registry) == "A"
    assert [row["action"] for row in registry.history()] == ["promote"]
    assert registry.reconcile() == "consistent"


def test_reconcile_restores_a_missing_symlink_and_cleans_staging(registry, tmp_path):
    a = registry.register(_model(tmp_path / "a", "A"))
    registry.promote(a.id)
    registry.layout.current.unlink()
    (registry.layout.versions / "99.tmp").mkdir()
    registry.reconcile()
    assert _served(registry) == "A"
    assert not (registry.layout.versions / "99.tmp").exists()
    assert registry.reconcile() == "consistent"


def test_a_round_judged_against_a_model_that_was_rolled_back_does_not_promote(registry, tmp_path):
    """A round compares its candidate with the model in service when it started; a rollback during the
    round changes that model, and promoting anyway would silently undo the rollback."""
    from types import SimpleNamespace

    from daemon.round_process import promote
    from state.registry import ServingChanged
    from state.round_records import RoundOutcome, RoundStore

    a = registry.register(_model(tmp_path / "a", "A"))
    registry.promote(a.id)
    judged_against = registry.current()  # what the round saw when it started
    registry.rollback()  # the user, meanwhile
    candidate = _model(tmp_path / "candidate", "C")
    with pytest.raises(ServingChanged, match="judged against v1, but the base model serves now"):
        registry.promote(registry.register(candidate).id, replacing=judged_against.id)
    assert not registry.layout.current.exists()  # still the base model, as the rollback left it

    records = RoundStore(registry.conn)
    round_id = records.create("schedule", "base")
    verdict = SimpleNamespace(
        decision=SimpleNamespace(variant="candidate"),
        table={"candidate": {"heldout": {"ndcg@10": 0.9}}},
        reason="promoted candidate: ndcg@10 gain heldout +0.1",
    )
    versions_before = {folder.name for folder in registry.layout.versions.iterdir()}
    outcome = promote(registry, records, round_id, candidate, verdict, judged_against, [])
    row = records.get(round_id)
    assert outcome == RoundOutcome.REJECTED and row["cause"] == "serving_changed"
    assert "the model in service changed during the round" in row["reason"]
    kept = {folder.name for folder in registry.layout.versions.iterdir()}
    rows = {str(r[0]) for r in registry.conn.execute("SELECT id FROM models")}
    assert kept == rows == versions_before  # the refused version is not left behind, folder or row
    assert not registry.layout.current.exists()
