"""Counts that show how far the pipeline has come: the one-shot command's progress bars and its stop
condition, and the report's charts."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass


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
    documents = conn.execute("SELECT SUM(status != 'pending'), COUNT(*) FROM documents").fetchone()
    synthesis = conn.execute(
        "SELECT SUM(state IN ('done','dead')), COUNT(*) FROM jobs WHERE kind='synthesize'"
    ).fetchone()
    samples = conn.execute("SELECT SUM(kept IS NOT NULL), COUNT(*) FROM samples").fetchone()
    busy = conn.execute(
        "SELECT COUNT(*) FROM jobs WHERE state IN ('pending','running','failed') AND kind != 'round_request'"
    ).fetchone()[0]
    values = [int(v or 0) for v in (*documents, *synthesis, *samples)]
    return PipelineProgress(*values, busy_jobs=int(busy))


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
