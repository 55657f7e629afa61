"""How the daemon's bookkeeping grows with the corpus: `embedtune status` latency, the index check the main
loop runs every few seconds, and the database size, at 1k, 10k and 100k documents.

Documents (one chunk each, real passages from ../shared/data via bench.index) are stored through the same
DocumentStore calls the ingest job makes, with their synthesize jobs queued as ingest queues them. Prints a table and the growth exponent k of
each cost (time ∝ documents^k, least squares over the sizes).

    python -m bench.scale [--sizes 1000,10000,100000] [--repeats 5]

Round steps (negatives, training, evaluation) at these sizes are not measured here yet (issue 14).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def exponent(sizes: list[int], values: list[float]) -> float:
    xs = [math.log(s) for s in sizes]
    ys = [math.log(max(v, 1e-9)) for v in values]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def bench_model(spec: str, folder: Path) -> str:
    """A model folder for a scaling bench: "tiny" builds the tests' 2-layer, 32-dimension BERT in
    `folder` (cheap encoding, so the pipeline's own costs show at 100k chunks); anything else is a model
    spec as the config takes it (e.g. packaged:all-MiniLM-L6-v2)."""
    if spec == "tiny":
        sys.path.insert(0, str(ROOT))
        from tests.tiny_models import build_tiny_embedder

        return str(build_tiny_embedder(folder / "tiny"))
    from stages.models import resolve_model_path

    return str(resolve_model_path(spec))


def status_seconds(config: Path, repeats: int) -> float:
    return statistics.median(status_times(config, repeats))


def status_times(config: Path, repeats: int) -> list[float]:
    """Wall time of the whole `embedtune status` command (a fresh process), `repeats` times."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "daemon.cli", "--config", str(config), "status"],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from bench.index import add_documents, passages
    from daemon.indexing import IndexService
    from daemon.settings import Settings
    from state.db import Database
    from state.index_records import chunk_signature
    from state.layout import StateLayout

    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "c.toml"
            config.write_text(f'[paths]\nstate_dir = "{tmp}/state"\ninbox = "{tmp}/inbox"\n')
            settings = Settings.model_validate(
                {"paths": {"state_dir": f"{tmp}/state", "inbox": f"{tmp}/inbox"}}
            )
            layout = StateLayout(settings.paths.state_dir).ensure()
            conn = Database(layout.database).conn
            started = time.perf_counter()
            add_documents(conn, passages(), size, 1, 0)
            build_s = time.perf_counter() - started
            checks = []
            service = IndexService(settings, layout)
            for _ in range(20):
                started = time.perf_counter()
                service.needs_sync(conn)
                chunk_signature(conn)
                checks.append(time.perf_counter() - started)
            conn.close()
            row = {
                "documents": size,
                "build_s": round(build_s, 1),
                "status_s": round(status_seconds(config, args.repeats), 3),
                "index_check_ms": round(statistics.median(checks) * 1000, 2),
                "db_mb": round(layout.database.stat().st_size / 2**20, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    keys = ("status_s", "index_check_ms", "db_mb")
    result = {
        "rows": rows,
        "exponents": {
            key: round(exponent([r["documents"] for r in rows], [r[key] for r in rows]), 2) for key in keys
        },
    }
    print(json.dumps(result["exponents"]))
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
