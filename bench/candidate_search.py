"""Exact versus HNSW candidate search at the sizes where mining switches (stages.negatives.EXACT_LIMIT).

Vectors: a Gaussian mixture on the unit sphere (--clusters centres, spread --spread), 384 dimensions like
all-MiniLM-L6-v2, so neighbourhoods are clumped as real embeddings are; queries are corpus vectors plus
noise. Reports build and search time of each index and the HNSW recall@10 and @200 against exact search
(the depth the miner's rank window reads).

    python -m bench.candidate_search [--sizes 10000,50000,100000] [--queries 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def mixture(rows: int, dim: int, clusters: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, rows)] + spread * rng.normal(size=(rows, dim)).astype(
        np.float32
    )
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def recall(truth: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(truth, found, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--clusters", type=int, default=500)
    parser.add_argument("--spread", type=float, default=0.6)
    args = parser.parse_args()
    from stages.negatives import build_index, search_depth

    rng = np.random.default_rng(0)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        corpus = mixture(size, 384, args.clusters, args.spread, rng)
        picks = rng.integers(0, size, args.queries)
        queries = corpus[picks] + 0.05 * rng.normal(size=(args.queries, 384)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        row = {"chunks": size, "queries": args.queries}
        results = {}
        for name, limit in (("exact", size), ("hnsw", 0)):
            started = time.perf_counter()
            index = build_index(corpus, exact_limit=limit)
            row[f"{name}_build_s"] = round(time.perf_counter() - started, 2)
            search_depth(index, 200)
            started = time.perf_counter()
            _scores, results[name] = index.search(queries, 200)
            row[f"{name}_search_s"] = round(time.perf_counter() - started, 2)
        row["hnsw_recall@10"] = round(recall(results["exact"][:, :10], results["hnsw"][:, :10]), 4)
        row["hnsw_recall@200"] = round(recall(results["exact"], results["hnsw"]), 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "candidate-search.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
