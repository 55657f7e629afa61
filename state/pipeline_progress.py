"""Counts that show how far the pipeline has come: the one-shot command's progress bars and its stop
condition, and the report's charts."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from state.counts import documents_by_status, jobs_by_kind_and_state, samples_by_outcome


@dataclass(frozen=True)
class PipelineProgress:
    documents_done: int
    documents_total: int
    synthesized: int
    synthesize_jobs: int
    filtered: int
    samples: int
    busy_jobs: int  # pending, running or waiting to retry, round requests aside


def pipeline_progress(conn: sqlite3.Connection) -> PipelineProgress:
    documents = documents_by_status(conn)
    jobs = jobs_by_kind_and_state(conn)
    samples = samples_by_outcome(conn)
    synthesize = {state: n for (kind, state), n in jobs.items() if kind == "synthesize"}
    busy = sum(
        n
        for (kind, state), n in jobs.items()
        if state in ("pending", "running", "failed") and kind != "round_request"
    )
    return PipelineProgress(
        documents_done=sum(documents.values()) - documents["pending"],
        documents_total=sum(documents.values()),
        synthesized=synthesize.get("done", 0) + synthesize.get("dead", 0),
        synthesize_jobs=sum(synthesize.values()),
        filtered=samples["kept"] + samples["dropped"],
        samples=sum(samples.values()),
        busy_jobs=busy,
    )


@dataclass(frozen=True)
class ReportData:
    rounds: list[sqlite3.Row]
    growth: list[sqlite3.Row]  # (day, documents ingested that day)
    funnel: list[int]  # generated, judged, filtered, kept
    active_chunks: int


def report_data(conn: sqlite3.Connection) -> ReportData:
    rounds = conn.execute("SELECT * FROM rounds ORDER BY id").fetchall()
    growth = conn.execute(
        "SELECT substr(first_seen, 1, 10) AS day, COUNT(*) AS n FROM documents WHERE status='ingested' "
        "GROUP BY day ORDER BY day"
    ).fetchall()
    funnel = conn.execute(
        "SELECT COUNT(*), SUM(judge_score IS NOT NULL OR kind='pseudo'), "
        "SUM(kept IS NOT NULL AND (reason IS NULL OR reason NOT LIKE 'judge score%')), SUM(kept=1) FROM samples"
    ).fetchone()
    chunks = conn.execute("SELECT COUNT(*) FROM chunks WHERE active=1").fetchone()[0]
    return ReportData(rounds, growth, [int(v or 0) for v in funnel], int(chunks))
