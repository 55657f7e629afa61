"""A process killed in the middle of a change of what serves (a round's promotion, `embedtune rollback`)
leaves, after the next start's `reconcile()`, one consistent state: `models/current` names the model the
database says serves, a rollback whose link clients may already have loaded stands, and a round whose
model serves is recorded as promoted with its training pairs marked as used.

The kill is real: the change runs in a forked child that `os._exit`s right after one of its steps (the
link moved, or the database committed the serving change); the parent then starts over with a fresh
connection, as the daemon would."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

import state.registry as registry_module
from state.db import Database
from state.layout import StateLayout
from state.registry import ModelRegistry
from state.round_records import RoundOutcome, RoundState, RoundStore

KILLED = 137
CRASH_POINTS = ["after_the_link_moved", "after_the_serving_commit"]


def _model(folder: Path, marker: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "modules.json").write_text("[]")
    (folder / "weights.bin").write_text(marker)
    return folder


def _registry(layout: StateLayout) -> ModelRegistry:
    return ModelRegistry(Database(layout.database).conn, layout)


def _served(layout: StateLayout) -> str:
    return (layout.current / "weights.bin").read_text()


def _arm(crash_point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the child: die right after the named step of a serving change."""
    if crash_point == "after_the_link_moved":
        for name in ("_swap_symlink", "_unlink_current"):
            original = getattr(ModelRegistry, name)

            def dying(self, *args, _original=original, **kwargs):
                _original(self, *args, **kwargs)
                os._exit(KILLED)

            monkeypatch.setattr(ModelRegistry, name, dying)
        return
    real_transaction = registry_module.transaction

    @contextmanager
    def dying_after_serving_commit(conn, **kwargs) -> Iterator:
        """Commit as usual; die once a commit has written the promotion history (the serving change)."""
        before = conn.execute("SELECT COUNT(*) FROM promotions").fetchone()[0]
        with real_transaction(conn, **kwargs) as inner:
            yield inner
        if conn.execute("SELECT COUNT(*) FROM promotions").fetchone()[0] != before:
            os._exit(KILLED)

    monkeypatch.setattr(registry_module, "transaction", dying_after_serving_commit)


def _killed_during(change: Callable[[], object], crash_point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `change` in a forked child armed to die at `crash_point`; it must have died there."""

    def child() -> None:
        _arm(crash_point, monkeypatch)
        change()
        os._exit(0)  # the crash point was never reached

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join()
    assert process.exitcode == KILLED


def _restart(layout: StateLayout, base: Path) -> ModelRegistry:
    """What a daemon start does about serving: reconcile the registry, then abort rounds left running."""
    registry = _registry(layout)
    registry.reconcile(base)
    rounds = RoundStore(registry.conn)
    for row in rounds.running_rounds():
        rounds.abort(row["id"], "daemon restarted while the round was running")
    return registry


def _assert_link_follows_the_database(registry: ModelRegistry, base: Path) -> None:
    current = registry.current()
    expected = current.path if current is not None else base
    assert registry.layout.current.resolve() == expected.resolve()
    assert registry.reconcile(base) == "consistent"


def test_a_rollback_to_the_base_killed_at_any_step_stands_after_reconcile(tmp_path, monkeypatch):
    """Once the link may name the base (a client may have loaded it), the rollback is recorded: the next
    start must not bring the rolled-back version back."""
    for crash_point in CRASH_POINTS:
        _rollback_to_the_base_killed(tmp_path / crash_point, crash_point, monkeypatch)


def _rollback_to_the_base_killed(tmp_path: Path, crash_point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = StateLayout(tmp_path / "state").ensure()
    base = _model(tmp_path / "base", "BASE")
    registry = _registry(layout)
    registry.reconcile(base)
    promoted = registry.register(_model(tmp_path / "a", "A"))
    registry.promote(promoted.id)
    registry.conn.close()

    _killed_during(lambda: _registry(layout).rollback(base), crash_point, monkeypatch)

    registry = _restart(layout, base)
    assert registry.current() is None and _served(layout) == "BASE"
    assert [row["action"] for row in registry.history()] == ["promote", "rollback"]
    _assert_link_follows_the_database(registry, base)


def test_a_rollback_to_a_version_killed_at_any_step_stands_after_reconcile(tmp_path, monkeypatch):
    for crash_point in CRASH_POINTS:
        _rollback_to_a_version_killed(tmp_path / crash_point, crash_point, monkeypatch)


def _rollback_to_a_version_killed(tmp_path: Path, crash_point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = StateLayout(tmp_path / "state").ensure()
    base = _model(tmp_path / "base", "BASE")
    registry = _registry(layout)
    first = registry.register(_model(tmp_path / "a", "A"))
    registry.promote(first.id)
    registry.promote(registry.register(_model(tmp_path / "b", "B")).id)
    registry.conn.close()

    _killed_during(lambda: _registry(layout).rollback(base), crash_point, monkeypatch)

    registry = _restart(layout, base)
    assert registry.current().id == first.id and _served(layout) == "A"
    assert registry.serving_stack() == [first.id]  # a later rollback goes to the base, not back to B
    _assert_link_follows_the_database(registry, base)


def _round_with_samples(registry: ModelRegistry) -> tuple[RoundStore, int, list[int]]:
    conn = registry.conn
    conn.execute(
        "INSERT INTO documents (id, path, status, split, first_seen, updated) "
        "VALUES (1, '/inbox/a.txt', 'ingested', 'train', 'now', 'now')"
    )
    conn.execute(
        "INSERT INTO chunks (id, document_id, version, ordinal, text, sha256, created) "
        "VALUES (1, 1, 1, 0, 'rivers flow through the old city', 's', 'now')"
    )
    conn.executemany(
        "INSERT INTO samples (chunk_id, query, kind, split, kept, created) VALUES (1, ?, 'question', 'train', 1, 'now')",
        [("where do rivers flow",), ("an old city river",)],
    )
    sample_ids = [row[0] for row in conn.execute("SELECT id FROM samples ORDER BY id")]
    records = RoundStore(conn)
    return records, records.create("schedule", "base"), sample_ids


def test_a_round_killed_while_promoting_is_promoted_with_its_pairs_used(tmp_path, monkeypatch):
    """The round's decision and the marking of its training pairs commit with the serving row: a round
    whose model serves after the restart is 'promoted' (not 'aborted'), and its pairs are not trained on
    again as if new."""
    for crash_point in CRASH_POINTS:
        _round_killed_while_promoting(tmp_path / crash_point, crash_point, monkeypatch)


def _round_killed_while_promoting(tmp_path: Path, crash_point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.round_process import promote

    layout = StateLayout(tmp_path / "state").ensure()
    base = _model(tmp_path / "base", "BASE")
    registry = _registry(layout)
    registry.reconcile(base)
    records, round_id, sample_ids = _round_with_samples(registry)
    candidate = _model(tmp_path / "candidate", "C")
    registry.conn.close()
    verdict = SimpleNamespace(
        decision=SimpleNamespace(variant="candidate"),
        table={"candidate": {"heldout": {"ndcg@10": 0.9}}},
        reason="promoted candidate: ndcg@10 gain heldout +0.1",
    )

    def promote_in_a_fresh_process() -> None:
        registry = _registry(layout)
        promote(registry, RoundStore(registry.conn), round_id, candidate, verdict, None, sample_ids)

    _killed_during(promote_in_a_fresh_process, crash_point, monkeypatch)

    registry = _restart(layout, base)
    row = RoundStore(registry.conn).get(round_id)
    served = registry.current()
    assert served is not None and _served(layout) == "C"  # the kill came after the promotion was decided
    assert row["state"] == RoundState.FINISHED and row["decision"] == RoundOutcome.PROMOTED
    assert row["model_id"] == served.id
    marked = [r[0] for r in registry.conn.execute("SELECT round_id FROM samples ORDER BY id")]
    assert marked == [round_id, round_id]
    _assert_link_follows_the_database(registry, base)
