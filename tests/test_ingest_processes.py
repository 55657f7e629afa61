"""Ingest in worker processes (daemon/ingest_process.py): started when files wait, ended when idle, and a
process that dies costs only the attempt of the job it held. Real processes, a real daemon, a real
SQLite queue, the tiny model's tokenizer."""

from __future__ import annotations

import os
import signal
import sqlite3

from tests.conftest import settings_for, wait_for
from tests.docs_factory import ENGLISH


def _drop(inbox, name: str, sentences: int = 30) -> None:
    tmp = inbox.parent / f".{name}"
    tmp.write_text(" ".join(ENGLISH[i % len(ENGLISH)] for i in range(sentences)) + f" File {name}.")
    tmp.rename(inbox / name)  # a finished copy lands at once


def _ingested(running, count: int) -> bool:
    return running.scalar("SELECT COUNT(*) FROM documents WHERE status='ingested'") == count


def test_ingest_runs_in_processes_that_start_for_work_and_end_when_idle(
    tmp_path, tiny_embedder, start_daemon
):
    settings = settings_for(tmp_path, tiny_embedder, ingest={"processes": 2})
    running = start_daemon(settings)
    daemon = running.daemon
    assert "ingest" not in {pool.name for pool in daemon.pools}, "no ingest threads in the daemon"
    supervisor = daemon.ingest_processes
    assert supervisor is not None and supervisor.count == 2 and supervisor.alive == 0, "idle: no process yet"
    supervisor.idle_exit_s = 1.0

    for i in range(6):
        _drop(settings.paths.inbox, f"doc{i}.txt")
    wait_for(lambda: _ingested(running, 6), timeout=60, message="six files ingested by the processes")
    pids = set(supervisor._children)
    # one process per job still waiting when the main loop looks, at most two: a fast first process may
    # take all six alone (test_processes_start_for_the_jobs_that_wait_not_all_at_once counts them)
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    assert running.scalar("SELECT COUNT(DISTINCT document_id) FROM chunks") == 6
    assert running.scalar("SELECT COUNT(*) FROM jobs WHERE kind='ingest' AND state != 'done'") == 0

    # with nothing to claim for idle_exit_s, each process ends by itself (exit 0: no job is touched)
    wait_for(lambda: supervisor.alive == 0, timeout=60, message="idle ingest processes to end")
    wait_for(lambda: not supervisor._children, timeout=30, message="the main loop to reap them")

    _drop(settings.paths.inbox, "later.txt")  # the next file starts a process again
    wait_for(lambda: _ingested(running, 7), timeout=60, message="a file after the idle exit")
    later = set(supervisor._children)
    assert later and not later & pids
    running.stop()
    for child in supervisor._children.values():
        assert child.poll() is not None, "the daemon's stop ends its ingest processes"


def test_a_dead_ingest_process_costs_its_job_one_attempt_and_the_file_is_still_ingested(
    tmp_path, tiny_embedder
):
    """SIGKILL an ingest process while it holds a job: the supervisor gives the job back at once with the
    attempt counted and the exit status as its error, starts a new process, and the file is ingested."""
    from daemon.ingest_process import IngestProcesses, owner_of
    from state.db import Database
    from state.documents import DocumentStore
    from state.layout import StateLayout
    from state.queue import JobQueue

    settings = settings_for(tmp_path, tiny_embedder, ingest={"processes": 1})
    layout = StateLayout(settings.paths.state_dir).ensure()
    db = Database(layout.database)
    queue = JobQueue(db.conn)
    _drop(settings.paths.inbox, "a.txt")
    path = settings.paths.inbox / "a.txt"
    DocumentStore(db.conn, queue).file_seen(str(path), path.stat().st_size, path.stat().st_mtime)

    job = queue.claim("not-yet", ["ingest"])  # held, so the process finds nothing to claim
    assert job is not None and job.attempts == 1
    supervisor = IngestProcesses(settings, 1)
    supervisor.wake()
    (pid,) = supervisor._children
    with db.conn:  # as if that process had claimed it
        db.conn.execute("UPDATE jobs SET lease_owner=? WHERE id=?", (owner_of(pid) + "ingest-0-t", job.id))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: supervisor._children[pid].poll() is not None, message="the process to die")

    supervisor.check(db.conn)
    row = db.conn.execute("SELECT state, attempts, last_error FROM jobs WHERE id=?", (job.id,)).fetchone()
    assert row["attempts"] == 1 and "exit status -9" in row["last_error"], dict(row)
    assert pid not in supervisor._children and supervisor.alive == 1, "a new process took over"

    def ingested() -> bool:
        reader = sqlite3.connect(layout.database)
        try:
            return reader.execute("SELECT status FROM documents").fetchone()[0] == "ingested"
        finally:
            reader.close()

    wait_for(ingested, timeout=60, message="the file ingested by the new process")
    assert db.conn.execute("SELECT attempts FROM jobs WHERE id=?", (job.id,)).fetchone()[0] == 2
    supervisor.stop()
    db.close()


def test_a_job_that_kills_every_process_ends_dead_with_the_reason(tmp_path):
    """recover_owner counts the attempt: a file whose parser kills the process cannot loop forever."""
    from state.db import Database
    from state.queue import JobQueue

    db = Database(tmp_path / "q.db")
    queue = JobQueue(db.conn)
    queue.enqueue("ingest", "doc:1", {"document_id": 1}, max_attempts=2)
    for attempt in (1, 2):
        job = queue.claim(f"host:{100 + attempt}:ingest-0", ["ingest"])
        assert job is not None and job.attempts == attempt
        assert queue.recover_owner(f"host:{100 + attempt}:", "the ingest process died (exit status -9)") == 1
    row = db.conn.execute("SELECT state, last_error FROM jobs").fetchone()
    assert row["state"] == "dead" and "exit status -9" in row["last_error"]
    assert queue.recover_owner("host:999:", "nothing held") == 0


def _record(db, queue, inbox, names: list[str]) -> None:
    """Files land and are recorded, as the watcher does: one ingest job each."""
    from state.documents import DocumentStore

    for name in names:
        _drop(inbox, name)
        path = inbox / name
        DocumentStore(db.conn, queue).file_seen(str(path), path.stat().st_size, path.stat().st_mtime)


def test_processes_start_for_the_jobs_that_wait_not_all_at_once(tmp_path, tiny_embedder):
    """One file starts one process, not `ingest.processes` of them (issue 35, 12); a backlog of three
    starts three of four; a process still starting counts for the job it will take."""
    from daemon.ingest_process import IngestProcesses
    from state.db import Database
    from state.layout import StateLayout
    from state.queue import JobQueue

    settings = settings_for(tmp_path, tiny_embedder, ingest={"processes": 4})
    layout = StateLayout(settings.paths.state_dir).ensure()
    db = Database(layout.database)
    queue = JobQueue(db.conn)
    supervisor = IngestProcesses(settings, 4)
    started: set[int] = set()

    def done(count: int) -> bool:
        started.update(supervisor._children)
        return (
            queue.outstanding(["ingest"]) == 0
            and db.conn.execute("SELECT COUNT(*) FROM documents WHERE status='ingested'").fetchone()[0]
            == count
        )

    try:
        _record(db, queue, settings.paths.inbox, ["one.txt"])
        supervisor.wake()  # the watcher's call for the file it recorded
        supervisor.check(db.conn)  # the main loop's, while that job waits or runs
        started.update(supervisor._children)
        wait_for(lambda: done(1), timeout=60, message="the one file ingested")
        assert len(started) == 1, f"one file, {len(started)} processes"

        supervisor.stop()  # a fresh supervisor: the backlog case starts from no process
        supervisor = IngestProcesses(settings, 4)
        started.clear()
        _record(db, queue, settings.paths.inbox, ["a.txt", "b.txt", "c.txt"])
        supervisor.check(db.conn)  # a start-up backlog: three jobs wait
        started.update(supervisor._children)
        assert len(started) == 3, f"three jobs, {len(started)} processes"
        wait_for(lambda: done(4), timeout=60, message="the backlog ingested")
        assert len(started) == 3
    finally:
        supervisor.stop()
        db.close()


def test_demand_counts_jobs_ready_or_running_up_to_the_limit(tmp_path):
    """What the supervisor sizes itself by: a job waiting on its back-off is not demand yet."""
    from state.db import Database
    from state.queue import JobQueue

    db = Database(tmp_path / "q.db")
    queue = JobQueue(db.conn)
    assert queue.demand("ingest", 4) == 0
    for i in range(3):
        queue.enqueue("ingest", f"doc:{i}", {"document_id": i})
    queue.enqueue("filter", "filter", {})
    assert queue.demand("ingest", 4) == 3 and queue.demand("ingest", 2) == 2
    job = queue.claim("host:1:ingest-0", ["ingest"])
    assert queue.demand("ingest", 4) == 3, "a running job still needs its process"
    queue.postpone(job, 3600.0, "later")
    assert queue.demand("ingest", 4) == 2
    db.close()
