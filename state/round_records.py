"""Round records: what a round starts from (its snapshot), its stage and progress for `status`, and all
numbers, the decision and its machine-readable cause at the end."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from state.db import transaction, utcnow


class RoundState(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class RoundOutcome(StrEnum):
    PROMOTED = "promoted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class CorpusChunk:
    """An active chunk as a round sees it."""

    id: int
    document_id: int
    text: str
    heading: str
    sha256: str
    split: str  # train | heldout (by document)


@dataclass(frozen=True)
class TrainSample:
    id: int
    query: str
    passage: str  # the chunk's text, or the sample's own positive (inverse cloze)
    chunk_id: int
    kind: str


@dataclass(frozen=True)
class HeldoutSample:
    id: int
    query: str
    chunk_id: int
    kind: str
    passage: str | None = None  # the pair's positive when it is not the whole chunk (inverse cloze)


@dataclass(frozen=True)
class RoundInputs:
    """Everything a round reads from the database, read once at its start."""

    corpus: list[CorpusChunk]
    train: list[TrainSample]
    heldout: list[HeldoutSample]


class RoundStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def running(self) -> sqlite3.Row | None:
        return self.conn.execute(
            "SELECT * FROM rounds WHERE state='running' ORDER BY id DESC LIMIT 1"
        ).fetchone()

    def get(self, round_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM rounds WHERE id=?", (round_id,)).fetchone()

    def create(self, trigger: str, base_model: str) -> int:
        with transaction(self.conn):
            if self.running() is not None:
                raise RuntimeError("a round is already running")
            return self.conn.execute(
                "INSERT INTO rounds (started, state, stage, trigger, base_model) VALUES (?, 'running', "
                "'snapshot', ?, ?) RETURNING id",
                (utcnow(), trigger, base_model),
            ).fetchone()[0]

    def set_pid(self, round_id: int, pid: int) -> None:
        with transaction(self.conn):
            self.conn.execute("UPDATE rounds SET pid=? WHERE id=?", (pid, round_id))

    def set_stage(self, round_id: int, stage: str, **progress: Any) -> None:
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE rounds SET stage=?, progress=? WHERE id=? AND state='running'",
                (stage, json.dumps(progress), round_id),
            )

    def update(self, round_id: int, **fields: Any) -> None:
        columns = ", ".join(f"{key}=?" for key in fields)
        values = [json.dumps(v) if isinstance(v, dict | list) else v for v in fields.values()]
        with transaction(self.conn):
            self.conn.execute(f"UPDATE rounds SET {columns} WHERE id=?", (*values, round_id))

    def finish(
        self,
        round_id: int,
        decision: RoundOutcome,
        reason: str,
        model_id: int | None,
        used_sample_ids: list[int],
        cause: str | None = None,
    ) -> None:
        """Record the decision. `cause` is the machine-readable reason of a rejection (an identifier
        such as "below_min_gain"); `reason` is the sentence for people."""
        with transaction(self.conn):
            self.write_finish(round_id, decision, reason, model_id, used_sample_ids, cause)

    def write_finish(
        self,
        round_id: int,
        decision: RoundOutcome,
        reason: str,
        model_id: int | None,
        used_sample_ids: list[int],
        cause: str | None = None,
    ) -> None:
        """`finish` inside the caller's open transaction: a promotion commits the round's decision and
        its used pairs with the registry's serving row, so a kill cannot serve a model whose round
        reads 'aborted' and whose pairs count as new."""
        self.conn.execute(
            "UPDATE rounds SET state='finished', stage='done', finished=?, decision=?, reason=?, model_id=?, "
            "cause=? WHERE id=? AND state='running'",
            (utcnow(), RoundOutcome(decision).value, reason, model_id, cause, round_id),
        )
        self.conn.executemany(
            "UPDATE samples SET round_id=? WHERE id=? AND round_id IS NULL",
            [(round_id, sid) for sid in used_sample_ids],
        )

    def write_trial_promotion(self, round_id: int, model_id: int, said: str) -> None:
        """A rejected round's candidate won its interleaved trial (daemon/trials.py): the round now reads
        promoted, its first reason kept before what the trial found; inside the caller's transaction."""
        self.conn.execute(
            "UPDATE rounds SET decision=?, model_id=?, cause=NULL, reason=reason || '; then ' || ? "
            "WHERE id=? AND state='finished'",
            (RoundOutcome.PROMOTED.value, model_id, said, round_id),
        )

    def abort(self, round_id: int, error: str) -> bool:
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE rounds SET state='aborted', finished=?, error=? WHERE id=? AND state='running'",
                (utcnow(), error[:2000], round_id),
            )
        return cursor.rowcount > 0

    def set_hook(self, round_id: int, outcome: dict[str, Any]) -> None:
        """What the on_promote hook did (command, exit code, stderr tail), shown by `status`."""
        with transaction(self.conn):
            self.conn.execute("UPDATE rounds SET hook=? WHERE id=?", (json.dumps(outcome), round_id))

    def running_rounds(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT id, pid, stage FROM rounds WHERE state='running'").fetchall()

    def all(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM rounds ORDER BY id").fetchall()

    def inputs(self, max_pairs: int, max_heldout: int = -1) -> RoundInputs:
        """The active corpus, the kept training samples (not yet used first, newest first, up to
        max_pairs) and the kept held-out samples whose chunk is still active: all of them, or a fixed
        spread-out sample of `max_heldout` (ordered by a multiplicative hash of the id, so consecutive
        rounds judge on nearly the same queries and new documents still enter the sample)."""
        corpus = [
            CorpusChunk(r["id"], r["document_id"], r["text"], r["heading"] or "", r["sha256"], r["split"])
            for r in self.conn.execute(
                "SELECT id, document_id, text, heading, sha256, split FROM chunks WHERE active=1 ORDER BY id"
            )
        ]
        train = [
            TrainSample(r["id"], r["query"], r["passage"], r["chunk_id"], r["kind"])
            for r in self.conn.execute(
                "SELECT s.id, s.query, COALESCE(s.passage, c.text) AS passage, s.chunk_id, s.kind "
                "FROM samples s JOIN chunks c ON c.id=s.chunk_id WHERE s.kept=1 AND s.split='train' "
                "ORDER BY s.round_id IS NOT NULL, s.id DESC LIMIT ?",
                (max_pairs,),
            )
        ]
        heldout = [
            HeldoutSample(r["id"], r["query"], r["chunk_id"], r["kind"], r["passage"])
            for r in self.conn.execute(
                "SELECT s.id, s.query, s.chunk_id, s.kind, s.passage FROM samples s JOIN chunks c ON c.id=s.chunk_id "
                "WHERE s.kept=1 AND s.split='heldout' AND c.active=1 "
                "ORDER BY (s.id * 2654435761) % 4294967296 LIMIT ?",
                (max_heldout,),
            )
        ]
        return RoundInputs(corpus, train, heldout)
