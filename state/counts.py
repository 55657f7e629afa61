"""Counts of everything the daemon tracks, read in one pass for the metrics file (no model, no Milvus)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class StateCounts:
    documents: dict[str, int] = field(default_factory=dict)  # by status
    chunks: dict[str, int] = field(default_factory=dict)  # active / retired
    samples: dict[str, int] = field(default_factory=dict)  # kept / dropped / unfiltered
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, state)
    rounds: dict[str, int] = field(default_factory=dict)  # by decision, or "aborted" / "running"
    last_round_seconds: float | None = None
    model_version: int = 0  # 0: the base model serves
    breaker: str = "closed"
    index_chunks: int | None = None  # chunks in the live collection at its last sync


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def read_counts(conn: sqlite3.Connection) -> StateCounts:
    counts = StateCounts()
    counts.documents = {s: 0 for s in ("pending", "ingested", "rejected", "deleted")}
    counts.documents.update(dict(conn.execute("SELECT status, COUNT(*) FROM documents GROUP BY status")))
    counts.chunks = {"active": 0, "retired": 0}
    for active, n in conn.execute("SELECT active, COUNT(*) FROM chunks GROUP BY active"):
        counts.chunks["active" if active else "retired"] = n
    kept, dropped, unfiltered = conn.execute(
        "SELECT SUM(kept = 1), SUM(kept = 0), SUM(kept IS NULL) FROM samples"
    ).fetchone()
    counts.samples = {
        "kept": int(kept or 0),
        "dropped": int(dropped or 0),
        "unfiltered": int(unfiltered or 0),
    }
    counts.jobs = {
        (kind, state): n
        for kind, state, n in conn.execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY 1, 2")
    }
    for state, decision, n in conn.execute("SELECT state, decision, COUNT(*) FROM rounds GROUP BY 1, 2"):
        key = decision if state == "finished" and decision else state
        counts.rounds[key] = counts.rounds.get(key, 0) + n
    last = conn.execute(
        "SELECT started, finished FROM rounds WHERE state = 'finished' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if last is not None:
        counts.last_round_seconds = _seconds_between(last[0], last[1])
    model = conn.execute(
        "SELECT id FROM models WHERE promoted_at IS NOT NULL AND retired_at IS NULL "
        "ORDER BY promoted_at DESC, id DESC LIMIT 1"
    ).fetchone()
    counts.model_version = int(model[0]) if model else 0
    daemon = conn.execute("SELECT breaker FROM daemon WHERE id = 1").fetchone()
    counts.breaker = daemon[0] if daemon else "closed"
    live = conn.execute("SELECT chunks FROM index_collections WHERE state = 'live'").fetchone()
    counts.index_chunks = int(live[0]) if live else None
    return counts
