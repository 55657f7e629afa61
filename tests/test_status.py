from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from state.db import Database
from state.documents import DocumentStore
from state.layout import StateLayout
from state.queue import JobQueue
from state.status import read_status

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {
    "daemon": {"alive", "pid", "heartbeat", "activity"},
    "documents": {"pending", "ingested", "rejected", "deleted", "rejections"},
    "chunks": {"active", "retired"},
    "samples": {"total", "question", "rewrite", "pseudo", "train", "heldout", "kept"},
    "jobs": {"pending", "running", "done", "failed", "dead", "recent_errors"},
    "llm": {"url", "breaker"},
    "model": {"current", "path", "metrics"},
}


def _run_status(config: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys, json\n"
        "from daemon.cli import main\n"
        f"rc = main(['--config', {str(config)!r}, 'status', '--json'])\n"
        "assert 'torch' not in sys.modules, 'status imported torch'\n"
        "assert 'sentence_transformers' not in sys.modules\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[paths]\ninbox = "{tmp_path / "inbox"}"\nstate_dir = "{tmp_path / "state"}"\n')
    return path


def _check_shape(status: dict) -> None:
    for section, keys in SHAPE.items():
        assert keys <= set(status[section]), section
    assert isinstance(status["rounds"], list)


def test_status_on_an_empty_state_dir_without_torch(tmp_path):
    started = time.monotonic()
    result = _run_status(_config(tmp_path))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    _check_shape(status)
    assert status["daemon"]["alive"] is False and status["documents"]["ingested"] == 0
    assert time.monotonic() - started < 10  # includes interpreter start; the answer itself is far faster


def test_status_on_a_populated_database(tmp_path):
    layout = StateLayout(tmp_path / "state").ensure()
    db = Database(layout.database)
    store = DocumentStore(db.conn)
    store.file_seen(str(tmp_path / "inbox" / "a.txt"), 10, 1.0)
    store.reject_path(str(tmp_path / "inbox" / "b.bin"), "unsupported file type .bin")
    queue = JobQueue(db.conn)
    queue.enqueue("synthesize", "s1", max_attempts=1)
    job = queue.claim("w", ["synthesize"])
    queue.fail(job, "LLM endpoint answered 401: bad key")
    db.conn.execute(
        "UPDATE daemon SET pid=123, heartbeat='now', heartbeat_ts=?, activity='watching'", (time.time(),)
    )
    result = _run_status(_config(tmp_path))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    _check_shape(status)
    assert status["daemon"]["alive"] is True and status["daemon"]["pid"] == 123
    assert status["documents"]["pending"] == 1 and status["documents"]["rejected"] == 1
    assert status["documents"]["rejections"][0]["reason"] == "unsupported file type .bin"
    assert status["jobs"]["dead"] == 1 and "401" in status["jobs"]["recent_errors"][0]["error"]
    human = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(_config(tmp_path)), "status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "unsupported file type .bin" in human.stdout and "alive" in human.stdout


def test_stale_heartbeat_reads_as_down(tmp_path):
    layout = StateLayout(tmp_path / "state").ensure()
    db = Database(layout.database)
    db.conn.execute(
        "UPDATE daemon SET pid=1, heartbeat='then', heartbeat_ts=?, activity='watching'",
        (time.time() - 3600,),
    )
    assert read_status(layout)["daemon"]["alive"] is False
