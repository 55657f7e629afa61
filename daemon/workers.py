"""Worker threads that claim jobs from the durable queue and run handlers.

Each thread has its own SQLite connection. A handler either finishes the job inside its own
transaction (so results and completion commit together) or raises; the pool records the failure.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from daemon.logs import get_logger
from state.db import connect
from state.queue import Job, JobQueue, JobState, LeaseLost

log = get_logger("embedtune.workers")


class RetryLater(Exception):
    """Give the job back without counting an attempt (e.g. the LLM circuit breaker is open)."""

    def __init__(self, reason: str, delay: float) -> None:
        super().__init__(reason)
        self.delay = delay


class JobFailed(Exception):
    """A handler's failure that carries evidence worth keeping (the raw LLM reply) with the error."""

    retry = True

    def __init__(self, message: str, raw_reply: str | None = None) -> None:
        super().__init__(message)
        self.raw_reply = raw_reply


class AttemptFailed(JobFailed):
    """Count the attempt and back off like any failure; the job dead-letters once its attempts are spent.

    For faults that are likely transient, such as an LLM reply that was still not the expected JSON
    after the re-asks.
    """


class PermanentFailure(JobFailed):
    """Do not retry: dead-letter the job now with this message (and the raw reply, if any)."""

    retry = False


class LeaseKeeper:
    """Extends the leases of a pool's running jobs every third of the lease, on a connection of its own.

    Why: an LLM request may wait on Retry-After for minutes; without heartbeats its lease would expire,
    `recover_expired` would hand the job to a second worker, and both would do it."""

    def __init__(self, db_path, lease_seconds: float, stop_event: threading.Event) -> None:
        self.db_path = db_path
        self.lease_seconds = lease_seconds
        self.stop_event = stop_event
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{name}-leases", daemon=True)
        self._thread.start()

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job

    def remove(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def _run(self) -> None:
        conn = connect(self.db_path)
        queue = JobQueue(conn)
        try:
            while not self.stop_event.wait(self.lease_seconds / 3):
                with self._lock:
                    jobs = list(self._jobs.values())
                for job in jobs:
                    try:
                        queue.heartbeat(job, self.lease_seconds)
                    except LeaseLost:
                        log.warning("lease_lost", job_id=job.id, kind=job.kind)
                        self.remove(job)
                    except Exception:
                        log.exception("lease_heartbeat_failed", job_id=job.id)
        finally:
            conn.close()


def owner_prefix() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:"


@dataclass
class JobContext:
    """What a handler gets: its job, a connection of its own, and the queue on that connection."""

    job: Job
    queue: JobQueue

    @property
    def conn(self):
        return self.queue.conn


Handler = Callable[[JobContext], None]


class BatchHandler(Protocol):
    """A handler that can also finish several jobs of its kind in one go (one transaction for all)."""

    def batch_size(self) -> int:
        """How many jobs to take at once now; 1 means one at a time through the plain handler."""
        ...

    def handle_batch(self, queue: JobQueue, jobs: list[Job]) -> None:
        """Do and complete every job, or raise having committed nothing (each is then run on its own)."""
        ...


class WorkerPool:
    def __init__(
        self,
        name: str,
        db_path,
        handlers: dict[str, Handler],
        threads: int,
        lease_seconds: float = 300.0,
        idle_poll: float = 0.5,
        batches: Mapping[str, BatchHandler] | None = None,
    ) -> None:
        self.name = name
        self.db_path = db_path
        self.handlers = handlers
        self.batches = dict(batches or {})
        self.threads = threads
        self.lease_seconds = lease_seconds
        self.idle_poll = idle_poll
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.busy = 0
        # when a job was last claimed: an ingest process with nothing to claim for a while ends
        self.last_active = time.monotonic()
        self._busy_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.owner = owner_prefix() + name
        self.leases = LeaseKeeper(db_path, lease_seconds, self.stop_event)

    def start(self) -> None:
        self.leases.start(self.name)
        for index in range(self.threads):
            thread = threading.Thread(
                target=self._run, args=(index,), name=f"{self.name}-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def resize(self, threads: int) -> None:
        """Grow the pool (SIGHUP raising llm.concurrency). Shrinking waits for the next restart."""
        for index in range(len(self._threads), threads):
            thread = threading.Thread(
                target=self._run, args=(index,), name=f"{self.name}-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self.threads = max(self.threads, threads)

    def stop_claiming(self) -> None:
        """Claim no more jobs (a daemon stop: a job given back meanwhile must not be taken again)."""
        self.stop_event.set()
        self.wake.set()

    def stop(self, grace: float = 30.0) -> bool:
        """Stop claiming; wait for running jobs up to `grace` seconds. True when all threads ended."""
        self.stop_claiming()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _run(self, index: int) -> None:
        conn = connect(self.db_path)
        queue = JobQueue(conn)
        owner = f"{self.owner}-{index}-{uuid.uuid4().hex[:6]}"
        try:
            while not self.stop_event.is_set():
                try:
                    worked = self.work_once(queue, owner)
                except Exception:
                    log.exception("claim_failed", pool=self.name)
                    self.stop_event.wait(1.0)
                    continue
                if not worked:
                    self.wake.wait(self.idle_poll)
                    self.wake.clear()
        finally:
            conn.close()

    def work_once(self, queue: JobQueue, owner: str) -> bool:
        """Claim the next job (with more of its kind where it runs in batches) and run it; False when
        there was nothing to claim. One step of a worker thread (benchmarks drive the pool with it)."""
        job = queue.claim(owner, list(self.handlers), self.lease_seconds)
        if job is None:
            return False
        self.last_active = time.monotonic()
        batch = self.batches.get(job.kind)
        size = batch.batch_size() if batch is not None else 1
        if size > 1:
            self._execute_batch(queue, batch, [job, *self._claim_more(queue, owner, job, size - 1)])
        else:
            self._execute(queue, job)
        return True

    def _claim_more(self, queue: JobQueue, owner: str, job: Job, limit: int) -> list[Job]:
        try:
            return queue.claim_more(owner, job.kind, limit, self.lease_seconds)
        except Exception:
            log.exception("claim_failed", pool=self.name)
            return []

    def _execute_batch(self, queue: JobQueue, batch: BatchHandler, jobs: list[Job]) -> None:
        """Run jobs together; if the batch fails (it committed nothing), run each on its own, so one bad
        job fails alone, with its own attempts and error, as it would have without batching."""
        started = time.monotonic()
        with self._busy_lock:
            self.busy += 1
        for job in jobs:
            self.leases.add(job)
        try:
            batch.handle_batch(queue, jobs)
            log.info(
                "jobs_done",
                kind=jobs[0].kind,
                jobs=len(jobs),
                duration_s=round(time.monotonic() - started, 3),
            )
            return
        except Exception as exc:
            log.warning(
                "batch_failed", kind=jobs[0].kind, jobs=len(jobs), error=f"{type(exc).__name__}: {exc}"
            )
        finally:
            for job in jobs:
                self.leases.remove(job)
            with self._busy_lock:
                self.busy -= 1
        for job in jobs:
            self._execute(queue, job)

    def _execute(self, queue: JobQueue, job: Job) -> None:
        started = time.monotonic()
        bound = log.bind(job_id=job.id, kind=job.kind, attempt=job.attempts)
        with self._busy_lock:
            self.busy += 1
        self.leases.add(job)
        try:
            self.handlers[job.kind](JobContext(job, queue))
            bound.info("job_done", duration_s=round(time.monotonic() - started, 3))
        except RetryLater as exc:
            try:
                queue.postpone(job, exc.delay, str(exc))
                bound.info("job_postponed", reason=str(exc), delay_s=round(exc.delay, 1))
            except LeaseLost as lost:
                bound.warning("lease_lost", error=str(lost))
        except LeaseLost as exc:
            bound.warning("lease_lost", error=str(exc))
        except Exception as exc:
            if isinstance(exc, JobFailed):
                message, retry, raw_reply = str(exc), exc.retry, exc.raw_reply
            else:
                message, retry, raw_reply = f"{type(exc).__name__}: {exc}", True, None
            try:
                state = queue.fail(job, message, retry=retry, raw_reply=raw_reply)
            except LeaseLost as lost:
                bound.warning("lease_lost", error=str(lost), failure=message)  # the new owner decides
                return
            except Exception:
                bound.exception("fail_record_failed")
                return
            duration_s = round(time.monotonic() - started, 3)
            if state is JobState.DEAD:
                bound.error("job_dead", error=message, duration_s=duration_s)
            else:
                bound.warning("job_failed", error=message, state=state.value, duration_s=duration_s)
        finally:
            self.leases.remove(job)
            with self._busy_lock:
                self.busy -= 1
