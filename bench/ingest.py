"""Ingestion throughput and latency on a generated corpus (mixed Chinese/English, txt/md/docx/html).

Starts the real daemon on a temp inbox with the packaged model's tokenizer, drops N files at once, and
prints documents/s, MB/s and the p50/p95 latency from a file landing to its chunks being committed
(including the settle period, printed beside it).

    python -m bench.ingest [--files 1000] [--settle 0.5] [--workers 2] [--processes auto|N] [--kinds txt,md,docx,html]
                           [--sentences 10,60]
                           [--exact-counts] [--model packaged:all-MiniLM-L6-v2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from daemon.logs import configure_logging
from daemon.service import Daemon
from daemon.settings import Settings
from tests.docs_factory import generate_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--processes",
        default="auto",
        help='ingest.processes: "auto" (the default), or 0 for the threads before',
    )
    parser.add_argument(
        "--kinds", default="txt,md,docx,html", help="file kinds, comma-separated (txt alone: plain text)"
    )
    parser.add_argument("--sentences", default="10,60", help="sentences per file, MIN,MAX")
    parser.add_argument(
        "--exact-counts",
        action="store_true",
        help="baseline: encode every sentence whole (turns off the chunker's per-word counting)",
    )
    parser.add_argument(
        "--model",
        default="packaged:all-MiniLM-L6-v2",
        help='model.base, whose tokenizer chunks (the rows before issue 26 used this one; "auto" picks by the '
        "first document's language)",
    )
    args = parser.parse_args()
    configure_logging("error", "console")
    if args.exact_counts:
        import stages.chunk

        stages.chunk._bert_word_rule = lambda _tokenizer: None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        staging = root / "staging"
        staging.mkdir()
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        low, high = (int(n) for n in args.sentences.split(","))
        files = generate_corpus(staging, args.files, kinds=kinds, sentences=(low, high))
        total_bytes = sum(p.stat().st_size for p in files)
        settings = Settings.model_validate(
            {
                "paths": {"inbox": str(root / "inbox"), "state_dir": str(root / "state")},
                "ingest": {
                    "settle_seconds": args.settle,
                    "workers": args.workers,
                    "processes": args.processes if args.processes == "auto" else int(args.processes),
                    "rescan_minutes": 0,
                },
                "model": {"base": args.model},
                "logging": {"level": "error"},
            }
        )
        daemon = Daemon(settings)
        daemon.start()
        cpu_before = _cpu_seconds()
        landed: dict[str, float] = {}
        started = time.time()
        for path in files:  # a move is how a finished copy lands atomically
            target = settings.paths.inbox / path.name
            path.rename(target)
            landed[str(target)] = time.time()
        conn = sqlite3.connect(settings.paths.state_dir / "embedtune.db")
        while conn.execute(
            "SELECT COUNT(*) FROM documents WHERE status IN ('ingested','rejected')"
        ).fetchone()[0] < len(files):
            daemon.heartbeat()
            time.sleep(0.2)
        rows = conn.execute("SELECT path, updated, status FROM documents").fetchall()
        finished = max(datetime.fromisoformat(updated).timestamp() for _p, updated, _s in rows)
        elapsed = finished - started
        latencies = sorted(
            datetime.fromisoformat(updated).timestamp() - landed[path] for path, updated, _s in rows
        )
        chunks = conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        rejected = sum(1 for _p, _u, status in rows if status == "rejected")
        cpu_during = _cpu_seconds(), cpu_before
        daemon.stop_requested.set()
        daemon.shutdown()
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(
        f"files {len(files)} ({total_bytes / 1e6:.1f} MB; {'/'.join(kinds)}, 1/3 Chinese), chunks {chunks}, "
        f"rejected {rejected}, workers {args.workers}, processes {args.processes}, model {args.model}, "
        f"settle {args.settle}s"
    )
    print(
        f"documents/s {len(files) / elapsed:.1f}   MB/s {total_bytes / 1e6 / elapsed:.2f}   "
        f"wall {elapsed:.1f}s"
    )
    print(
        f"latency landing -> chunks committed: p50 {statistics.median(latencies):.2f}s  p95 {p95:.2f}s "
        f"(includes the {args.settle}s settle period)"
    )
    (own, children, machine), (own_before, children_before, machine_before) = cpu_during
    own, children, machine = own - own_before, children - children_before, machine - machine_before
    print(
        f"CPU while ingesting: daemon process {own:.1f} core-s ({own / elapsed:.0%} of a core), finished children "
        f"(model jobs, ingest processes) {children:.1f} core-s, the whole machine {machine:.1f} core-s "
        f"({machine / elapsed:.0%} of a core); daemon {own / (total_bytes / 1e6):.3f} core-s per MB"
    )


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU of this process (the daemon) and of its finished children (filter, index, export)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime, _machine_busy_seconds()


def _machine_busy_seconds() -> float:
    """CPU seconds every process on the machine spent working (/proc/stat), so a child still running at
    the end (RUSAGE_CHILDREN counts only finished ones) and anything beside the bench show too."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
