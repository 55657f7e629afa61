"""A durable job queue in SQLite: idempotent enqueue, leased claims, back-off, dead letters.

Delivery is at-least-once: a worker that dies keeps its lease until it expires, then the job is
claimable again. Handlers must be idempotent (unique keys on content hashes make them so).
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from state.db import transaction, utcnow


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # failed at least once, waiting for its back-off before the next attempt
    DEAD = "dead"  # gave up after max_attempts; kept with its error for `status`


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    key: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    lease_owner: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"],
            kind=row["kind"],
            key=row["key"],
            payload=json.loads(row["payload"]),
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            lease_owner=row["lease_owner"],
        )


class LeaseLost(Exception):
    """The job's lease expired and someone else may own it now; the caller must not write its result."""


def backoff_seconds(attempt: int, base: float = 2.0, cap: float = 600.0) -> float:
    """Exponential back-off with full jitter, so that many failing jobs do not retry in lock-step."""
    return random.uniform(0, min(cap, base * (2 ** max(0, attempt - 1))))


# The kinds that have a ready job, by skip-scan over the jobs_ready index: one MIN probe per kind instead
# of reading every pending row (0.2 ms vs 32 ms with 300k pending jobs).
_READY_KINDS = """
WITH RECURSIVE ready(kind) AS (
    SELECT MIN(kind) FROM jobs INDEXED BY jobs_ready WHERE state IN ('pending','failed')
    UNION ALL
    SELECT (
        SELECT MIN(kind) FROM jobs INDEXED BY jobs_ready
        WHERE state IN ('pending','failed') AND kind > ready.kind
    )
    FROM ready WHERE ready.kind IS NOT NULL
)
SELECT kind FROM ready WHERE kind IS NOT NULL
"""


class JobQueue:
    def __init__(self, conn: sqlite3.Connection, *, clock=time.time) -> None:
        self.conn = conn
        self.clock = clock

    def enqueue(
        self,
        kind: str,
        key: str,
        payload: dict[str, Any] | None = None,
        *,
        priority: int = 100,
        max_attempts: int = 5,
        delay: float = 0.0,
        requeue_finished: bool = False,
        in_transaction: bool = False,
    ) -> bool:
        """Add a job unless one with this key exists. With requeue_finished, a done/dead job with the
        same key is made pending again (used for recurring work such as the filter pass).
        Returns True when a job was added or re-armed."""
        return (
            self.enqueue_many(
                kind,
                [(key, payload)],
                priority=priority,
                max_attempts=max_attempts,
                delay=delay,
                requeue_finished=requeue_finished,
                in_transaction=in_transaction,
            )
            > 0
        )

    def enqueue_many(
        self,
        kind: str,
        jobs: list[tuple[str, dict[str, Any] | None]],
        *,
        priority: int = 100,
        max_attempts: int = 5,
        delay: float = 0.0,
        requeue_finished: bool = False,
        in_transaction: bool = False,
    ) -> int:
        """`enqueue` for many (key, payload) jobs of one kind in one statement; returns how many were added
        or re-armed."""
        now = utcnow()
        update = (
            "ON CONFLICT(key) DO UPDATE SET state='pending', attempts=0, not_before=excluded.not_before, "
            "payload=excluded.payload, last_error=NULL, updated=excluded.updated "
            "WHERE jobs.state IN ('done','dead')"
            if requeue_finished
            else "ON CONFLICT(key) DO NOTHING"
        )
        sql = (
            "INSERT INTO jobs (kind, key, payload, priority, max_attempts, not_before, created, updated) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?) {update}"
        )
        not_before = self.clock() + delay
        params = [
            (kind, key, json.dumps(payload or {}, ensure_ascii=False, sort_keys=True), priority, max_attempts)
            + (not_before, now, now)
            for key, payload in jobs
        ]
        if in_transaction:
            cursor = self.conn.executemany(sql, params)
        else:
            with transaction(self.conn):
                cursor = self.conn.executemany(sql, params)
        return cursor.rowcount

    def claim(self, owner: str, kinds: list[str] | None = None, lease_seconds: float = 300.0) -> Job | None:
        """Take the next ready job with a lease, inside one write transaction: the first ready row of each
        kind in claim order (the jobs_ready index, so O(1) per kind however many are pending), the best
        of those, then the lease."""
        now = self.clock()
        with transaction(self.conn):
            if kinds is None:
                kinds = [row[0] for row in self.conn.execute(_READY_KINDS)]
            best: tuple[int, float, int] | None = None
            for kind in kinds:
                row = self.conn.execute(
                    "SELECT priority, not_before, id FROM jobs INDEXED BY jobs_ready "
                    "WHERE kind=? AND state IN ('pending','failed') AND not_before <= ? "
                    "ORDER BY priority, not_before, id LIMIT 1",
                    (kind, now),
                ).fetchone()
                if row is not None and (best is None or tuple(row) < best):
                    best = tuple(row)
            if best is None:
                return None
            row = self.conn.execute(
                "UPDATE jobs SET state='running', lease_owner=?, lease_until=?, attempts=attempts+1, updated=? "
                "WHERE id=? RETURNING *",
                (owner, now + lease_seconds, utcnow(), best[2]),
            ).fetchone()
        return Job.from_row(row)

    def claim_more(self, owner: str, kind: str, limit: int, lease_seconds: float = 300.0) -> list[Job]:
        """Up to `limit` further ready jobs of one kind, leased in one transaction, in claim order: a
        handler that finishes many small jobs at once (the built-in synthesizer) pays one transaction for
        them instead of one per job."""
        if limit <= 0:
            return []
        now = self.clock()
        with transaction(self.conn):
            rows = self.conn.execute(
                "UPDATE jobs SET state='running', lease_owner=?, lease_until=?, attempts=attempts+1, updated=? "
                "WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_ready "
                "WHERE kind=? AND state IN ('pending','failed') AND not_before <= ? "
                "ORDER BY priority, not_before, id LIMIT ?) RETURNING *",
                (owner, now + lease_seconds, utcnow(), kind, now, limit),
            ).fetchall()
        return sorted((Job.from_row(row) for row in rows), key=lambda job: job.id)

    def get(self, job_id: int) -> Job | None:
        """A running job by id (a child process picks up the job its parent claimed)."""
        row = self.conn.execute("SELECT * FROM jobs WHERE id=? AND state='running'", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def heartbeat(self, job: Job, lease_seconds: float = 300.0) -> None:
        """Extend the lease of a long job. Raises LeaseLost if the lease is no longer ours."""
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE jobs SET lease_until=?, updated=? WHERE id=? AND state='running' AND lease_owner=?",
                (self.clock() + lease_seconds, utcnow(), job.id, job.lease_owner),
            )
        if cursor.rowcount == 0:
            raise LeaseLost(f"job {job.id} is no longer leased to {job.lease_owner}")

    def complete(self, job: Job, *, in_transaction: bool = False) -> None:
        """Mark done. Inside the handler's own transaction, this commits atomically with its results."""
        self.complete_many([job], in_transaction=in_transaction)

    def complete_many(self, jobs: list[Job], *, in_transaction: bool = False) -> None:
        """Mark jobs done; LeaseLost (rolling back the caller's transaction) if any is no longer ours."""
        sql = (
            "UPDATE jobs SET state='done', lease_owner=NULL, lease_until=NULL, last_error=NULL, updated=? "
            "WHERE id=? AND state='running' AND lease_owner=?"
        )
        now = utcnow()
        params = [(now, job.id, job.lease_owner) for job in jobs]

        def mark_done() -> None:
            done = self.conn.executemany(sql, params).rowcount
            if done != len(jobs):  # raised inside the transaction: it rolls back
                if len(jobs) == 1:
                    raise LeaseLost(f"job {jobs[0].id} is no longer leased to {jobs[0].lease_owner}")
                raise LeaseLost(f"{len(jobs) - done} of {len(jobs)} jobs are no longer leased to their owner")

        if in_transaction:
            mark_done()
        else:
            with transaction(self.conn):
                mark_done()

    def fail(
        self,
        job: Job,
        error: str,
        *,
        retry: bool = True,
        delay: float | None = None,
        raw_reply: str | None = None,
    ) -> JobState:
        """Record a failure: back off and retry, or dead-letter when attempts are spent or retry=False.

        Raises LeaseLost when the job is no longer ours: its new owner's work must not be marked failed
        or dead by a worker whose lease ran out."""
        dead = not retry or job.attempts >= job.max_attempts
        state = JobState.DEAD if dead else JobState.FAILED
        wait = 0.0 if dead else (delay if delay is not None else backoff_seconds(job.attempts))
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE jobs SET state=?, lease_owner=NULL, lease_until=NULL, last_error=?, "
                "raw_reply=COALESCE(?, raw_reply), not_before=?, updated=? "
                "WHERE id=? AND state='running' AND lease_owner=?",
                (
                    state.value,
                    error[:2000],
                    raw_reply,
                    self.clock() + wait,
                    utcnow(),
                    job.id,
                    job.lease_owner,
                ),
            )
        if cursor.rowcount == 0:
            raise LeaseLost(f"job {job.id} is no longer leased to {job.lease_owner}")
        return state

    def postpone(self, job: Job, delay: float, reason: str) -> None:
        """Give a job back without counting the attempt (e.g. the LLM breaker is open). Raises LeaseLost
        when the job is no longer ours."""
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE jobs SET state='pending', attempts=MAX(0, attempts-1), lease_owner=NULL, "
                "lease_until=NULL, not_before=?, last_error=?, updated=? "
                "WHERE id=? AND state='running' AND lease_owner=?",
                (self.clock() + delay, reason, utcnow(), job.id, job.lease_owner),
            )
        if cursor.rowcount == 0:
            raise LeaseLost(f"job {job.id} is no longer leased to {job.lease_owner}")

    def recover_expired(self) -> int:
        """Make jobs whose lease ran out claimable again (their worker crashed or hung)."""
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE jobs SET state='pending', lease_owner=NULL, lease_until=NULL, "
                "last_error=COALESCE(last_error, 'lease expired'), updated=? "
                "WHERE state='running' AND lease_until < ?",
                (utcnow(), self.clock()),
            )
        return cursor.rowcount

    def has_ready(self, kind: str) -> bool:
        """Whether a job of `kind` could be claimed now (one row of the jobs_ready index)."""
        return (
            self.conn.execute(
                "SELECT 1 FROM jobs INDEXED BY jobs_ready "
                "WHERE kind=? AND state IN ('pending','failed') AND not_before <= ? LIMIT 1",
                (kind, self.clock()),
            ).fetchone()
            is not None
        )

    def demand(self, kind: str, limit: int) -> int:
        """Jobs of `kind` claimable now or running, counted up to `limit`: how many workers they can use
        (bounded reads of the jobs_ready and jobs_claim indexes, however long the backlog)."""
        ready = self.conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM jobs INDEXED BY jobs_ready "
            "WHERE kind=? AND state IN ('pending','failed') AND not_before <= ? LIMIT ?)",
            (kind, self.clock(), limit),
        ).fetchone()[0]
        running = self.conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE state='running' AND kind=? LIMIT ?)",
            (kind, limit),
        ).fetchone()[0]
        return min(limit, ready + running)

    def recover_owner(self, owner_prefix: str, error: str) -> int:
        """The jobs of a worker process that died: claimable again at once with `error` and the attempt
        counted (the job may be what killed it), or dead once its attempts are spent."""
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE jobs SET state=CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'pending' END, "
                "lease_owner=NULL, lease_until=NULL, last_error=?, updated=? "
                "WHERE state='running' AND lease_owner LIKE ?",
                (error, utcnow(), owner_prefix + "%"),
            )
        return cursor.rowcount

    def release_owner(self, owner_prefix: str) -> int:
        """On shutdown: hand back every lease this process holds, without counting the attempt."""
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE jobs SET state='pending', attempts=MAX(0, attempts-1), lease_owner=NULL, "
                "lease_until=NULL, updated=? WHERE state='running' AND lease_owner LIKE ?",
                (utcnow(), owner_prefix + "%"),
            )
        return cursor.rowcount

    def requeue_dead(self, kind: str | None = None) -> int:
        """Operator action: give dead jobs a fresh set of attempts."""
        sql = "UPDATE jobs SET state='pending', attempts=0, not_before=0, updated=? WHERE state='dead'"
        params: list[Any] = [utcnow()]
        if kind:
            sql += " AND kind=?"
            params.append(kind)
        with transaction(self.conn):
            return self.conn.execute(sql, params).rowcount

    def state_of(self, key: str) -> tuple[str, str | None] | None:
        """(state, last error) of the job with this key, or None when there is none."""
        row = self.conn.execute("SELECT state, last_error FROM jobs WHERE key=?", (key,)).fetchone()
        return (row["state"], row["last_error"]) if row else None

    def has_pending(self, kind: str) -> bool:
        return (
            self.conn.execute(
                "SELECT 1 FROM jobs WHERE kind=? AND state='pending' LIMIT 1", (kind,)
            ).fetchone()
            is not None
        )

    def take_pending(self, kind: str) -> int:
        """Mark every pending job of `kind` done at once (requests that one action answers, such as
        "start a round now"). Returns how many there were."""
        with transaction(self.conn):
            return self.conn.execute(
                "UPDATE jobs SET state='done', updated=? WHERE kind=? AND state='pending'", (utcnow(), kind)
            ).rowcount

    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        result = {state.value: 0 for state in JobState}
        result.update({row[0]: row[1] for row in rows})
        return result

    def outstanding(self, kinds: list[str] | None = None) -> int:
        """Jobs not yet finished (pending, running or waiting to retry)."""
        sql = "SELECT COUNT(*) FROM jobs WHERE state IN ('pending','running','failed')"
        params: list[Any] = []
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            params = list(kinds)
        return self.conn.execute(sql, params).fetchone()[0]
