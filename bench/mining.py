"""Hard-negative mining side by side: the round's miner (stages.negatives, exact faiss over the corpus
vectors) against sentence-transformers' `mine_hard_negatives` with faiss, on the same pairs, corpus and
model, each in a fresh process (wall time and peak RSS).

Same recipe on both sides: 3 negatives per pair, drawn at random from ranks 2-200 of the model's
retrieval, skipping candidates within 0.05 cosine of the positive (sentence-transformers:
`absolute_margin=0.05`, `range_min=1`, `range_max=200`, `sampling_strategy="random"`). The round's miner
is timed twice: with a cold embedding cache (it encodes the corpus, as sentence-transformers must) and
with the model in service's cached vectors (a round's usual case: the index and earlier rounds encoded
them).

    python -m bench.mining --sizes 10000,100000 --model tiny
    python -m bench.mining --sizes 10000 --model packaged:all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = 1000
NEGATIVES = 3
RANKS = (2, 200)
MARGIN = 0.05


def corpus_and_pairs(size: int) -> tuple[list[str], list[str], list[int]]:
    """`size` real passages and PAIRS pseudo-queries (inverse cloze) from the first of them."""
    from bench.index import passages
    from stages.pseudo import pseudo_queries

    texts = list(itertools.islice(passages(), size))
    queries, sources = [], []
    for i, text in enumerate(texts):
        made = pseudo_queries(text, "", "en", str(i), "inverse_cloze", 1, 0)
        if made:
            queries.append(made[0].query)
            sources.append(i)
        if len(queries) == PAIRS:
            break
    return texts, queries, sources


def ours(model: str, size: int, cache: Path | None) -> dict:
    from stages.encoder import EncodeParams, Encoder
    from stages.negatives import build_index, mine_hard_negatives

    texts, queries, sources = corpus_and_pairs(size)
    encoder = Encoder(Path(model), EncodeParams("cpu", "", 64), cache)
    started = time.monotonic()
    corpus_vectors = encoder.passages(texts)
    encoded = time.monotonic()
    mined = mine_hard_negatives(
        encoder.queries(queries),
        [{s} for s in sources],
        corpus_vectors[sources],
        build_index(corpus_vectors),
        NEGATIVES,
        RANKS,
        MARGIN,
    )
    done = time.monotonic()
    if cache is not None:
        encoder.save_cache()
    return {
        "seconds": round(done - started, 1),
        "encode_s": round(encoded - started, 1),
        "mine_s": round(done - encoded, 1),
        "rows": sum(1 for m in mined if len(m.negatives) == NEGATIVES),
    }


def theirs(model: str, size: int) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    texts, queries, sources = corpus_and_pairs(size)
    st_model = SentenceTransformer(model, device="cpu")
    data = Dataset.from_dict({"query": queries, "positive": [texts[s] for s in sources]})
    started = time.monotonic()
    mined = mine_hard_negatives(
        data,
        st_model,
        corpus=texts,
        range_min=RANKS[0] - 1,
        range_max=RANKS[1],
        absolute_margin=MARGIN,
        num_negatives=NEGATIVES,
        sampling_strategy="random",
        output_format="n-tuple",
        batch_size=64,
        use_faiss=True,
        verbose=False,
    )
    return {"seconds": round(time.monotonic() - started, 1), "rows": len(mined)}


def child(kind: str, model: str, size: int, cache: str) -> dict:
    from daemon.round_process import peak_rss_mb, reset_peak_rss

    reset_peak_rss()
    if kind == "sentence-transformers":
        result = theirs(model, size)
    else:
        result = ours(model, size, Path(cache) if cache else None)
    return {**result, "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "mining.json")
    args = parser.parse_args()
    if args.child:
        kind, size, cache = json.loads(args.child)
        print(json.dumps(child(kind, args.model, size, cache)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from bench.scale import bench_model

        model = bench_model(args.model, Path(tmp))
        print("| chunks | miner | seconds | of which encoding | peak RSS MB | rows with 3 negatives |")
        print("| --- | --- | --- | --- | --- | --- |")
        for size in [int(s) for s in args.sizes.split(",")]:
            cache = Path(tmp) / f"cache-{size}"
            runs = [
                ("sentence-transformers", "sentence-transformers", ""),
                ("embedtune, cold cache", "embedtune", str(cache)),
                ("embedtune, cached vectors", "embedtune", str(cache)),
            ]
            for label, kind, cache_dir in runs:
                done = subprocess.run(
                    [sys.executable, "-m", "bench.mining", "--model", model, "--child"]
                    + [json.dumps([kind, size, cache_dir])],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    check=True,
                )
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"chunks": size, "miner": label, **result})
                print(
                    f"| {size:,} | {label} | {result['seconds']} | {result.get('encode_s', '')} | "
                    f"{result['peak_rss_mb']} | {result['rows']} |",
                    flush=True,
                )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
