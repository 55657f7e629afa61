"""Hybrid search at scale: the index fill with the BM25 field, and per-query search time of each mode, at N
chunks of real text, with a dense-only fill of the same vectors as the same-run baseline.

The state folder is built as bench/index.py builds it (real passages from ../shared/data, stored through
the ingest job's calls). Then:
- fill: IndexService.sync on an empty store (the hybrid collection the daemon makes), and the same vectors
  (from the embedding cache) upserted into a dense-only collection: the sparse field's cost;
- search: nfcorpus' real queries through `search_many` (what `embedtune search --queries` runs), per mode.

    python -m bench.hybrid_scale --chunks 100000 [--model tiny|packaged:all-MiniLM-L6-v2] [--analyzer jieba]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.index import DATA, add_documents, passages, peak_rss_mb, time_fill_parts
from bench.scale import bench_model


def _dense_only_fill(settings, layout, conn, name: str) -> float:
    """Seconds of upserts of every active chunk's cached vector into a collection without the BM25 field."""
    from daemon.indexing import index_target
    from daemon.serving import base_model_path
    from daemon.step_params import encode_params
    from stages.encoder import Encoder
    from state.index_records import active_chunks
    from state.vector_store import open_store

    chunks = active_chunks(conn)
    encoder = Encoder(base_model_path(settings, conn), encode_params(settings), layout.cache)
    vectors = encoder.passages([c.text for c in chunks])  # all from the cache the hybrid fill wrote
    batch = settings.index.batch_size
    with open_store(index_target(settings)) as store:
        store.create(name, vectors.shape[1], analyzer=None)
    seconds = 0.0
    for start in range(0, len(chunks), batch):
        part = chunks[start : start + batch]
        with open_store(index_target(settings)) as store:
            started = time.perf_counter()  # the upsert alone, as the hybrid fill's "store" timer
            store.upsert(
                name,
                [c.id for c in part],
                vectors[start : start + batch],
                [c.path for c in part],
                [c.text for c in part],
            )
            seconds += time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--analyzer", default="standard", choices=["standard", "jieba"])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    from daemon.indexing import IndexService
    from daemon.logs import configure_logging
    from daemon.search import search_many
    from daemon.settings import Settings
    from stages.evalsets import load_beir
    from state.db import Database
    from state.layout import StateLayout
    from state.vector_store import VectorStore

    configure_logging("warning", "console")
    upsert = VectorStore.upsert  # unpatched, for the baseline
    timers = time_fill_parts()
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_model(args.model, Path(tmp))
        settings = Settings.model_validate(
            {
                "paths": {"state_dir": f"{tmp}/state", "inbox": f"{tmp}/inbox"},
                "model": {"base": model, "device": "cpu"},
                "index": {"analyzer": args.analyzer},
            }
        )
        layout = StateLayout(settings.paths.state_dir).ensure()
        conn = Database(layout.database).conn
        add_documents(conn, passages(), args.chunks // 10, 10, 0)
        started = time.perf_counter()
        report = IndexService(settings, layout).sync(conn)
        hybrid_fill = time.perf_counter() - started
        store_hybrid = timers["store"]
        VectorStore.upsert = upsert
        dense_store = _dense_only_fill(settings, layout, conn, "bench_dense_only")
        queries = load_beir(DATA / "nfcorpus").queries[: args.queries]
        latency = {}
        for mode in ("dense", "lexical", "hybrid"):
            search_many(settings, queries[:3], k=10, mode=mode)  # model load, first open
            started = time.perf_counter()
            search_many(settings, queries, k=10, mode=mode)
            latency[mode] = round(1000 * (time.perf_counter() - started) / len(queries), 1)
        result = {
            "chunks": report.added,
            "model": args.model,
            "analyzer": args.analyzer,
            "fill_s": round(hybrid_fill, 1),
            "fill_encode_s": round(timers["encode"], 1),
            "fill_store_s_hybrid": round(store_hybrid, 1),
            "fill_store_s_dense_only": round(dense_store, 1),
            "store_ratio_hybrid_over_dense": round(store_hybrid / dense_store, 2) if dense_store else None,
            "ms_per_query": latency,
            "hybrid_over_dense_latency": round(latency["hybrid"] / latency["dense"], 2),
            "peak_rss_mb": round(peak_rss_mb()),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
