"""How a training round's steps grow with the corpus: time and peak RSS of snapshot, negatives, train,
evaluate and each merge evaluation at 1k, 10k and 100k chunks, with the growth exponent of each
(time ∝ chunks^k, least squares over the sizes).

Each size gets a fresh state directory: documents of one chunk each (real passages from ../shared/data,
bench.index's generator) stored as ingest stores them, one pseudo-query per chunk made and stored as the
no-LLM synthesis job makes them (inverse cloze), all kept as a filter pass would keep them. Then one real
round runs in its own process (`python -m daemon.round_process`, as the daemon starts it) on the
embedded defaults, and its steps.json gives each step's wall time and own peak RSS.

`--model tiny` runs a 2-layer, 32-dimension BERT (the tests' tiny model) so that 100k chunks take
minutes: encoding then costs little and the table shows how the pipeline's own work grows. With the
packaged model, encoding dominates every step that encodes (bench.index measures its rate).

    python -m bench.scale_round --sizes 1000,10000,100000 --model tiny
    python -m bench.scale_round --sizes 1000,10000 --model packaged:all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("snapshot", "negatives", "train", "evaluate", "merge")


def prepare(state_dir: Path, size: int, settings) -> dict:
    """Documents, chunks and kept pseudo-query pairs for `size` chunks, through the stores the jobs use."""
    from bench.index import add_documents, passages
    from stages.pseudo import pseudo_queries
    from state.db import Database
    from state.queue import JobQueue
    from state.samples import SampleIn, SampleStore

    conn = Database(state_dir / "embedtune.db").conn
    started = time.monotonic()
    add_documents(conn, passages(), size, 1, 0)
    stored = time.monotonic()
    queue = JobQueue(conn)
    store = SampleStore(conn, queue)
    synthesis = settings.synthesis
    while (job := queue.claim("bench", ["synthesize"])) is not None:
        chunk = store.chunk(job.payload["chunk_id"])
        made = pseudo_queries(
            chunk["text"], chunk["heading"], chunk["language"], chunk["sha256"], "inverse_cloze", 1, 0
        )
        candidates = [SampleIn(c.query, "pseudo", c.passage, None, None) for c in made]
        store.store_candidates(job, chunk, candidates, synthesis.judge_threshold)
    synthesized = time.monotonic()
    from types import SimpleNamespace

    kept = [
        SimpleNamespace(
            kept=True, rank=1, bm25_score=None, rerank_score=None, reason=None, sample_id=row["id"]
        )
        for row in store.unfiltered(10**9)
    ]
    store.record_filter(kept)
    conn.close()
    return {
        "store_s": round(stored - started, 1),
        "synthesize_s": round(synthesized - stored, 1),
        "pairs": len(kept),
    }


def run_round(settings_file: Path, state_dir: Path) -> tuple[float, int]:
    from state.db import Database
    from state.round_records import RoundStore

    db = Database(state_dir / "embedtune.db")
    round_id = RoundStore(db.conn).create("bench", "bench")
    db.conn.close()
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.round_process",
            "--settings",
            str(settings_file),
            "--round-id",
            str(round_id),
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started, round_id


def main() -> int:
    from bench.scale import bench_model, exponent

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument(
        "--model", default="tiny", help='"tiny" or a model spec such as packaged:all-MiniLM-L6-v2'
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "scale-round.json")
    parser.add_argument("--prepare-only", action="store_true", help="store and synthesize; no round")
    args = parser.parse_args()
    from daemon.settings import Settings

    rows = []
    with tempfile.TemporaryDirectory() as models:
        model = bench_model(args.model, Path(models))
        for size in [int(s) for s in args.sizes.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                state_dir = Path(tmp) / "state"
                settings = Settings.model_validate(
                    {
                        "paths": {"state_dir": str(state_dir), "inbox": f"{tmp}/inbox"},
                        "model": {"base": model},
                        "logging": {"level": "warning"},
                    }
                )
                from state.layout import StateLayout

                StateLayout(state_dir).ensure()
                prepared = prepare(state_dir, size, settings)
                if args.prepare_only:
                    rows.append({"chunks": size, **prepared})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                settings_file = Path(tmp) / "settings.json"
                settings_file.write_text(settings.model_dump_json())
                wall, round_id = run_round(settings_file, state_dir)
                round_dir = StateLayout(state_dir).round_dir(round_id)
                steps = json.loads((round_dir / "steps.json").read_text())
                from state.db import Database

                record = (
                    Database(state_dir / "embedtune.db")
                    .conn.execute(
                        "SELECT decision, reason, n_train, n_heldout, eval_sets FROM rounds WHERE id=?",
                        (round_id,),
                    )
                    .fetchone()
                )
                row = {
                    "chunks": size,
                    **prepared,
                    "round_s": round(wall, 1),
                    "decision": record["decision"],
                    "n_train": record["n_train"],
                    "n_heldout": record["n_heldout"],
                    "pool": json.loads(record["eval_sets"] or "{}").get("pool"),
                    "steps": steps,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)

    if args.prepare_only:
        sizes = [r["chunks"] for r in rows]
        for key in ("store_s", "synthesize_s"):
            k = exponent(sizes, [r[key] for r in rows]) if len(sizes) > 1 else float("nan")
            print(f"{key}: " + ", ".join(f"{r['chunks']:,}: {r[key]} s" for r in rows) + f"; k = {k:.2f}")
        return 0

    def step_total(row: dict, name: str) -> tuple[float, int]:
        chosen = [s for s in row["steps"] if s["step"] == name]
        return sum(s["seconds"] for s in chosen), max((s["peak_rss_mb"] for s in chosen), default=0)

    sizes = [r["chunks"] for r in rows]
    print(f"\nmodel {args.model}")
    print("| step | " + " | ".join(f"{s:,} chunks: s / peak MB" for s in sizes) + " | k (time) |")
    print("| --- | " + " | ".join("---" for _ in sizes) + " | --- |")
    exponents = {}
    for name in STEPS + ("decide",):
        values = [step_total(r, name) for r in rows]
        if not any(v[0] for v in values):
            continue
        measurable = len(sizes) > 1 and max(v[0] for v in values) >= 0.1  # below that it is timer noise
        k = exponent(sizes, [v[0] for v in values]) if measurable else float("nan")
        exponents[name] = round(k, 2) if measurable else None
        cells = " | ".join(f"{v[0]:.1f} / {v[1]}" for v in values)
        print(f"| {name} | {cells} | {f'{k:.2f}' if measurable else '—'} |")
    for key in ("store_s", "synthesize_s", "round_s"):
        k = exponent(sizes, [r[key] for r in rows]) if len(sizes) > 1 else float("nan")
        exponents[key] = round(k, 2)
        print(f"| ({key}) | " + " | ".join(str(r[key]) for r in rows) + f" | {k:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "rows": rows, "exponents": exponents}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
