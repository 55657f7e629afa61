"""Search latency of `embedtune serve` at N chunks: the memory replica (stages/memory_index.py) against
Milvus Lite kept open in one client (the same-run baseline), one client and 8 concurrent clients.

Texts are real passages (bench/index.py `passages`: the four shared corpora, repeated with a marker past
5k each); the chunk vectors are random normalised 384-dimension rows: latency depends on the shapes (N x
384 float32, the BM25 postings of real text), not on what the vectors mean. Queries are nfcorpus' real
questions, encoded by the real model (all-MiniLM-L6-v2 by default), so each timing is the whole search
path `/v1/search` runs, `search_many` with the served encoder and the replica (query encoding, both
halves, the BM25-only candidates' vectors, the fusion), without HTTP and the query log. The baseline runs
the same halves and fusion (`daemon.search._halves` / `_combine`) on a Milvus Lite collection filled with
the same chunks and vectors, opened once (what keeping Milvus Lite open in the server would give; the
per-request open the server paid before is timed separately). The Milvus fill stops at `--fill-budget-s`;
then both sides are compared at the N it reached and the replica alone is timed at the full N.

Query encoding runs on `--torch-threads` (1) intra-op threads (see below). Concurrency: 8 threads, each request holding the model's lock as the server does (one model call at a
time), so throughput is one core's worth plus what the waiting overlaps.

    python -m bench.serve_latency [--chunks 100000] [--queries 200] [--fill-budget-s 480]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.index import DATA, passages, peak_rss_mb

DIM = 384
MODES = ("dense", "hybrid", "lexical")


@dataclass(frozen=True)
class _Chunk:
    id: int
    path: str
    text: str


class _Results(dict):
    """Printed as measured: a long run that is stopped keeps what it got."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        print(f"{key:55s} {value}", flush=True)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p99": round(float(np.percentile(ms, 99)), 1)}


def _one_client(run, queries: list[str]) -> dict[str, float]:
    times = []
    for query in queries:
        started = time.perf_counter()
        run(query)
        times.append(time.perf_counter() - started)
    return _percentiles(times)


def _concurrent(run, queries: list[str], clients: int = 8) -> dict[str, float]:
    """`clients` threads splitting the queries; per-request latency and queries per second overall."""
    times: list[float] = []
    lock = threading.Lock()

    def client(part: list[str]) -> None:
        for query in part:
            started = time.perf_counter()
            run(query)
            with lock:
                times.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(queries[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {**_percentiles(times), "qps": round(len(times) / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--analyzer", default="standard", choices=["standard", "jieba"])
    parser.add_argument("--fill-budget-s", type=float, default=480.0)
    parser.add_argument("--baseline-queries", type=int, default=60)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    # one intra-op thread: on a 2-core machine shared with other work, torch's OpenMP threads waiting at
    # a barrier for a descheduled peer (or for OpenBLAS threads still spinning after a matrix product)
    # turned an 8 ms query encoding into 100-400 ms; this measures the search path, not that contention
    torch.set_num_threads(args.torch_threads)

    from bench.scale import bench_model
    from daemon.logs import configure_logging
    from daemon.search import _combine, _Found, _halves, _Plan, search_many
    from daemon.serve_index import PreparedReplica
    from daemon.serving import ModelChoice
    from daemon.settings import Settings
    from daemon.step_params import encode_params
    from stages.encoder import Encoder
    from stages.evalsets import load_beir
    from stages.fusion import candidate_depth
    from stages.memory_index import MemoryIndex
    from state.db import Database
    from state.layout import StateLayout
    from state.vector_store import IndexTarget, open_store

    configure_logging("warning", "console")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(bench_model(args.model, Path(tmp)))
        settings = Settings.model_validate(
            {
                "paths": {"state_dir": f"{tmp}/state", "inbox": f"{tmp}/inbox"},
                "model": {"base": str(model), "device": "cpu"},
                "index": {"analyzer": args.analyzer},
            }
        )
        layout = StateLayout(settings.paths.state_dir).ensure()
        Database(layout.database).close()  # search_many checks that a state exists
        texts = passages()
        chunks = [_Chunk(i + 1, f"/bench/doc{i // 10}.md", next(texts)) for i in range(args.chunks)]
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(len(chunks), DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = load_beir(DATA / "nfcorpus").queries[: args.queries]
        encoder = Encoder(model, encode_params(settings))
        encoder.queries(["warm up"])
        depth = candidate_depth(10, settings.index.candidates)
        model_lock = threading.Lock()

        started = time.perf_counter()
        replica = MemoryIndex.build(chunks, vectors, args.analyzer)
        build_s = time.perf_counter() - started
        print(
            f"replica of {replica.size} chunks built in {build_s:.1f} s; peak RSS {peak_rss_mb():.0f} MB",
            flush=True,
        )

        def replica_search(index: MemoryIndex, mode: str):
            prepared = PreparedReplica(ModelChoice("v1", model), index, "bench", None)

            def run(query: str):
                with model_lock:  # as the server holds the model for a request
                    return search_many(
                        settings, [query], "current", 10, mode, encoder=encoder, replica=prepared
                    )

            return run

        results: dict[str, dict] = _Results()
        for mode in MODES:
            run = replica_search(replica, mode)
            run(queries[0])
            results[f"replica {mode}, 1 client"] = _one_client(run, queries)
            results[f"replica {mode}, 8 clients"] = _concurrent(run, queries)
        encode_times = []
        for query in queries[:50]:
            begun = time.perf_counter()
            encoder.queries([query])
            encode_times.append(time.perf_counter() - begun)
        results["query encoding alone"] = _percentiles(encode_times)

        # --- the baseline: Milvus Lite, filled with the same chunks, kept open --------------------------
        target = IndexTarget(f"{tmp}/milvus.db", "")
        name = "bench_serve"
        filled, fill_started = 0, time.perf_counter()
        with open_store(target) as store:
            store.create(name, DIM, args.analyzer)
            for start in range(0, len(chunks), 1000):
                if time.perf_counter() - fill_started > args.fill_budget_s:
                    break
                part = chunks[start : start + 1000]
                store.upsert(
                    name,
                    [c.id for c in part],
                    vectors[start : start + len(part)],
                    [c.path for c in part],
                    [c.text for c in part],
                )
                filled += len(part)
            fill_s = time.perf_counter() - fill_started
            print(f"Milvus Lite filled with {filled} chunks in {fill_s:.0f} s", flush=True)
            at_n = (
                replica
                if filled == len(chunks)
                else MemoryIndex.build(chunks[:filled], vectors[:filled], args.analyzer)
            )
            base_queries = queries[: args.baseline_queries]

            def milvus_search(mode: str):
                def run(query: str):
                    with model_lock:
                        vector = encoder.queries([query])
                        found: _Found = _halves(
                            lambda: store.search(name, vector, depth if mode == "hybrid" else 10),
                            lambda: store.search_text(name, [query], depth if mode == "hybrid" else 10),
                            lambda ids: store.vectors_of(name, ids),
                            mode,
                            vector,
                        )
                        if mode == "hybrid":
                            found.covariance, found.corpus_size = at_n.covariance, filled
                        plan = _Plan(ModelChoice("v1", model), "", "", None)
                        return _combine(mode, found, 0, plan, vector[0], query, 10)

                return run

            for mode in MODES:
                run = milvus_search(mode)
                run(base_queries[0])
                results[f"Milvus Lite open {mode} at {filled}, 1 client"] = _one_client(run, base_queries)
                if filled != len(chunks):
                    run = replica_search(at_n, mode)
                    results[f"replica {mode} at {filled}, 1 client"] = _one_client(run, base_queries)
        opens = []
        for _ in range(3):  # what the server paid per request before: open, load, one search, close
            begun = time.perf_counter()
            with open_store(target) as store:
                store.search(name, vectors[:1], 10)
            opens.append(time.perf_counter() - begun)
        results["Milvus Lite open + load + 1 search + close"] = {
            "median_ms": round(1000 * statistics.median(opens), 1)
        }
    print(f"N = {args.chunks}, {len(queries)} queries, analyzer {args.analyzer}, model {args.model}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
