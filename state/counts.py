"""Counts of everything the daemon tracks, read in one pass for the metrics file (no model, no Milvus)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime

from state.registry import current_model_row


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
    # held-out nDCG@10 of the model that served after the last finished round, by retrieval
    # ("dense": the model alone; "hybrid": as the index serves it)
    served_scores: dict[str, float] = field(default_factory=dict)


def served_after(row: sqlite3.Row) -> dict[str, dict]:
    """A finished round's metrics (set -> metric -> value) of the model that served after its decision:
    the promoted variant, or the model in service when the round was rejected."""
    current = json.loads(row["current_metrics"] or "{}")
    if row["decision"] != "promoted" or not row["eval_sets"]:
        return current
    best = json.loads(row["eval_sets"]).get("best")
    variants = {
        "candidate": json.loads(row["candidate_metrics"] or "{}"),
        **json.loads(row["merged_metrics"] or "{}"),
    }
    return variants.get(best, current)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


# --- the table counts status, metrics and the one-shot progress all read (one query each) ----------------
def documents_by_status(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {s: 0 for s in ("pending", "ingested", "rejected", "deleted")}
    counts.update(dict(conn.execute("SELECT status, COUNT(*) FROM documents GROUP BY status")))
    return counts


def chunks_by_activity(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {"active": 0, "retired": 0}
    for active, n in conn.execute("SELECT active, COUNT(*) FROM chunks GROUP BY active"):
        counts["active" if active else "retired"] = n
    return counts


def samples_by_outcome(conn: sqlite3.Connection) -> dict[str, int]:
    """Kept, dropped by the filter, and not filtered yet."""
    row = conn.execute("SELECT SUM(kept = 1), SUM(kept = 0), SUM(kept IS NULL) FROM samples").fetchone()
    return dict(zip(("kept", "dropped", "unfiltered"), (int(value or 0) for value in row), strict=True))


def jobs_by_kind_and_state(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {
        (kind, state): n
        for kind, state, n in conn.execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY 1, 2")
    }


def read_counts(conn: sqlite3.Connection) -> StateCounts:
    counts = StateCounts()
    counts.documents = documents_by_status(conn)
    counts.chunks = chunks_by_activity(conn)
    counts.samples = samples_by_outcome(conn)
    counts.jobs = jobs_by_kind_and_state(conn)
    for state, decision, n in conn.execute("SELECT state, decision, COUNT(*) FROM rounds GROUP BY 1, 2"):
        key = decision if state == "finished" and decision else state
        counts.rounds[key] = counts.rounds.get(key, 0) + n
    last = conn.execute(
        "SELECT started, finished FROM rounds WHERE state = 'finished' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if last is not None:
        counts.last_round_seconds = _seconds_between(last[0], last[1])
    model = current_model_row(conn)
    counts.model_version = int(model["id"]) if model else 0
    daemon = conn.execute("SELECT breaker FROM daemon WHERE id = 1").fetchone()
    counts.breaker = daemon[0] if daemon else "closed"
    finished = conn.execute(
        "SELECT * FROM rounds WHERE state = 'finished' AND current_metrics IS NOT NULL ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if finished is not None:
        metrics = served_after(finished)
        for retrieval, name in (("dense", "heldout"), ("hybrid", "heldout+served")):
            value = (metrics.get(name) or {}).get("ndcg@10")
            if isinstance(value, int | float):
                counts.served_scores[retrieval] = float(value)
    live = conn.execute("SELECT chunks FROM index_collections WHERE state = 'live'").fetchone()
    counts.index_chunks = int(live[0]) if live else None
    return counts
