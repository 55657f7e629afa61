"""The teacher's judgements as durable data: (teacher id, query text hash, chunk text hash) -> score.

Scoring is the slow part of labelling (a cross-encoder reads every candidate pair), and the same pairs
come back round after round: the queries of a growing folder stay, and so do most of their candidates.
Keys are content hashes, so an edited chunk is judged afresh and an unchanged one never is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from state.db import transaction

PairKey = tuple[str, str]  # (query hash, chunk hash)
# SQLite's default limit on bound parameters is 32766 (>= 3.32); stay well below it.
_LOOKUP_CHUNK = 400


class TeacherScoreStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def get_many(self, teacher_id: str, keys: Sequence[PairKey]) -> dict[PairKey, float]:
        """The stored scores among `keys` (missing pairs are absent from the result)."""
        found: dict[PairKey, float] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            part = unique[start : start + _LOOKUP_CHUNK]
            rows = self.conn.execute(
                "SELECT query_hash, chunk_hash, score FROM teacher_scores WHERE teacher_id = ? AND "
                f"(query_hash, chunk_hash) IN (VALUES {', '.join(['(?, ?)'] * len(part))})",
                [teacher_id, *(h for key in part for h in key)],
            ).fetchall()
            found.update({(row[0], row[1]): float(row[2]) for row in rows})
        return found

    def put_many(self, teacher_id: str, scores: Iterable[tuple[PairKey, float]]) -> int:
        """Store one batch in one transaction (a kill between batches loses at most the batch in hand)."""
        rows = [(teacher_id, q, c, float(score)) for (q, c), score in scores]
        with transaction(self.conn):
            self.conn.executemany(
                "INSERT OR REPLACE INTO teacher_scores (teacher_id, query_hash, chunk_hash, score) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def count(self, teacher_id: str | None = None) -> int:
        if teacher_id is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM teacher_scores").fetchone()[0])
        return int(
            self.conn.execute(
                "SELECT COUNT(*) FROM teacher_scores WHERE teacher_id = ?", (teacher_id,)
            ).fetchone()[0]
        )
