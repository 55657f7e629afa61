"""Ingestion with a real watchdog observer on a temp folder and the real daemon composition."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.conftest import wait_for
from tests.docs_factory import CHINESE, ENGLISH, make_docx, make_pdf, make_scanned_pdf, make_zip_bomb

ROOT = Path(__file__).resolve().parent.parent


def _doc(running, path):
    rows = running.query("SELECT * FROM documents WHERE path=?", str(path))
    return rows[0] if rows else None


def _status_of(running, path):
    row = _doc(running, path)
    return row["status"] if row else None


def _active_chunks(running, path):
    return running.scalar(
        "SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id=c.document_id WHERE d.path=? AND c.active=1",
        str(path),
    )


def test_files_of_every_kind_are_ingested_once(make_settings, start_daemon, tmp_path):
    settings = make_settings()
    inbox = settings.paths.inbox
    (inbox / "deep" / "er").mkdir(parents=True)
    (inbox / "en.txt").write_text(ENGLISH)
    (inbox / "zh-gbk.txt").write_bytes(CHINESE.encode("gbk"))
    (inbox / "zh-big5.txt").write_bytes(
        "機器學習是人工智慧的一個分支。它使電腦能夠從資料中學習！".encode("big5")
    )
    (inbox / "deep" / "er" / "notes.md").write_text(
        "# Notes\n\nSolar panels.\n\n## Storage\n\nBatteries keep it.\n"
    )
    make_docx(inbox / "report.docx", "Energy report", [ENGLISH])
    make_pdf(inbox / "paper.pdf", ["Solar power converts sunlight into electricity.", "Second line."])
    (inbox / "page.html").write_text("<h1>River</h1><p>The river flows through the city.</p>")
    running = start_daemon(settings)
    wait_for(
        lambda: running.scalar("SELECT COUNT(*) FROM documents WHERE status='ingested'") == 7,
        message="7 documents ingested",
    )
    wait_for(running.idle, message="queue drained")
    md = inbox / "deep" / "er" / "notes.md"
    headings = [
        r[0]
        for r in running.query(
            "SELECT heading FROM chunks c JOIN documents d ON d.id=c.document_id WHERE d.path=? ORDER BY ordinal",
            str(md),
        )
    ]
    assert headings == ["Notes", "Notes > Storage"]
    assert running.scalar("SELECT language FROM documents WHERE path=?", str(inbox / "zh-gbk.txt")) == "zh"
    # every chunk has exactly one synthesize job and one pseudo pair at most
    assert running.scalar("SELECT COUNT(*) FROM jobs WHERE kind='ingest'") == 7
    assert running.scalar("SELECT COUNT(*) FROM jobs WHERE kind='synthesize'") == running.scalar(
        "SELECT COUNT(*) FROM chunks"
    )
    split_counts = dict(running.query("SELECT split, COUNT(*) FROM documents GROUP BY split"))
    assert split_counts.get("heldout", 0) >= 1


def test_settle_reads_a_slowly_written_file_once_and_whole(make_settings, start_daemon):
    settings = make_settings(ingest={"settle_seconds": 1.0})
    running = start_daemon(settings)
    path = settings.paths.inbox / "slow.txt"
    sentences = [f"Sentence {i} about the river and the city." for i in range(12)]
    with open(path, "w") as handle:
        for sentence in sentences:
            handle.write(sentence + " ")
            handle.flush()
            time.sleep(0.3)  # a copy in progress: slower than nothing, faster than the settle period
    wait_for(lambda: _status_of(running, path) == "ingested", message="slow file ingested")
    wait_for(running.idle)
    text = " ".join(r[0] for r in running.query("SELECT text FROM chunks WHERE active=1 ORDER BY ordinal"))
    assert "Sentence 11" in text and "Sentence 0" in text
    assert running.scalar("SELECT COUNT(*) FROM jobs WHERE kind='ingest'") == 1


def test_move_modify_delete(make_settings, start_daemon):
    settings = make_settings(ingest={"retire_samples": "drop"})
    inbox = settings.paths.inbox
    (inbox / "sub").mkdir()
    running = start_daemon(settings)
    first = inbox / "a.txt"
    first.write_text(ENGLISH)
    wait_for(lambda: _status_of(running, first) == "ingested")
    wait_for(running.idle)
    chunk_ids = [r[0] for r in running.query("SELECT id FROM chunks")]
    moved = inbox / "sub" / "b.txt"
    os.rename(first, moved)
    wait_for(lambda: _status_of(running, moved) == "ingested", message="move recorded")
    wait_for(running.idle)
    assert [r[0] for r in running.query("SELECT id FROM chunks WHERE active=1")] == chunk_ids
    assert running.scalar("SELECT COUNT(*) FROM jobs WHERE kind='ingest'") == 1  # not re-ingested
    assert running.scalar("SELECT COUNT(*) FROM documents") == 1
    moved.write_text(ENGLISH + " A new closing sentence about batteries.")
    old_ids = ",".join(map(str, chunk_ids))
    wait_for(
        lambda: running.scalar(f"SELECT COUNT(*) FROM chunks WHERE active=1 AND id NOT IN ({old_ids})") > 0,
        message="new version chunks",
    )
    wait_for(running.idle)
    assert running.scalar("SELECT COUNT(*) FROM chunks WHERE active=0") == len(chunk_ids)
    moved.unlink()
    wait_for(lambda: _status_of(running, moved) == "deleted", message="delete recorded")
    assert running.scalar("SELECT COUNT(*) FROM chunks WHERE active=1") == 0
    # samples stay in the table; with the drop policy they are no longer kept
    assert running.scalar("SELECT COUNT(*) FROM samples") > 0
    assert running.scalar("SELECT COUNT(*) FROM samples WHERE kept=1") == 0


def test_a_move_over_another_file_retires_it_by_the_retire_policy(make_settings, start_daemon):
    """The overwritten file's content is gone, as for a delete: with `retire_samples = "drop"` its
    pairs must stop being training data (the move path used to hard-code "keep")."""
    # featured_percentage 1: the filter keeps every pair (the tiny model ranks at random)
    settings = make_settings(ingest={"retire_samples": "drop"}, synthesis={"featured_percentage": 1.0})
    inbox = settings.paths.inbox
    running = start_daemon(settings)
    mover, victim = inbox / "a.txt", inbox / "b.txt"
    mover.write_text(ENGLISH)
    victim.write_text("A second guide. " + ENGLISH.replace("solar", "wind"))
    wait_for(lambda: _status_of(running, victim) == "ingested" and _status_of(running, mover) == "ingested")
    wait_for(running.idle)
    victim_id = _doc(running, victim)["id"]
    kept = (
        "SELECT COUNT(*) FROM samples s JOIN chunks c ON c.id=s.chunk_id WHERE c.document_id=? AND s.kept=1"
    )
    assert running.scalar(kept, victim_id) > 0
    os.replace(mover, victim)
    wait_for(lambda: running.scalar("SELECT status FROM documents WHERE id=?", victim_id) == "deleted")
    assert running.scalar(kept, victim_id) == 0


def test_startup_reconciles_changes_made_while_down(make_settings, start_daemon):
    settings = make_settings()
    inbox = settings.paths.inbox
    keep, change, remove = inbox / "keep.txt", inbox / "change.txt", inbox / "remove.txt"
    for path in (keep, change, remove):
        path.write_text(f"{path.stem} file. " + ENGLISH)
    running = start_daemon(settings)
    wait_for(lambda: running.scalar("SELECT COUNT(*) FROM documents WHERE status='ingested'") == 3)
    wait_for(running.idle)
    running.stop()
    remove.unlink()
    change.write_text("changed content. " + ENGLISH + " More.")
    added = inbox / "added.txt"
    added.write_text("added file. " + ENGLISH)
    running = start_daemon(settings)
    wait_for(
        lambda: (
            _status_of(running, added) == "ingested"
            and _status_of(running, remove) == "deleted"
            and running.scalar("SELECT COUNT(*) FROM jobs WHERE kind='ingest'") == 5
        ),
        message="reconciled",
    )
    wait_for(running.idle)
    assert (
        running.scalar(
            "SELECT COUNT(*) FROM jobs WHERE kind='ingest' AND key LIKE ?",
            f"ingest:{_doc(running, keep)['id']}:%",
        )
        == 1
    )


def test_bad_inputs_are_rejected_and_good_files_still_ingested(make_settings, start_daemon):
    settings = make_settings(ingest={"max_file_mb": 1})
    inbox = settings.paths.inbox
    (inbox / "empty.txt").write_bytes(b"")
    (inbox / "junk.txt").write_bytes(bytes(range(256)) * 50)
    (inbox / "huge.txt").write_bytes(b"a " * 700_000)
    make_scanned_pdf(inbox / "scan.pdf")
    make_pdf(inbox / "locked.pdf", ["secret"], encrypt_with="pw")
    (inbox / "broken.docx").write_bytes(b"PK\x03\x04 broken")
    make_zip_bomb(inbox / "bomb.docx", megabytes=300)
    (inbox / "folder.txt").mkdir()
    os.mkfifo(inbox / "pipe.txt")
    (inbox / "binary.exe").write_bytes(b"MZ\x90\x00")
    bad_name = os.fsencode(str(inbox)) + b"/bad-\xff\xfe.txt"
    with open(bad_name, "wb") as handle:
        handle.write(b"valid text in a badly named file.")
    (inbox / "ok with spaces & emoji \U0001f600.txt").write_text(ENGLISH)
    (inbox / ".hidden.txt").write_text(ENGLISH)
    (inbox / "~$lock.docx").write_text("x")
    (inbox / "download.part").write_text("x")
    running = start_daemon(settings)
    wait_for(
        lambda: running.scalar("SELECT COUNT(*) FROM documents WHERE status='rejected'") >= 11,
        message="rejections recorded",
    )
    wait_for(running.idle)
    reasons = {os.path.basename(r["path"]): r["reason"] for r in running.status()["documents"]["rejections"]}
    expected = {
        "empty.txt": "empty",
        "junk.txt": "binary",
        "huge.txt": "max_file_mb",
        "scan.pdf": "scanned pdf",
        "locked.pdf": "password",
        "broken.docx": "corrupt docx",
        "bomb.docx": "zip bomb",
        "folder.txt": "directory",
        "pipe.txt": "not a regular file",
        "binary.exe": "unsupported",
    }
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons.get(name))
    assert any("UTF-8" in reason for name, reason in reasons.items() if name.startswith("bad-"))
    assert _status_of(running, inbox / "ok with spaces & emoji \U0001f600.txt") == "ingested"
    assert (
        running.scalar(
            "SELECT COUNT(*) FROM documents WHERE path LIKE '%hidden%' OR path LIKE '%.part' "
            "OR path LIKE '%~$%'"
        )
        == 0
    )
    assert (
        running.daemon.thread_alive()
        if hasattr(running.daemon, "thread_alive")
        else running.thread.is_alive()
    )


def test_rejected_file_fixed_later_is_ingested(make_settings, start_daemon):
    settings = make_settings()
    running = start_daemon(settings)
    path = settings.paths.inbox / "later.txt"
    path.write_bytes(b"")
    wait_for(lambda: _status_of(running, path) == "rejected")
    path.write_text(ENGLISH)
    wait_for(lambda: _status_of(running, path) == "ingested", message="fixed file ingested")


def test_file_deleted_between_event_and_read(make_settings, tmp_path):
    """The ingest job finds the file gone: a clear rejection, nothing else affected."""
    from daemon.ingest import Chunker, make_ingest_handler
    from daemon.workers import JobContext
    from state.db import Database
    from state.documents import DocumentStore
    from state.queue import JobQueue

    settings = make_settings()
    db = Database(tmp_path / "x.db")
    store = DocumentStore(db.conn)
    path = settings.paths.inbox / "gone.txt"
    store.file_seen(str(path), 10, 1.0)
    queue = JobQueue(db.conn)
    job = queue.claim("w")
    handler = make_ingest_handler(settings, Chunker(settings.model.base, 64, 8, 10))
    handler(JobContext(job, queue))
    row = store.by_path(str(path))
    assert row["status"] == "rejected" and "disappeared" in row["error"]


def test_unreadable_file(tmp_path, tiny_embedder):
    """The daemon finds a file it may not read: a clear rejection. CI runs as root, which reads any file
    whatever its mode, so there the daemon runs without the two capabilities that allow it
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; as under systemd's CapabilityBoundingSet): root is then held
    to the file's mode like any user."""
    import shutil
    import subprocess
    import sys

    from tests.reliability.harness import write_config

    drop = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run the daemon without root's read override"
        drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    secret = tmp_path / "inbox" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(ENGLISH)
    secret.chmod(0)
    config = write_config(tmp_path / "c.toml", tmp_path, tiny_embedder, extra={"index": {"enabled": False}})
    command = [sys.executable, "-m", "daemon.cli", "--config", str(config)]
    daemon = subprocess.Popen(
        [*drop, *command, "run"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:

        def rejection():
            if daemon.poll() is not None:
                raise AssertionError(f"daemon exited: {daemon.stderr.read().decode()[-2000:]}")
            out = subprocess.run([*command, "status", "--json"], cwd=ROOT, capture_output=True, check=True)
            rejected = json.loads(out.stdout)["documents"]["rejections"]
            return next((r["reason"] for r in rejected if r["path"].endswith("secret.txt")), None)

        reason = wait_for(rejection, timeout=90, interval=0.5, message="unreadable file rejected")
        assert "permission" in reason.lower(), reason
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def test_a_failing_settle_callback_keeps_the_file_for_a_retry(tmp_path):
    """The database is locked (or the disk full) when a file settles: the file must be offered again,
    not dropped until the next rescan, and the log must say why."""
    from structlog.testing import capture_logs

    from daemon.watcher import InboxCallbacks, InboxWatcher

    class Flaky(InboxCallbacks):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def settled(self, path: str, size: int, mtime: float) -> None:
            self.calls.append(path)
            if len(self.calls) == 1:
                raise RuntimeError("database is locked")

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    callbacks = Flaky()
    watcher = InboxWatcher(inbox, callbacks, settle_seconds=0.2, poll_interval=0.05)
    with capture_logs() as logs:
        watcher.start()
        try:
            (inbox / "a.txt").write_text("A file that settles while the database is locked.")
            wait_for(lambda: len(callbacks.calls) >= 2, timeout=10, message="a second offer")
        finally:
            watcher.stop()
    assert callbacks.calls[0] == callbacks.calls[1] == str(inbox / "a.txt")
    failure = next(e for e in logs if e["event"] == "settle_callback_failed")
    assert failure["will_retry"] and "database is locked" in failure["error"]


def test_a_settled_file_counts_as_tracked_until_its_job_exists(tmp_path):
    """poll() used to forget a settled file before the callback enqueued its job: in between, a file was
    neither tracked nor a job, and a waiter on "no jobs, nothing tracked" (`once`, the tests) saw an
    idle pipeline with a document still to come."""
    from daemon.watcher import SettleTracker

    now = [0.0]
    tracker = SettleTracker(settle_seconds=1.0, clock=lambda: now[0])
    path = tmp_path / "a.md"
    path.write_text("# A\n\ntext\n")
    tracker.touch(str(path))
    assert tracker.poll() == [] and len(tracker) == 1  # first stat: size and mtime recorded
    now[0] = 5.0
    ready = tracker.poll()
    assert [p for p, _size, _mtime in ready] == [str(path)]
    assert len(tracker) == 1 and tracker.poll() == []  # handed over, not yet a job: still counted, once
    tracker.handed_off(str(path))
    assert len(tracker) == 0
