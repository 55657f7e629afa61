"""Training samples: stored once per (chunk, kind, query), filtered later, used by rounds."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from state.db import transaction, utcnow
from state.queue import Job, JobQueue

FILTER_KEY = "filter"


@dataclass(frozen=True)
class SampleIn:
    query: str
    kind: str
    passage: str | None
    judge_score: float | None
    reason: str | None
    parent: str | None = None


class SampleStore:
    def __init__(self, conn: sqlite3.Connection, queue: JobQueue | None = None) -> None:
        self.conn = conn
        self.queue = queue or JobQueue(conn)

    def chunk(self, chunk_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM chunks WHERE id=?", (chunk_id,)).fetchone()

    def chunks(self, chunk_ids: Sequence[int]) -> dict[int, sqlite3.Row]:
        """Chunk rows by id, in one query (a batch of synthesis jobs)."""
        marks = ",".join("?" * len(chunk_ids))
        rows = self.conn.execute(f"SELECT * FROM chunks WHERE id IN ({marks})", list(chunk_ids)).fetchall()
        return {row["id"]: row for row in rows}

    def store_candidates(
        self, job: Job, chunk: sqlite3.Row, candidates: Sequence[SampleIn], judge_threshold: float
    ) -> int:
        """Insert the chunk's pairs and finish its job in one transaction; a re-run inserts nothing new."""
        return self.store_many([(job, chunk, candidates)], judge_threshold)

    def store_many(
        self,
        made: Sequence[tuple[Job, sqlite3.Row | None, Sequence[SampleIn]]],
        judge_threshold: float,
    ) -> int:
        """Several jobs' pairs (job, its chunk or None when gone, candidates) and their completion in one
        transaction, with one filter job armed for all of them. Returns the pairs added."""
        now = utcnow()
        added = 0
        with transaction(self.conn):
            for _job, chunk, candidates in made:
                if chunk is not None:
                    added += self._insert_candidates(chunk, candidates, judge_threshold, now)
            self.queue.complete_many([job for job, _chunk, _candidates in made], in_transaction=True)
            if added:
                self.queue.enqueue(
                    "filter",
                    FILTER_KEY,
                    {},
                    priority=60,
                    delay=2.0,
                    requeue_finished=True,
                    in_transaction=True,
                )
        return added

    def _insert_candidates(
        self, chunk: sqlite3.Row, candidates: Sequence[SampleIn], judge_threshold: float, now: str
    ) -> int:
        added = 0
        parents: dict[str, int] = {}
        for candidate in sorted(candidates, key=lambda c: c.kind != "question"):
            kept, reason = None, candidate.reason
            if reason is not None:
                kept = 0
            elif candidate.judge_score is not None and candidate.judge_score < judge_threshold:
                kept, reason = 0, f"judge score {candidate.judge_score:.2f} < {judge_threshold}"
            row = self.conn.execute(
                "INSERT INTO samples (chunk_id, query, kind, parent_id, passage, split, judge_score, kept, "
                "reason, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(chunk_id, kind, query) DO NOTHING RETURNING id",
                (
                    chunk["id"],
                    candidate.query,
                    candidate.kind,
                    parents.get(candidate.parent or ""),
                    candidate.passage,
                    chunk["split"],
                    candidate.judge_score,
                    kept,
                    reason,
                    now,
                ),
            ).fetchone()
            if row is not None:
                added += 1
                if candidate.kind == "question":
                    parents[candidate.query] = row[0]
        return added

    def unfiltered(self, limit: int) -> list[sqlite3.Row]:
        return self.conn.execute(
            "SELECT s.id, s.query, s.passage, s.chunk_id, s.split, c.text AS chunk_text, c.sha256 AS chunk_sha, "
            "c.active FROM samples s JOIN chunks c ON c.id = s.chunk_id WHERE s.kept IS NULL "
            "ORDER BY s.id LIMIT ?",
            (limit,),
        ).fetchall()

    def finish_filter_pass(self, job: Job) -> None:
        """Complete this filter pass and, while pairs still wait, arm the next one in the same
        transaction: there is never a moment with unfiltered pairs and no filter job to take them."""
        with transaction(self.conn):
            self.queue.complete(job, in_transaction=True)
            self._arm_filter_if_waiting()

    def arm_filter(self) -> None:
        """At start-up: pairs may wait with no filter job (a migration re-opened them)."""
        with transaction(self.conn):
            self._arm_filter_if_waiting()

    def _arm_filter_if_waiting(self) -> None:
        if self.conn.execute("SELECT 1 FROM samples WHERE kept IS NULL LIMIT 1").fetchone():
            self.queue.enqueue(
                "filter", FILTER_KEY, {}, priority=60, requeue_finished=True, in_transaction=True
            )

    def keep_unranked(self, sample_ids: Sequence[int]) -> None:
        """Held-out pairs with no independent scorer: kept without a rank (the model in service is the
        model the held-out set judges, so it must not choose the set's queries)."""
        with transaction(self.conn):
            self.conn.executemany(
                "UPDATE samples SET kept=1, reason=NULL WHERE id=? AND kept IS NULL",
                [(sid,) for sid in sample_ids],
            )

    def record_filter(self, results: Sequence) -> None:
        with transaction(self.conn):
            self.conn.executemany(
                "UPDATE samples SET kept=?, rank=?, bm25_score=?, rerank_score=?, reason=? "
                "WHERE id=? AND kept IS NULL",
                [(int(r.kept), r.rank, r.bm25_score, r.rerank_score, r.reason, r.sample_id) for r in results],
            )

    def drop_inactive(self, sample_ids: Sequence[int]) -> None:
        with transaction(self.conn):
            self.conn.executemany(
                "UPDATE samples SET kept=0, reason='source retired' WHERE id=? AND kept IS NULL",
                [(sid,) for sid in sample_ids],
            )

    def active_chunks(self) -> list[sqlite3.Row]:
        return self.conn.execute(
            "SELECT id, text, heading, sha256, language, split, document_id FROM chunks WHERE active=1 "
            "ORDER BY id"
        ).fetchall()

    def unused_train_count(self) -> int:
        return count_unused_train(self.conn)

    def kept_count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM samples WHERE kept=1").fetchone()[0]

    def dropped_count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM samples WHERE kept=0").fetchone()[0]

    def kept_train_count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM samples WHERE kept=1 AND split='train'").fetchone()[0]


def count_unused_train(conn: sqlite3.Connection) -> int:
    """Kept training pairs no round has used yet: what `training.min_new_samples` is compared with.
    The one count (the scheduler, `status`, `train` and `once` all ask here)."""
    return conn.execute(
        "SELECT COUNT(*) FROM samples WHERE kept=1 AND split='train' AND round_id IS NULL"
    ).fetchone()[0]


def kept_pairs_sample(
    conn: sqlite3.Connection, n_passages: int, n_queries: int
) -> tuple[list[str], list[str], list[int]]:
    """The texts an ONNX export is checked on (stages/backend_check.py): kept held-out queries whose chunk
    is active, those chunks, and a spread of other active chunks up to `n_passages`. Returns (passages,
    queries, index of each query's chunk in passages). Ordered by a multiplicative hash of the id, so
    the sample spreads over the corpus and is the same on a rerun."""
    heldout = conn.execute(
        "SELECT s.query, c.id, c.text FROM samples s JOIN chunks c ON c.id=s.chunk_id "
        "WHERE s.kept=1 AND s.split='heldout' AND c.active=1 "
        "ORDER BY (s.id * 2654435761) % 4294967296 LIMIT ?",
        (n_queries,),
    ).fetchall()
    texts = {row["id"]: row["text"] for row in heldout}
    ids = list(texts)
    others = conn.execute(
        "SELECT id, text FROM chunks WHERE active=1 ORDER BY (id * 2654435761) % 4294967296 LIMIT ?",
        (n_passages,),
    )
    for row in others:
        if len(ids) >= n_passages:
            break
        if row["id"] not in texts:
            texts[row["id"]] = row["text"]
            ids.append(row["id"])
    where = {chunk_id: i for i, chunk_id in enumerate(ids)}
    return [texts[i] for i in ids], [row["query"] for row in heldout], [where[row["id"]] for row in heldout]
