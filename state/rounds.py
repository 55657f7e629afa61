"""Round records: stage and progress for `status`, all numbers and the decision at the end."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from state.db import transaction, utcnow


class RoundStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def running(self) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM rounds WHERE state='running' ORDER BY id DESC LIMIT 1").fetchone()

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

    def finish(self, round_id: int, decision: str, reason: str, model_id: int | None,
               used_sample_ids: list[int]) -> None:
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE rounds SET state='finished', stage='done', finished=?, decision=?, reason=?, model_id=? "
                "WHERE id=? AND state='running'",
                (utcnow(), decision, reason, model_id, round_id),
            )
            self.conn.executemany(
                "UPDATE samples SET round_id=? WHERE id=? AND round_id IS NULL",
                [(round_id, sid) for sid in used_sample_ids],
            )

    def abort(self, round_id: int, error: str) -> bool:
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE rounds SET state='aborted', finished=?, error=? WHERE id=? AND state='running'",
                (utcnow(), error[:2000], round_id),
            )
        return cursor.rowcount > 0

    def snapshot_rows(self, max_pairs: int) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
        """Kept training samples (not yet used first, newest first, up to max_pairs) and all kept held-out
        samples whose chunk is still active."""
        train = self.conn.execute(
            "SELECT s.id, s.query, COALESCE(s.passage, c.text) AS passage, s.chunk_id, s.kind, s.round_id "
            "FROM samples s JOIN chunks c ON c.id=s.chunk_id WHERE s.kept=1 AND s.split='train' "
            "ORDER BY s.round_id IS NOT NULL, s.id DESC LIMIT ?",
            (max_pairs,),
        ).fetchall()
        heldout = self.conn.execute(
            "SELECT s.id, s.query, s.chunk_id, s.kind FROM samples s JOIN chunks c ON c.id=s.chunk_id "
            "WHERE s.kept=1 AND s.split='heldout' AND c.active=1 ORDER BY s.id"
        ).fetchall()
        return train, heldout
