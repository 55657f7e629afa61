"""Encoding per backend: torch fp32 against ONNX Runtime fp32 and int8, on one model and one BEIR set.

    python -m bench.backends ../shared/data/nfcorpus --model packaged:all-MiniLM-L6-v2
    python -m bench.backends ../shared/data/zh-medqa --model packaged:multilingual-e5-small

Prints, all measured in this run on this machine: the export (seconds, the check's verdict per variant as
the daemon would record it, on 256 passages and 64 of the set's queries), throughput (passages and short
queries per second, ratio to torch, and to torch as it encoded before token-budget batches) and, unless --no-quality, nDCG@10 on the set's real queries per
backend with the paired-bootstrap 95% interval of the difference to torch.

    python -m bench.backends ../shared/data/nfcorpus --device cuda

On a GPU (no ONNX there: exports are for CPUs) the rows are torch fp32 (the reference, and "before": how
a GPU encoded before `model.encode_precision`), fp16 (what "auto" now picks there) and bf16.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

BEFORE = "torch, one call of batch 64 (before)"


def check_sample(data, size: int = 256, n_queries: int = 64, seed: int = 0):
    """Queries with their first relevant document, plus random other documents up to `size` passages."""
    from stages.backend_check import CheckSample

    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(data.queries))[:n_queries].tolist()
    docs = list(dict.fromkeys(next(iter(data.relevant[q])) for q in picked))
    others = [i for i in rng.permutation(len(data.corpus_texts)).tolist() if i not in set(docs)]
    docs += others[: max(0, size - len(docs))]
    where = {doc: i for i, doc in enumerate(docs)}
    return CheckSample(
        [data.corpus_texts[i] for i in docs],
        [data.queries[q] for q in picked],
        [where[next(iter(data.relevant[q]))] for q in picked],
    )


def encoders(model_path: Path, exports: Path, record):
    """torch as it encoded before, torch, and each variant of the export."""
    from stages.encoder import EncodeParams, Encoder
    from stages.onnx_encoder import OnnxEmbedder
    from stages.onnx_export import VARIANT_FILES, export_dir

    params = EncodeParams(device="cpu")
    # the baseline: batches as encoding was cut before token budgets (the model sorts by characters)
    yield BEFORE, Encoder(model_path, EncodeParams(device="cpu", batch_tokens=1 << 30))
    yield "torch", Encoder(model_path, params)
    folder = export_dir(exports, model_path)
    for variant in record.variants:
        model = OnnxEmbedder(folder / VARIANT_FILES[variant], model_path)
        yield f"onnx {variant}", Encoder(model_path, params, model=model)


def gpu_encoders(model_path: Path, device: str):
    """torch on a GPU in each precision; fp32 is both the reference and how it encoded before."""
    from stages.encoder import EncodeParams, Encoder

    yield BEFORE, Encoder(model_path, EncodeParams(device=device, precision="fp32"))
    yield "torch", Encoder(model_path, EncodeParams(device=device, precision="fp32"))
    for precision in ("fp16", "bf16"):
        yield f"torch {precision}", Encoder(model_path, EncodeParams(device=device, precision=precision))


def encode_rates(encoder, passages: list[str], queries: list[str], warmup: int = 16) -> tuple[float, float]:
    """(passages/s, queries/s) of an encoder, after a warm-up (first-call allocations are not throughput)."""
    encoder.passages(passages[:warmup])
    started = time.perf_counter()
    encoder.passages(passages)
    passage_s = time.perf_counter() - started
    started = time.perf_counter()
    encoder.queries(queries)
    return len(passages) / passage_s, len(queries) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--throughput-passages", type=int, default=512)
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu (torch and ONNX), or cuda (torch per precision)")
    args = parser.parse_args()

    from stages.backend_check import check_variants
    from stages.encoder import EncodeParams
    from stages.evalsets import load_beir
    from stages.evaluate import query_metrics
    from stages.gate import paired_bootstrap
    from stages.models import resolve_model_path
    from stages.onnx_export import export_model

    work = Path(tempfile.mkdtemp(prefix="embedtune-backends-"))
    model_path = resolve_model_path(args.model)
    data = load_beir(args.dataset, split=args.split, name=args.dataset.name)
    out: dict = {"model": args.model, "dataset": args.dataset.name, "device": args.device}
    if args.device == "cpu":
        sample = check_sample(data)
        record = export_model(
            model_path,
            work,
            lambda path, files: check_variants(path, files, sample, EncodeParams(device="cpu")),
        )
        out["export"] = json.loads(record.to_json())
        print(json.dumps({"export": out["export"]}), flush=True)
        if record.failed:
            return 1
        runs = encoders(model_path, work, record)
    else:
        runs = gpu_encoders(model_path, args.device)

    rng = np.random.default_rng(1)
    passages = [
        data.corpus_texts[i] for i in rng.permutation(len(data.corpus_texts))[: args.throughput_passages]
    ]
    queries = data.queries[: args.throughput_passages]
    throughput, scores = {}, {}
    for name, encoder in runs:
        passages_per_s, queries_per_s = encode_rates(encoder, passages, queries)
        throughput[name] = {"passages_per_s": passages_per_s, "queries_per_s": queries_per_s}
        print(json.dumps({"throughput": name, **throughput[name]}), flush=True)
        if not args.no_quality and name != BEFORE:  # the same model and runtime as "torch"
            started = time.perf_counter()
            matrix = encoder.queries(data.queries) @ encoder.passages(data.corpus_texts).T
            values = []
            for row, relevant in zip(matrix, data.relevant, strict=True):
                values.append(query_metrics(np.argsort(-row)[:100].tolist(), relevant)["ndcg@10"])
            scores[name] = np.array(values)
            print(
                json.dumps(
                    {
                        "quality": name,
                        "ndcg@10": float(scores[name].mean()),
                        "s": time.perf_counter() - started,
                    }
                ),
                flush=True,
            )
        encoder.release()
    base, before = throughput["torch"], throughput[BEFORE]
    rows = {}
    for name in throughput:
        row = {
            **throughput[name],
            "passages_ratio": throughput[name]["passages_per_s"] / base["passages_per_s"],
            "queries_ratio": throughput[name]["queries_per_s"] / base["queries_per_s"],
            "passages_vs_before": throughput[name]["passages_per_s"] / before["passages_per_s"],
        }
        if scores and name in scores:
            row["ndcg@10"] = float(scores[name].mean())
            if name != "torch":
                row["vs_torch"] = float((scores[name] - scores["torch"]).mean())
                row["vs_torch_ci"] = paired_bootstrap(scores[name], scores["torch"])
        rows[name] = row
    out.update(rows=rows, queries=len(data.queries), documents=len(data.corpus_texts))
    print(json.dumps({"rows": rows}, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
