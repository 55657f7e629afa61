"""Synthesis throughput against the local LLM test server with a fixed latency.

Runs the daemon's real synthesize pool (worker threads, SQLite queue, LLM client) over a batch of chunks
at several concurrencies and prints requests/s and pairs/s beside the ideal (concurrency / latency).

    python -m bench.synthesis [--latency 0.2] [--chunks 200] [--concurrency 1 4 16 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from daemon.logs import configure_logging
from daemon.settings import Settings
from daemon.synthesis import SynthesisService
from daemon.workers import WorkerPool
from stages.llm import CircuitBreaker
from state.db import Database
from state.documents import DocumentStore, NewChunk
from state.queue import JobQueue
from tests.llm_server import FakeLlm

TEXT = (
    "Solar power converts sunlight into electricity. Panels on the roof feed the city grid. "
    "Batteries store energy for the night. The river powers a water system too."
)


def run(concurrency: int, chunks: int, latency: float, workdir: Path) -> dict:
    with FakeLlm(latency=latency) as server:
        settings = Settings.model_validate(
            {
                "paths": {
                    "inbox": str(workdir / "inbox"),
                    "state_dir": str(workdir / f"state-{concurrency}"),
                },
                "llm": {"url": server.url, "concurrency": concurrency, "timeout_s": 30},
                "synthesis": {"questions_per_chunk": 2, "rewrites_per_question": 1},
                "logging": {"level": "error"},
            }
        )
        db = Database(settings.paths.state_dir / "embedtune.db")
        queue = JobQueue(db.conn)
        store = DocumentStore(db.conn, queue)
        for i in range(chunks):
            store.file_seen(f"/bench/{i}.txt", 1, 1.0)
            job = queue.claim("bench", ["ingest"])
            store.store_version(
                job,
                job.payload["document_id"],
                f"sha{i}",
                1,
                1.0,
                "en",
                [NewChunk(0, f"Document {i}. {TEXT}", "", f"c{i}", "en")],
                0.1,
            )
        service = SynthesisService(settings, CircuitBreaker())
        pool = WorkerPool("synthesize", db.path, {"synthesize": service.handle}, concurrency, idle_poll=0.05)
        started = time.monotonic()
        pool.start()
        while queue.outstanding(["synthesize"]):
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        pool.stop()
        requests = len(server.requests)
        pairs = db.conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    ideal = concurrency / latency
    return {
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests_per_s": requests / elapsed,
        "pairs_per_s": pairs / elapsed,
        "ideal_requests_per_s": ideal,
        "ratio": (requests / elapsed) / ideal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()
    configure_logging("error", "console")
    print(
        f"LLM latency {args.latency * 1000:.0f} ms, {args.chunks} chunks, 3 requests per chunk "
        "(questions, rewrites, judge), 2 questions + 1 rewrite each"
    )
    print(f"{'conc':>5} {'seconds':>8} {'req/s':>8} {'ideal':>8} {'ratio':>6} {'pairs/s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for concurrency in args.concurrency:
            chunks = max(args.chunks, concurrency * 4) if concurrency > 1 else min(args.chunks, 40)
            r = run(concurrency, chunks, args.latency, Path(tmp))
            print(
                f"{r['concurrency']:>5} {r['seconds']:>8.1f} {r['requests_per_s']:>8.1f} "
                f"{r['ideal_requests_per_s']:>8.1f} {r['ratio']:>6.2f} {r['pairs_per_s']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
