"""The evaluation pool's bias: a new model judged on a pool (stages/eval_pool.py) versus on the whole
corpus, on real queries.

The corpus is a BEIR set's documents plus other sets' documents as distractors (so the pool is a small
part of it); the model in service is the base; the new models are trained ones (e.g. bench.distill's
outputs). For each pool size it prints every model's nDCG@10 on the whole corpus and on the pool, the
bias (pool minus whole), and the gain over the base both ways with its paired-bootstrap interval: the
pool is fit for the gate when its gains and intervals agree with the whole corpus's.

    python -m bench.eval_pool ../shared/data/nfcorpus --distractors ../shared/data/dbpedia-5k,../shared/data/msmarco-5k \
        --models /tmp/distill-nfcorpus-A/model,/tmp/distill-nfcorpus-B/model --pool-sizes 1000,3000,6000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CACHE = Path(__file__).parent / "out" / "cache" / "eval-pool"


def main() -> int:
    from stages.encoder import EncodeParams, Encoder
    from stages.eval_pool import pool_indices, restrict
    from stages.evalsets import EvalSet, load_beir
    from stages.evaluate import evaluate_retrieval
    from stages.gate import paired_bootstrap
    from stages.models import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--distractors", default="", help="comma-separated BEIR folders")
    parser.add_argument("--base", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--models", required=True, help="comma-separated trained model folders")
    parser.add_argument("--pool-sizes", default="1000,3000,6000")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    real = load_beir(args.dataset, name="real")
    texts = list(real.corpus_texts)
    for folder in filter(None, args.distractors.split(",")):
        texts += load_beir(Path(folder)).corpus_texts
    whole = EvalSet("real", real.queries, texts, real.relevant)
    params = EncodeParams("auto", "", 64)
    paths = {"base": resolve_model_path(args.base)}
    paths.update({Path(m).parent.name or m: Path(m) for m in args.models.split(",")})
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, path in paths.items():
        started = time.monotonic()
        encoder = Encoder(path, params, CACHE)
        vectors[name] = (encoder.queries(whole.queries), encoder.passages(texts, whole.corpus_keys))
        encoder.save_cache()
        print(f"encoded {name}: {len(texts)} passages in {time.monotonic() - started:.0f} s", flush=True)

    def score(name: str, corpus_index: np.ndarray | None) -> list[float]:
        queries, corpus = vectors[name]
        relevant = whole.relevant
        if corpus_index is not None:
            corpus = corpus[corpus_index]
            relevant = restrict(whole, corpus_index).relevant
        return evaluate_retrieval(queries, corpus, relevant).per_query["ndcg@10"]

    full = {name: score(name, None) for name in paths}
    rows = []
    print(f"\ncorpus {len(texts)} chunks, {len(whole)} queries")
    print("| pool | model | nDCG@10 whole | nDCG@10 pool | bias | gain whole [95% CI] | gain pool [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in [int(s) for s in args.pool_sizes.split(",")]:
        base_queries, base_corpus = vectors["base"]
        pool = pool_indices(base_queries, whole.relevant, base_corpus, size)
        pooled = {name: score(name, pool) for name in paths}
        for name in paths:
            row = {
                "pool_size": size,
                "pool": len(pool) if pool is not None else len(texts),
                "model": name,
                "whole": float(np.mean(full[name])),
                "pooled": float(np.mean(pooled[name])),
            }
            row["bias"] = row["pooled"] - row["whole"]
            if name != "base":
                row["gain_whole"] = row["whole"] - float(np.mean(full["base"]))
                row["gain_pool"] = row["pooled"] - float(np.mean(pooled["base"]))
                row["ci_whole"] = paired_bootstrap(full[name], full["base"], 2000)
                row["ci_pool"] = paired_bootstrap(pooled[name], pooled["base"], 2000)
            rows.append(row)

            def gain(kind: str, row=row) -> str:
                if f"gain_{kind}" not in row:
                    return ""
                low, high = row[f"ci_{kind}"]
                return f"{row[f'gain_{kind}']:+.4f} [{low:+.3f}, {high:+.3f}]"

            print(
                f"| {row['pool']} | {name} | {row['whole']:.4f} | {row['pooled']:.4f} | {row['bias']:+.4f} | "
                f"{gain('whole')} | {gain('pool')} |",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"corpus": len(texts), "queries": len(whole), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
