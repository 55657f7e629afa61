"""Hybrid retrieval as users get it: a BEIR corpus fed to the daemon on embedded defaults (no rounds), the
index filled and live, then `embedtune eval --mode all` (the real CLI, in a fresh process) on the set's
real queries, and the per-query search time of each mode measured in the same run.

    python -m bench.hybrid ../shared/data/nfcorpus [--keep DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.quality import write_inbox


def _config(work: Path) -> Path:
    """Embedded defaults but for the folders, an instant settle and no training rounds."""
    path = work / "config.toml"
    path.write_text(
        f'[paths]\ninbox = "{work / "inbox"}"\nstate_dir = "{work / "state"}"\n\n'
        "[ingest]\nsettle_seconds = 0.0\nrescan_minutes = 0.0\n\n"
        "[training]\nmin_new_samples = 1000000000\n\n"
        '[logging]\nlevel = "warning"\nformat = "console"\n',
        encoding="utf-8",
    )
    return path


def _serve(settings, documents: int) -> dict:
    """Run the daemon until every document is ingested and the live collection holds every active chunk.
    The filter passes over the pseudo-queries are left running (they feed training, not the index)."""
    from bench.daemon_run import daemon_in_thread
    from daemon.indexing import IndexService
    from state.index_records import IndexRecords
    from state.pipeline_progress import pipeline_progress

    started = time.monotonic()
    with daemon_in_thread(settings) as (daemon, conn):
        service = IndexService(settings, daemon.layout)
        while True:
            progress = pipeline_progress(conn)
            live = IndexRecords(conn).live()
            ingesting = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE kind IN ('ingest', 'index') AND state IN ('pending','running','failed')"
            ).fetchone()[0]
            if (
                progress.documents_done >= documents
                and not ingesting
                and not len(daemon.watcher.tracker)
                and live is not None
                and not service.needs_sync(conn)
            ):
                break
            time.sleep(2.0)
        live = IndexRecords(conn).live()
        chunks = conn.execute("SELECT COUNT(*) FROM chunks WHERE active = 1").fetchone()[0]
    return {
        "documents": documents,
        "chunks": int(chunks),
        "collection": live.name,
        "analyzer": live.analyzer,
        "bm25_weight": live.bm25_weight,
        "seconds_to_served": round(time.monotonic() - started, 1),
    }


def _latency(settings, dataset: Path) -> dict:
    """Per-query search time of each mode, one batch of the set's queries through search_many."""
    from daemon.search import search_many
    from stages.evalsets import load_beir

    queries = load_beir(dataset).queries
    out = {}
    for mode in ("dense", "lexical", "hybrid"):
        search_many(settings, queries[:5], k=10, mode=mode)  # model load and first store open
        started = time.perf_counter()
        search_many(settings, queries, k=10, mode=mode)
        out[mode] = round(1000 * (time.perf_counter() - started) / len(queries), 2)
    return out


def main() -> int:
    from daemon.logs import configure_logging
    from daemon.settings import load_settings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the state folder here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    configure_logging("warning", "console")
    work = Path(tempfile.mkdtemp(prefix="embedtune-hybrid-"))
    config = _config(work)
    settings = load_settings(str(config))
    documents = write_inbox(args.dataset, settings.paths.inbox)
    served = _serve(settings, documents)
    print(json.dumps(served))
    command = [sys.executable, "-m", "daemon.cli", "--config", str(config), "eval", "--data"]
    command += [str(args.dataset), "--mode", "all", "--json"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    report = json.loads(done.stdout)
    report["eval_seconds"] = round(time.monotonic() - started, 1)
    report["served"] = served
    report["ms_per_query"] = _latency(settings, args.dataset)
    report["command"] = " ".join(["embedtune", *command[3:]])
    for label, metrics in report["results"].items():
        print(
            f"{args.dataset.name:<10} {label:<14} nDCG@10 {metrics['ndcg@10']:.4f}  R@100 {metrics['recall@100']:.4f}"
        )
    for gain in report["gains"]:
        print(
            f"{gain['row']} over {gain['over']}: {gain['value']:+.4f} [{gain['ci95'][0]:+.4f}, {gain['ci95'][1]:+.4f}]"
        )
    print("ms per query:", report["ms_per_query"], "served in", served["seconds_to_served"], "s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if args.keep:
        shutil.copytree(work, args.keep, symlinks=True, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
