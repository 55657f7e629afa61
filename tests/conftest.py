from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.llm_server import FakeLlm  # noqa: E402
from tests.tiny_models import build_tiny_cross_encoder, build_tiny_embedder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("models") / "tiny-st")


@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "tiny-ce")


def settings_for(root: Path, base_model: Path, **sections):
    """Settings for a test: state and inbox under `root`, the tiny model, small fast rounds (~5 steps at
    lr 3e-4, at which the tiny model really learns); `sections` override key by key."""
    from daemon.settings import Settings

    data = {
        "paths": {"inbox": str(root / "inbox"), "state_dir": str(root / "state")},
        # ingest in the daemon's threads (a process per test daemon costs CI time; tests/test_ingest_processes.py)
        "ingest": {
            "settle_seconds": 0.3,
            "chunk_tokens": 64,
            "chunk_overlap": 8,
            "rescan_minutes": 0,
            "processes": 0,
        },
        # torch: a test of something else does not pay for an ONNX export (tests/test_onnx_jobs.py does)
        "model": {"base": str(base_model), "device": "cpu", "encode_batch_size": 16, "backend": "torch"},
        "training": {
            "min_new_samples": 10_000,
            "batch_size": 8,
            "max_pairs": 64,
            "max_minutes": 5,
            "hard_negatives": 1,
            "learning_rate": 3e-4,
            "check_minutes": 0.05,
        },
        "promotion": {"merge_weights": [0.5], "bootstrap_samples": 100},
        "logging": {"format": "json", "level": "warning"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    (root / "inbox").mkdir(exist_ok=True)
    return Settings.model_validate(data)


@pytest.fixture
def make_settings(tmp_path, tiny_embedder):
    def make(**sections):
        return settings_for(tmp_path, tiny_embedder, **sections)

    return make


@pytest.fixture
def fake_llm():
    with FakeLlm() as server:
        yield server


# Timeouts are a safety net against a hang, never what a test waits for: a loaded CI machine (2 cores
# shared with other jobs) runs the same state changes several times slower, so every limit is scaled.
TIMEOUT_SCALE = float(os.environ.get("EMBEDTUNE_TEST_TIMEOUT_SCALE", "3"))


def serves_a_version(layout) -> bool:
    """`models/current` names a promoted version (it names the base model, or is absent, otherwise)."""
    link = layout.current
    return link.is_symlink() and link.resolve().parent == layout.versions.resolve()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, message: str = "condition"):
    """Poll until predicate() is truthy (event-driven code has no other completion signal to join on)."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class RunningDaemon:
    """A real Daemon (watcher, pools, scheduler) in this process, its main loop on a thread."""

    def __init__(self, settings) -> None:
        import threading

        from daemon.service import Daemon

        self.settings = settings
        self.daemon = Daemon(settings)
        self.daemon.start()
        self.thread = threading.Thread(target=self.daemon.run_forever, kwargs={"tick": 0.2}, daemon=True)
        self.thread.start()

    @property
    def conn(self):
        return self.daemon.db.conn

    def query(self, sql: str, *params):
        from state.db import connect

        conn = connect(self.daemon.layout.database, readonly=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def scalar(self, sql: str, *params):
        """First column of the first row, None when there is no row yet (polled predicates start empty)."""
        rows = self.query(sql, *params)
        return rows[0][0] if rows else None

    def status(self) -> dict:
        from state.status import read_status

        return read_status(self.daemon.layout, self.settings.llm.url)

    def idle(self) -> bool:
        return (
            self.scalar("SELECT COUNT(*) FROM jobs WHERE state IN ('pending','running','failed')") == 0
            and len(self.daemon.watcher.tracker) == 0
        )

    def stop(self) -> None:
        self.daemon.stop_requested.set()
        self.thread.join(timeout=60)
        self.daemon.shutdown()


@pytest.fixture
def start_daemon():
    started = []

    def start(settings) -> RunningDaemon:
        running = RunningDaemon(settings)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive() or running.daemon.lock._fd is not None:
            running.stop()
