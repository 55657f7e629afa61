from __future__ import annotations

import multiprocessing
import threading

import pytest

from state.db import Database, connect
from state.queue import _READY_KINDS, JobQueue, JobState, LeaseLost


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path):
    return Database(tmp_path / "q.db")


def test_schema_pragmas(db):
    conn = db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] in (1, 2)  # NORMAL or FULL


def test_enqueue_is_idempotent_by_key(db):
    queue = JobQueue(db.conn)
    assert queue.enqueue("ingest", "k1", {"a": 1})
    assert not queue.enqueue("ingest", "k1", {"a": 2})
    assert queue.counts()["pending"] == 1


def test_claim_complete_and_lease_checks(db):
    clock = Clock()
    queue = JobQueue(db.conn, clock=clock)
    queue.enqueue("ingest", "k1", {"x": 1})
    job = queue.claim("w1", ["ingest"], lease_seconds=10)
    assert job is not None and job.payload == {"x": 1} and job.attempts == 1
    assert queue.claim("w2", ["ingest"]) is None
    queue.heartbeat(job, 10)
    queue.complete(job)
    assert queue.counts()["done"] == 1
    with pytest.raises(LeaseLost):
        queue.complete(job)


def test_claim_respects_kinds_and_priority(db):
    queue = JobQueue(db.conn)
    queue.enqueue("synthesize", "s", priority=50)
    queue.enqueue("ingest", "i", priority=10)
    assert queue.claim("w", ["filter"]) is None
    assert queue.claim("w").kind == "ingest"
    assert queue.claim("w").kind == "synthesize"


def test_claim_any_kind_probes_the_ready_index_instead_of_scanning(db):
    """claim() without kinds lists the ready kinds by skip-scan; a plan that reads every pending row would make
    each claim O(backlog)."""
    queue = JobQueue(db.conn)
    for kind in ("synthesize", "filter", "ingest"):
        for n in range(3):
            queue.enqueue(kind, f"{kind}-{n}")
    done = queue.claim("w", ["filter"])
    queue.complete(done)
    plan = [row[3] for row in db.conn.execute("EXPLAIN QUERY PLAN " + _READY_KINDS)]
    assert not any(step.startswith("SCAN jobs") for step in plan), plan
    assert [row[0] for row in db.conn.execute(_READY_KINDS)] == ["filter", "ingest", "synthesize"]
    claimed = {queue.claim("w").kind for _ in range(8)}
    assert claimed == {"filter", "ingest", "synthesize"} and queue.claim("w") is None


def test_fail_backs_off_then_dead_letters(db):
    clock = Clock()
    queue = JobQueue(db.conn, clock=clock)
    queue.enqueue("ingest", "k", max_attempts=3)
    for attempt in range(1, 4):
        job = queue.claim("w", lease_seconds=5)
        assert job is not None and job.attempts == attempt
        state = queue.fail(job, f"boom {attempt}", delay=30)
        if attempt < 3:
            assert state is JobState.FAILED
            assert queue.claim("w") is None  # backing off
            clock.now += 31
    assert state is JobState.DEAD
    row = db.conn.execute("SELECT state, last_error FROM jobs").fetchone()
    assert tuple(row) == ("dead", "boom 3")
    assert queue.requeue_dead() == 1
    assert queue.claim("w").attempts == 1


def test_permanent_failure_dead_letters_at_once(db):
    queue = JobQueue(db.conn)
    queue.enqueue("synthesize", "k", max_attempts=5)
    job = queue.claim("w")
    assert queue.fail(job, "401", retry=False, raw_reply="<raw>") is JobState.DEAD
    assert db.conn.execute("SELECT raw_reply FROM jobs").fetchone()[0] == "<raw>"


def test_expired_lease_is_recovered_and_old_owner_cannot_finish(db):
    clock = Clock()
    queue = JobQueue(db.conn, clock=clock)
    queue.enqueue("ingest", "k")
    first = queue.claim("crashed", lease_seconds=10)
    clock.now += 5
    assert queue.recover_expired() == 0
    clock.now += 10
    assert queue.recover_expired() == 1
    second = queue.claim("w2", lease_seconds=10)
    assert second.id == first.id and second.attempts == 2
    with pytest.raises(LeaseLost):
        queue.heartbeat(first)
    queue.complete(second)


def test_postpone_does_not_count_an_attempt(db):
    clock = Clock()
    queue = JobQueue(db.conn, clock=clock)
    queue.enqueue("synthesize", "k")
    job = queue.claim("w")
    queue.postpone(job, 60, "breaker open")
    assert queue.claim("w") is None
    clock.now += 61
    assert queue.claim("w").attempts == 1


def test_requeue_finished_rearms_recurring_jobs(db):
    queue = JobQueue(db.conn)
    queue.enqueue("filter", "filter", requeue_finished=True)
    job = queue.claim("w")
    assert not queue.enqueue("filter", "filter", requeue_finished=True)  # running: left alone
    queue.complete(job)
    assert queue.enqueue("filter", "filter", requeue_finished=True)
    assert queue.counts()["pending"] == 1


def _claim_all(path: str, owner: str, out, go=None) -> None:
    import time

    conn = connect(path)
    queue = JobQueue(conn)
    claimed = []
    if go is not None:
        go.wait(60)  # every process starts claiming at once
    while (job := queue.claim(owner, lease_seconds=60)) is not None:
        claimed.append(job.id)
        if go is not None:
            time.sleep(0.002)  # a job takes a little work, so claims interleave
        queue.complete(job)
    conn.close()
    out.put(claimed) if hasattr(out, "put") else out.extend(claimed)


def test_concurrent_threads_never_share_a_job(db):
    queue = JobQueue(db.conn)
    for i in range(300):
        queue.enqueue("ingest", f"k{i}")
    results: list[list[int]] = [[] for _ in range(6)]
    threads = [
        threading.Thread(target=_claim_all, args=(str(db.path), f"t{i}", results[i])) for i in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [job for batch in results for job in batch]
    assert len(claimed) == 300 and len(set(claimed)) == 300


def test_concurrent_processes_never_share_a_job(db):
    queue = JobQueue(db.conn)
    for i in range(200):
        queue.enqueue("ingest", f"k{i}")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    processes = [ctx.Process(target=_claim_all, args=(str(db.path), f"p{i}", out, go)) for i in range(4)]
    for process in processes:
        process.start()
    go.set()
    batches = [out.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    claimed = [job for batch in batches for job in batch]
    assert len(claimed) == 200 and len(set(claimed)) == 200
    assert sum(1 for batch in batches if batch) >= 2  # the claims really raced


def test_a_worker_whose_lease_was_lost_cannot_fail_or_postpone_the_job(db):
    clock = Clock()
    queue = JobQueue(db.conn, clock=clock)
    queue.enqueue("synthesize", "k", max_attempts=1)
    first = queue.claim("slow-worker", lease_seconds=10)
    clock.now += 11
    assert queue.recover_expired() == 1
    second = queue.claim("new-owner", lease_seconds=10)
    assert second.id == first.id
    with pytest.raises(LeaseLost):
        queue.fail(first, "late failure")  # attempts are spent: this would have dead-lettered
    with pytest.raises(LeaseLost):
        queue.postpone(first, 5, "breaker open")
    row = db.conn.execute("SELECT state, lease_owner FROM jobs").fetchone()
    assert tuple(row) == ("running", "new-owner")
    queue.complete(second)


def test_running_jobs_keep_their_lease_while_they_work(tmp_path):
    """A job that takes three lease periods is done once: heartbeats keep its lease, so lease recovery
    (every 30 s in the daemon; continuously here) never hands it to a second worker."""
    import time

    from daemon.workers import WorkerPool

    database = Database(tmp_path / "lease.db")
    queue = JobQueue(database.conn)
    queue.enqueue("slow", "only")
    calls = []

    def handler(ctx) -> None:
        calls.append(ctx.job.lease_owner)
        time.sleep(3.0)
        ctx.queue.complete(ctx.job)

    pool = WorkerPool("slow", database.path, {"slow": handler}, threads=2, lease_seconds=1.0, idle_poll=0.05)
    pool.start()
    deadline = time.monotonic() + 15
    try:
        while queue.outstanding() and time.monotonic() < deadline:
            queue.recover_expired()
            time.sleep(0.1)
    finally:
        pool.stop(10)
    assert len(calls) == 1
    assert database.conn.execute("SELECT state, attempts FROM jobs").fetchone()[:] == ("done", 1)


def test_claim_more_and_complete_many_take_and_finish_a_batch_in_claim_order(db):
    clock = Clock()
    queue = JobQueue(db.conn, clock=clock)
    assert queue.enqueue_many("synthesize", [(f"s{n}", {"n": n}) for n in range(5)], priority=50) == 5
    assert queue.enqueue_many("synthesize", [("s0", {}), ("s5", {"n": 5})]) == 1  # s0 exists already
    queue.enqueue("synthesize", "later", delay=60)  # not ready yet
    queue.enqueue("synthesize", "first", priority=10)
    queue.enqueue("ingest", "other kind")
    head = queue.claim("w", ["synthesize"])
    assert head.key == "first"
    batch = queue.claim_more("w", "synthesize", 4, lease_seconds=30)
    assert [job.key for job in batch] == ["s0", "s1", "s2", "s3"]
    assert all(job.attempts == 1 and job.lease_owner == "w" for job in batch)
    assert queue.claim_more("w", "synthesize", 0) == []
    # one of them is no longer ours: nothing of the batch is marked done
    db.conn.execute("UPDATE jobs SET lease_owner='someone else' WHERE key='s2'")
    with pytest.raises(LeaseLost):
        queue.complete_many(batch)
    assert db.conn.execute("SELECT COUNT(*) FROM jobs WHERE state='done'").fetchone()[0] == 0
    db.conn.execute("UPDATE jobs SET lease_owner='w' WHERE key='s2'")
    queue.complete_many([head, *batch])
    assert queue.counts()["done"] == 5
    rest = queue.claim_more("w", "synthesize", 10)
    assert [job.key for job in rest] == ["s4", "s5"]  # `later` waits for its time, `ingest` is another kind


def test_pool_batch_that_fails_runs_each_job_alone(tmp_path):
    """A batch that raises committed nothing; its jobs then run one by one, so the bad one fails alone
    (with its own error and attempts) and the others are done."""
    import time

    from daemon.workers import WorkerPool

    database = Database(tmp_path / "batch.db")
    queue = JobQueue(database.conn)
    queue.enqueue_many("work", [(f"w{n}", {"n": n}) for n in range(10)])
    batches: list[int] = []

    def single(ctx) -> None:
        if ctx.job.payload["n"] == 3:
            raise ValueError("job 3 is bad")
        ctx.queue.complete(ctx.job)

    class Batch:
        def batch_size(self) -> int:
            return 4

        def handle_batch(self, queue: JobQueue, jobs) -> None:
            batches.append(len(jobs))
            if any(job.payload["n"] == 3 for job in jobs):
                raise ValueError("a job of the batch is bad")
            queue.complete_many(jobs)

    pool = WorkerPool(
        "work", database.path, {"work": single}, threads=1, idle_poll=0.05, batches={"work": Batch()}
    )
    pool.start()
    deadline = time.monotonic() + 30
    try:
        while (
            time.monotonic() < deadline
            and database.conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('pending','running')"
            ).fetchone()[0]
        ):
            time.sleep(0.05)
    finally:
        pool.stop(10)
    states = dict(database.conn.execute("SELECT key, state FROM jobs").fetchall())
    assert states.pop("w3") == "failed" and set(states.values()) == {"done"}
    error = database.conn.execute("SELECT last_error FROM jobs WHERE key='w3'").fetchone()[0]
    assert "job 3 is bad" in error
    assert batches[:3] == [4, 4, 2]  # w0-w3 failed as a batch and ran alone; then w4-w7, w8-w9
