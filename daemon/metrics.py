"""Prometheus metrics in node_exporter's textfile format: the daemon rewrites one `.prom` file atomically
(prometheus_client writes a temporary file and renames it), so monitoring needs no port of ours and a
scrape never reads half a file. Point `metrics.textfile` into node_exporter's textfile directory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from state.counts import read_counts

BREAKER_STATES = ("closed", "open", "half-open")


def build_registry(conn: sqlite3.Connection, up: bool = True) -> CollectorRegistry:
    counts = read_counts(conn)
    registry = CollectorRegistry()

    def gauge(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"embedtune_{name}", help_text, labels, registry=registry)

    gauge("up", "1 while the daemon runs; 0 once it stopped cleanly").set(1 if up else 0)
    documents = gauge("documents", "documents by state", ("state",))
    for state, n in counts.documents.items():
        documents.labels(state).set(n)
    chunks = gauge("chunks", "chunks by state", ("state",))
    for state, n in counts.chunks.items():
        chunks.labels(state).set(n)
    samples = gauge("samples", "training samples by filter state", ("state",))
    for state, n in counts.samples.items():
        samples.labels(state).set(n)
    jobs = gauge("jobs", "queued jobs by kind and state", ("kind", "state"))
    for (kind, state), n in counts.jobs.items():
        jobs.labels(kind, state).set(n)
    rounds = gauge("rounds", "training rounds by decision (promoted, rejected) or state", ("decision",))
    for decision, n in counts.rounds.items():
        rounds.labels(decision).set(n)
    if counts.last_round_seconds is not None:
        gauge("last_round_duration_seconds", "wall time of the last finished round").set(
            counts.last_round_seconds
        )
    gauge("model_version", "registry id of the model in service (0: the base model)").set(
        counts.model_version
    )
    breaker = gauge("llm_breaker_state", "1 for the LLM circuit breaker's current state", ("state",))
    for state in BREAKER_STATES:
        breaker.labels(state).set(1 if counts.breaker == state else 0)
    if counts.index_chunks is not None:
        gauge("index_chunks", "chunks in the live vector-store collection at its last sync").set(
            counts.index_chunks
        )
    if counts.served_scores:
        served = gauge(
            "heldout_ndcg_at_10",
            "held-out nDCG@10 of the model in service at the last round: the model alone (dense) and as "
            "the index serves it (hybrid)",
            ("retrieval",),
        )
        for retrieval, value in counts.served_scores.items():
            served.labels(retrieval).set(value)
    return registry


def write_metrics(conn: sqlite3.Connection, path: Path, up: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), build_registry(conn, up))
