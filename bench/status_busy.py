"""`embedtune status` at 100k known documents while the daemon ingests a backlog, against the same command
with the daemon stopped, in one run on this machine.

    python -m bench.status_busy [--documents 100000] [--backlog 3000] [--repeats 9]

The state holds `--documents` documents of one chunk (stored as the ingest job stores them, bench.index,
each also a file in the inbox whose size and mtime match, so the daemon's start finds nothing to redo);
the inbox gets `--backlog` new text files (real passages, a few KB each) so the daemon chunks, stores and
queues while `status` runs. The daemon runs twice on fresh backlogs: at the caller's niceness, and at
nice 10 as systemd/embedtune.service starts it. Each row is the median wall time of the whole command (a
fresh Python process, imports included) and how many documents were ingested while it was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.scale import ROOT, status_times


def ingested(database: Path) -> int:
    from state.db import connect

    conn = connect(database, readonly=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM documents WHERE status='ingested'").fetchone()[0]
    finally:
        conn.close()


def write_backlog(inbox: Path, texts, count: int, tag: str) -> None:
    for number in range(count):
        body = "\n\n".join(next(texts) for _ in range(4))
        (inbox / f"{tag}-{number}.txt").write_text(body, encoding="utf-8")


def busy_row(config: Path, database: Path, inbox: Path, texts, args, nice: int) -> dict:
    write_backlog(inbox, texts, args.backlog, f"nice{nice}")
    command = [sys.executable, "-m", "daemon.cli", "--config", str(config), "run"]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    daemon = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        before = ingested(database)
        deadline = time.monotonic() + 300
        while ingested(database) < before + 20:  # the backlog is being worked through: measure now
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("the daemon did not start ingesting")
            time.sleep(0.5)
        start_count = ingested(database)
        times = status_times(config, args.repeats)
        during = ingested(database) - start_count
        load = os.getloadavg()[0]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    return {
        "daemon": f"ingesting (nice {nice})",
        "status_s": round(statistics.median(times), 3),
        "max_s": round(max(times), 3),
        "ingested_meanwhile": during,
        "load1": round(load, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from bench.index import add_documents, passages
    from state.db import Database
    from state.layout import StateLayout

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state, inbox = Path(tmp) / "state", Path(tmp) / "inbox"
        (inbox / "known").mkdir(parents=True)
        config = Path(tmp) / "c.toml"
        config.write_text(
            f'[paths]\nstate_dir = "{state}"\ninbox = "{inbox}"\n'
            '[model]\nbase = "packaged:all-MiniLM-L6-v2"\nbackend = "torch"\n'
            '[index]\nenabled = false\n[logging]\nlevel = "warning"\nformat = "json"\n'
        )
        layout = StateLayout(state).ensure()
        texts = passages()
        db = Database(layout.database)
        started = time.perf_counter()
        add_documents(db.conn, texts, args.documents, 1, 0, inbox / "known")
        db.close()
        print(
            json.dumps({"documents": args.documents, "build_s": round(time.perf_counter() - started, 1)}),
            flush=True,
        )
        times = status_times(config, args.repeats)
        rows.append(
            {
                "daemon": "stopped",
                "status_s": round(statistics.median(times), 3),
                "max_s": round(max(times), 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        for nice in (0, 10):
            rows.append(busy_row(config, layout.database, inbox, texts, args, nice))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"documents": args.documents, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
