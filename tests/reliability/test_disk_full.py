"""Disk-full faults: the state directory on a small tmpfs. A round that cannot write its model is aborted
cleanly, the model in service stays, and the database is never corrupt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from daemon.round_scheduler import train_now
from daemon.settings import load_settings
from tests.conftest import RunningDaemon, wait_for
from tests.reliability.harness import query, scalar, write_config
from tests.test_rounds import _corpus


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48M", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs here: {result.stderr.decode().strip()}"
        if os.environ.get("EMBEDTUNE_REQUIRE_TMPFS") == "1":  # CI (.ci/run): runs as root, must not skip
            pytest.fail(reason + " (EMBEDTUNE_REQUIRE_TMPFS=1)")
        pytest.skip(reason)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder, leave_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    with open(folder / "ballast", "wb") as handle:
        block = b"\0" * (1 << 20)
        remaining = free - leave_bytes
        while remaining > 0:
            handle.write(block[: min(len(block), remaining)])
            remaining -= len(block)
        handle.flush()
        os.fsync(handle.fileno())


def test_round_that_cannot_save_is_aborted_and_service_stays(tmp_path, tiny_embedder, small_disk):
    config = write_config(
        tmp_path / "c.toml",
        tmp_path,
        tiny_embedder,
        extra={
            "paths": {"state_dir": str(small_disk / "state")},
            "training": {"min_new_samples": 10**6},
            "synthesis": {"heldout_fraction": 0.3},
        },
    )
    settings = load_settings(config, env=False)
    state = settings.paths.state_dir
    _corpus(settings.paths.inbox, documents=8)
    running = RunningDaemon(settings)
    wait_for(lambda: running.scalar("SELECT COUNT(*) FROM samples WHERE kept IS NOT NULL") >= 8, timeout=60)
    wait_for(running.idle, timeout=60)
    running.stop()

    # A model in service to protect, promoted the way a round promotes (whether a first round would pass
    # the gate is not what this test is about).
    from state.db import Database
    from state.layout import StateLayout
    from state.registry import ModelRegistry

    registry = ModelRegistry(Database(state / "embedtune.db").conn, StateLayout(state))
    registry.promote(registry.register(tiny_embedder).id, note="test")
    served = (state / "models" / "current").resolve()

    _fill(small_disk, leave_bytes=96 * 1024)
    outcome = train_now(settings, foreground=True)
    assert outcome == 1
    row = query(state, "SELECT state, error FROM rounds ORDER BY id DESC")[0]
    assert row["state"] == "aborted", dict(row)
    assert (state / "models" / "current").resolve() == served
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(state / "models" / "current"), device="cpu").encode(["ok"]).shape[0] == 1
    assert scalar(state, "PRAGMA integrity_check") == "ok"
    assert not any(p.name.endswith(".tmp") for p in (state / "models" / "versions").iterdir())

    (small_disk / "ballast").unlink()
    assert train_now(settings, foreground=True) == 0
    assert scalar(state, "SELECT state FROM rounds ORDER BY id DESC") == "finished"
    assert scalar(state, "PRAGMA integrity_check") == "ok"
    print(
        "DISK FULL",
        json.dumps(
            {
                "aborted_error": row["error"][:160],
                "rounds": [tuple(r) for r in query(state, "SELECT id, state, decision FROM rounds")],
            }
        ),
    )


def test_index_fill_on_a_full_disk_leaves_the_alias_and_resumes(make_settings, start_daemon, small_disk):
    """Milvus Lite on a full tmpfs: the sync fails with a clear, retryable error, the alias stays on the
    complete collection, and once space is back the same sync finishes the fill."""
    from pathlib import Path

    from daemon.indexing import IndexService
    from state.db import Database
    from state.registry import ModelRegistry
    from state.vector_store import IndexUnavailable
    from tests.test_index import _alias_view, _ingested

    settings, layout = _ingested(make_settings, start_daemon, uri=str(small_disk / "milvus.db"), batch_size=2)
    conn = Database(layout.database).conn
    service = IndexService(settings, layout)
    first = service.sync(conn)
    registry = ModelRegistry(conn, layout)
    registry.promote(registry.register(Path(settings.model.base)).id)
    _fill(small_disk, leave_bytes=0)
    with pytest.raises(IndexUnavailable):
        service.sync(conn)
    (small_disk / "ballast").unlink()
    assert _alias_view(settings)[0] == first.collection
    resumed = service.sync(conn)
    active = {row[0] for row in conn.execute("SELECT id FROM chunks WHERE active = 1")}
    assert resumed.swapped and _alias_view(settings) == (resumed.collection, active)
