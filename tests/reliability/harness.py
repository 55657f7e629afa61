"""Shared machinery of the reliability campaigns: the daemon as a real child process, and the invariants
that must hold after anything we throw at it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def campaign_scale() -> str:
    """'full' under EMBEDTUNE_CAMPAIGN=full (the figures in docs/reliability.md), else the CI-sized run."""
    return os.environ.get("EMBEDTUNE_CAMPAIGN", "reduced")


def write_config(path: Path, tmp: Path, model: Path, llm_url: str = "", extra: dict | None = None) -> Path:
    sections = {
        "paths": {"inbox": str(tmp / "inbox"), "state_dir": str(tmp / "state")},
        "ingest": {"settle_seconds": 0.2, "chunk_tokens": 64, "chunk_overlap": 8, "rescan_minutes": 0},
        "llm": {
            "url": llm_url,
            "max_retries": 2,
            "timeout_s": 2.0,
            "breaker_failures": 3,
            "breaker_reset_s": 1.0,
            "concurrency": 4,
        },
        "synthesis": {"featured_percentage": 1.0, "heldout_fraction": 0.2},
        # torch, as tests/conftest.py: ONNX exports have their own tests (tests/test_onnx_jobs.py)
        "model": {"base": str(model), "device": "cpu", "backend": "torch"},
        "training": {
            "min_new_samples": 30,
            "check_minutes": 0.02,
            "batch_size": 8,
            "hard_negatives": 1,
            "learning_rate": 1e-3,
            "max_pairs": 128,
        },
        "promotion": {
            "min_gain": 0.0,
            "merge_weights": [0.5],
            "bootstrap_samples": 50,
            "synthetic_only_min_gain": 0.0,
        },
        "logging": {"format": "json", "level": "info"},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    (tmp / "inbox").mkdir(exist_ok=True)
    return path


class DaemonProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        handle = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "--config", str(self.config), "run"],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 90) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")


def db(state_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{state_dir / 'embedtune.db'}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def query(state_dir: Path, sql: str, *params):
    if not (state_dir / "embedtune.db").exists():
        return []
    conn = db(state_dir)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def scalar(state_dir: Path, sql: str, *params):
    rows = query(state_dir, sql, *params)
    return rows[0][0] if rows else None


def settled(state_dir: Path) -> bool:
    """Nothing outstanding: no job waiting or running, no round running."""
    outstanding = scalar(state_dir, "SELECT COUNT(*) FROM jobs WHERE state IN ('pending','running','failed')")
    running = scalar(state_dir, "SELECT COUNT(*) FROM rounds WHERE state='running'")
    return outstanding == 0 and running == 0


def wait(predicate, timeout: float, message: str, interval: float = 0.25):
    return wait_for(predicate, timeout, interval, message)


def reference_chunks(settings, files: list[Path]) -> dict[str, list[str]]:
    """What a clean, single ingestion of each file gives."""
    from daemon.ingest import Chunker
    from stages.extract import ExtractionError, extract, read_checked

    chunker = Chunker(
        settings.model.base,
        settings.ingest.chunk_tokens,
        settings.ingest.chunk_overlap,
        settings.ingest.min_chunk_chars,
    )
    out = {}
    for path in files:
        try:
            sections = extract(path, read_checked(path, 50 * 1024 * 1024)).sections
        except ExtractionError:
            continue
        out[str(path)] = [chunk.text for chunk in chunker(sections)]
    return out


def check_invariants(settings, files: list[Path], expected_pairs=None) -> dict:
    """The promises: every file once per content version, every chunk its pairs once, no job lost or
    stuck, rounds finished or aborted, models/current whole and matching the registry."""
    state = settings.paths.state_dir
    reference = reference_chunks(settings, files)
    stored: dict[str, list[str]] = {}
    for row in query(
        state,
        "SELECT d.path, c.text FROM chunks c JOIN documents d ON d.id=c.document_id "
        "WHERE c.active=1 ORDER BY d.path, c.ordinal",
    ):
        stored.setdefault(row["path"], []).append(row["text"])
    missing = sorted(set(reference) - set(stored))
    assert not missing, f"files never ingested: {missing[:5]}"
    for path, chunks in reference.items():
        assert stored[path] == chunks, f"{path}: stored chunks differ from a clean chunking"
    assert scalar(state, "SELECT COUNT(*) FROM documents WHERE status='pending'") == 0
    versions = query(
        state,
        "SELECT document_id, COUNT(DISTINCT version) AS n FROM chunks WHERE active=1 "
        "GROUP BY document_id HAVING n > 1",
    )
    assert not versions, "a document has two active versions"
    jobs = dict(query(state, "SELECT state, COUNT(*) FROM jobs WHERE kind != 'round_request' GROUP BY state"))
    assert jobs.get("running", 0) == 0 and jobs.get("pending", 0) == 0 and jobs.get("failed", 0) == 0, jobs
    assert jobs.get("dead", 0) == 0, query(state, "SELECT kind, last_error FROM jobs WHERE state='dead'")
    chunk_ids = [r[0] for r in query(state, "SELECT id FROM chunks WHERE active=1")]
    synth = {
        r[0]
        for r in query(
            state,
            "SELECT json_extract(payload, '$.chunk_id') FROM jobs WHERE kind='synthesize' AND state='done'",
        )
    }
    assert set(chunk_ids) <= synth, "an active chunk has no finished synthesize job"
    counts = {r[0]: r[1] for r in query(state, "SELECT chunk_id, COUNT(*) FROM samples GROUP BY chunk_id")}
    duplicates = query(
        state,
        "SELECT chunk_id, kind, query, COUNT(*) FROM samples GROUP BY chunk_id, kind, query "
        "HAVING COUNT(*) > 1",
    )
    assert not duplicates
    if expected_pairs is not None:
        texts = dict(query(state, "SELECT id, text FROM chunks WHERE active=1"))
        for chunk_id in chunk_ids:
            assert counts.get(chunk_id, 0) == expected_pairs(texts[chunk_id]), f"chunk {chunk_id} pairs"
    rounds = dict(query(state, "SELECT state, COUNT(*) FROM rounds GROUP BY state"))
    assert set(rounds) <= {"finished", "aborted"}, rounds
    current = state / "models" / "current"
    promoted = scalar(
        state,
        "SELECT path FROM models WHERE promoted_at IS NOT NULL AND retired_at IS NULL "
        "ORDER BY promoted_at DESC LIMIT 1",
    )
    if promoted:
        assert current.exists() and current.resolve() == Path(promoted).resolve()
    else:  # the base model serves: the link names its folder (or is absent when no daemon started)
        assert not current.exists() or current.resolve().parent != (state / "models" / "versions").resolve()
    if current.exists():
        from sentence_transformers import SentenceTransformer

        assert SentenceTransformer(str(current), device="cpu").encode(["check"]).shape[0] == 1
    integrity = scalar(state, "PRAGMA integrity_check")
    assert integrity == "ok", integrity
    return {
        "documents": len(stored),
        "chunks": len(chunk_ids),
        "samples": sum(counts.values()),
        "rounds": rounds,
        "jobs": jobs,
    }
