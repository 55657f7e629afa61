"""The daemon's memory: idle RSS after real work, and the peak of each model job's child process.

Starts `embedtune run` (a real process) on the bundled sample documents with the packaged model and the
embedded defaults (rounds off), waits until ingest, synthesis, the filter pass and the index sync are all
done, then samples the daemon's RSS for --idle seconds. Model jobs run in child processes
(daemon/job_process.py), which report their own peak RSS in the daemon log.

    python -m bench.daemon_memory [--idle 20]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int, field: str = "VmRSS:") -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def settled(db: Path) -> bool:
    if not db.exists():
        return False
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        outstanding = conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE state IN ('pending','running','failed')"
        ).fetchone()[0]
        live = conn.execute("SELECT COUNT(*) FROM index_collections WHERE state = 'live'").fetchone()[0]
        filtered = conn.execute("SELECT COUNT(*) FROM samples WHERE kept IS NOT NULL").fetchone()[0]
        return outstanding == 0 and live == 1 and filtered > 0
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "c.toml"
        config.write_text(
            f'[paths]\ninbox = "{root / "inbox"}"\nstate_dir = "{root / "state"}"\n'
            "[ingest]\nsettle_seconds = 0.5\n[training]\nmin_new_samples = 1000000\n"
            '[logging]\nformat = "json"\n'
        )
        subprocess.run(
            [sys.executable, "-m", "daemon.cli", "--config", str(config), "samples"], check=True, cwd=ROOT
        )
        log_path = root / "daemon.log"
        with open(log_path, "wb") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "--config", str(config), "run"],
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        started = time.monotonic()
        busy_peak = 0.0
        while not settled(root / "state" / "embedtune.db"):
            if daemon.poll() is not None or time.monotonic() - started > args.timeout:
                raise SystemExit(f"daemon stopped or timed out; log: {log_path.read_text()[-2000:]}")
            busy_peak = max(busy_peak, rss_mb(daemon.pid))
            time.sleep(0.5)
        work_s = time.monotonic() - started
        samples = []
        deadline = time.monotonic() + args.idle
        while time.monotonic() < deadline:
            samples.append(rss_mb(daemon.pid))
            time.sleep(1.0)
        maps = Path(f"/proc/{daemon.pid}/maps").read_text()
        high_water = rss_mb(daemon.pid, "VmHWM:")
        daemon.terminate()
        daemon.wait(timeout=120)
        jobs = [
            json.loads(line)
            for line in log_path.read_text().splitlines()
            if line.startswith("{") and '"model_job_process"' in line
        ]
    children = {}
    for event in jobs:
        entry = children.setdefault(event["kind"], {"jobs": 0, "peak_rss_mb": 0, "seconds": 0.0})
        entry["jobs"] += 1
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], event.get("peak_rss_mb", 0))
        entry["seconds"] = round(entry["seconds"] + event.get("seconds", 0.0), 1)
    result = {
        "documents": "bundled samples",
        "work_seconds": round(work_s, 1),
        "daemon_idle_rss_mb": round(max(samples), 1),
        "daemon_busy_rss_mb_max": round(busy_peak, 1),
        "daemon_high_water_mb": round(high_water, 1),
        "torch_in_daemon": "libtorch" in maps,
        "model_job_children": children,
    }
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "daemon-memory.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
