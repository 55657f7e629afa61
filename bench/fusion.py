"""How to fuse a Milvus collection's two top-N lists: the measurements behind stages/fusion.py.

One document per corpus entry (no chunking: the fusion is the variable), the packaged model's vectors and
Milvus Lite's BM25 in one collection, the set's real queries. Rows, each at BM25 shares 0.1..0.95:
- `lists-floor`: each side z-normalised over its own top-100, a missing score filled with the list's
  lowest (the first design);
- `lists-exact`: the same spreads, BM25-only candidates with their exact cosine, dense-only with BM25 0;
- `corpus-spread`: as `lists-exact`, each side scaled by its spread over the corpus (dense from the
  vectors' covariance, BM25 from the list with zeros elsewhere): what stages/fusion.py does;
- `teacher`: the hybrid teacher's mix over the whole corpus (rank_bm25; the ceiling of the idea);
- Milvus' own `hybrid_search` with RRFRanker(60) and WeightedRanker (what a client can do server-side).

    python -m bench.fusion ../shared/data/nfcorpus --analyzer standard [--work /tmp/fusion]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

WEIGHTS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
DEPTH = 100


def _collection(client, vectors: np.ndarray, texts: list[str], analyzer: str) -> None:
    """The product's collection (VectorStore.create: vectors, text, the BM25 field), filled once."""
    from state.vector_store import IndexTarget, VectorStore

    if client.has_collection("bench"):
        return
    store = VectorStore(client, IndexTarget(uri="", token=""))
    store.create("bench", vectors.shape[1], analyzer)
    for start in range(0, len(texts), 500):
        ids = list(range(start, min(start + 500, len(texts))))
        store.upsert("bench", ids, vectors[ids], [""] * len(ids), [texts[i][:5000] for i in ids])


def main() -> None:
    from pymilvus import AnnSearchRequest, MilvusClient, RRFRanker, WeightedRanker

    from stages.encoder import EncodeParams, Encoder
    from stages.evalsets import load_beir
    from stages.evaluate import query_metrics
    from stages.filter import Bm25Index
    from stages.fusion import Scored, dense_spread, lexical_spread, vector_covariance, zmix
    from stages.gate import paired_bootstrap
    from stages.models import resolve_model_path
    from stages.teacher import zscore

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--analyzer", default="standard", choices=["standard", "jieba"])
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--work", type=Path, help="keep vectors and the collection here between runs")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="embedtune-fusion-"))
    work.mkdir(parents=True, exist_ok=True)
    data = load_beir(args.dataset)
    cache = work / f"{args.dataset.name}.npz"
    if cache.exists():
        with np.load(cache) as saved:
            passages, queries = saved["passages"], saved["queries"]
    else:
        encoder = Encoder(resolve_model_path(args.model), EncodeParams(device="cpu"))
        passages, queries = encoder.passages(data.corpus_texts), encoder.queries(data.queries)
        np.savez(cache, passages=passages, queries=queries)
    client = MilvusClient(uri=str(work / f"{args.dataset.name}-{args.analyzer}.db"))
    _collection(client, passages, data.corpus_texts, args.analyzer)
    client.load_collection("bench")
    started = time.perf_counter()
    dense_hits = client.search(
        "bench",
        data=[q.tolist() for q in queries],
        anns_field="vector",
        limit=DEPTH,
        output_fields=["chunk_id"],
        search_params={"metric_type": "IP"},
    )
    lexical_hits = client.search(
        "bench",
        data=data.queries,
        anns_field="sparse",
        limit=DEPTH,
        output_fields=["chunk_id"],
        search_params={"metric_type": "BM25"},
    )
    search_s = time.perf_counter() - started
    dense = [[Scored(h["entity"]["chunk_id"], float(h["distance"])) for h in hits] for hits in dense_hits]
    lexical = [
        [Scored(h["entity"]["chunk_id"], abs(float(h["distance"]))) for h in hits] for hits in lexical_hits
    ]
    cosines = queries @ passages.T
    covariance = vector_covariance(
        passages[np.random.default_rng(0).choice(len(passages), min(2000, len(passages)), replace=False)]
    )
    bm25 = Bm25Index(data.corpus_texts)
    bm25_matrix = np.stack([bm25.scores(q) for q in data.queries])
    size = len(passages)

    def ndcg(rankings) -> np.ndarray:
        return np.array(
            [query_metrics(list(r), rel)["ndcg@10"] for r, rel in zip(rankings, data.relevant, strict=True)]
        )

    def ids(hits) -> list[int]:
        return [hit.chunk_id for hit in hits]

    rows: dict[str, np.ndarray] = {"dense": ndcg(map(ids, dense)), "lexical": ndcg(map(ids, lexical))}
    for w in WEIGHTS:
        floor, exact, spread = [], [], []
        for row in range(len(queries)):
            d, lx = dense[row], lexical[row]
            dense_of = {hit.chunk_id: float(cosines[row, hit.chunk_id]) for hit in lx}
            own = (
                float(np.std([h.score for h in d]) or 1.0),
                float(np.std([h.score for h in lx]) or 1.0) if lx else 1.0,
            )
            floor.append(ids(_floor_mix(d, lx, w)))
            exact.append(ids(zmix(d, lx, w, DEPTH, dense_of, own)))
            corpus = (dense_spread(queries[row], covariance, d), lexical_spread(lx, size))
            spread.append(ids(zmix(d, lx, w, DEPTH, dense_of, corpus)))
        rows[f"lists-floor w={w}"] = ndcg(floor)
        rows[f"lists-exact w={w}"] = ndcg(exact)
        rows[f"corpus-spread w={w}"] = ndcg(spread)
        mixed = w * zscore(bm25_matrix) + (1 - w) * zscore(cosines)
        rows[f"teacher w={w}"] = ndcg(np.argsort(-mixed, axis=1)[:, :DEPTH])
    for name, ranker in (
        ("milvus-rrf", RRFRanker(60)),
        ("milvus-weighted 0.5/0.5", WeightedRanker(0.5, 0.5)),
        ("milvus-weighted dense 0.2/bm25 0.8", WeightedRanker(0.2, 0.8)),
    ):
        ranked = []
        for row, text in enumerate(data.queries):
            requests = [
                AnnSearchRequest(
                    data=[queries[row].tolist()],
                    anns_field="vector",
                    param={"metric_type": "IP"},
                    limit=DEPTH,
                ),
                AnnSearchRequest(
                    data=[text], anns_field="sparse", param={"metric_type": "BM25"}, limit=DEPTH
                ),
            ]
            hits = client.hybrid_search(
                "bench", requests, ranker=ranker, limit=DEPTH, output_fields=["chunk_id"]
            )
            ranked.append([h["entity"]["chunk_id"] for h in hits[0]])
        rows[name] = ndcg(ranked)
    base = rows["dense"]
    report = {}
    for name, values in rows.items():
        low, high = paired_bootstrap(values, base, 2000, 0) if name != "dense" else (0.0, 0.0)
        report[name] = {
            "ndcg@10": round(float(values.mean()), 4),
            "vs_dense_ci95": [round(low, 4), round(high, 4)],
        }
        print(f"{args.dataset.name:<10} {name:<36} {values.mean():.4f}  vs dense [{low:+.4f}, {high:+.4f}]")
    print(json.dumps({"queries": len(queries), "documents": size, "two_searches_s": round(search_s, 2)}))
    (work / f"{args.dataset.name}-fusion.json").write_text(json.dumps(report, indent=2))


def _floor_mix(dense, lexical, w: float) -> list:
    """The first design: z over each list, a missing score = the list's lowest."""
    from stages.fusion import Scored

    sides = []
    for weight, hits in ((1 - w, dense), (w, lexical)):
        if hits:
            scores = np.array([h.score for h in hits])
            sides.append(
                (
                    weight,
                    {h.chunk_id: h.score for h in hits},
                    scores.min(),
                    scores.mean(),
                    scores.std() or 1.0,
                )
            )
    fused = []
    for chunk_id in dict.fromkeys([h.chunk_id for h in dense] + [h.chunk_id for h in lexical]):
        total = sum(
            weight * (values.get(chunk_id, low) - mean) / std for weight, values, low, mean, std in sides
        )
        fused.append(Scored(chunk_id, total))
    fused.sort(key=lambda h: -h.score)
    return fused[:DEPTH]


if __name__ == "__main__":
    main()
