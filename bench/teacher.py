"""The hybrid teacher as a retriever on a BEIR set's real queries: is there a teacher stronger than the
student (the base model) to learn from? Rows: the base model (dense), BM25, and the hybrid mix at several
BM25 weights, each with the paired-bootstrap 95% interval of its nDCG@10 gain over the base.

    python -m bench.teacher ../shared/data/nfcorpus [--weights 0.3 0.5 0.7] [--model packaged:all-MiniLM-L6-v2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    from stages.encoder import EncodeParams, Encoder
    from stages.evalsets import load_beir
    from stages.evaluate import evaluate_scores
    from stages.gate import paired_bootstrap
    from stages.models import resolve_model_path
    from stages.teacher import HybridTeacher, teacher_bm25_share
    from stages.text import detect_language

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--query-instruction", default="")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.2, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    started = time.monotonic()
    real = load_beir(args.dataset, name="real")
    language = detect_language(" ".join(real.corpus_texts[:200]))
    encoder = Encoder(resolve_model_path(args.model), EncodeParams("auto", args.query_instruction, 64))
    teacher = HybridTeacher(real.corpus_texts, encoder, teacher_bm25_share(language))
    encoded = time.monotonic() - started
    parts = teacher.components(real.queries)
    rows = {"base (dense)": parts.dense, "BM25": parts.bm25}
    for weight in args.weights:
        rows[f"hybrid w={weight:g}"] = parts.mix(weight)
    results = {name: evaluate_scores(matrix, real.relevant) for name, matrix in rows.items()}
    base = results["base (dense)"].per_query["ndcg@10"]
    print(
        f"\n{args.dataset.name}: {len(real.corpus_texts)} documents, {len(real)} queries, language {language} "
        f"(default BM25 weight {teacher_bm25_share(language)}); encoding {encoded:.0f}s"
    )
    print(f"{'retriever':<16} {'nDCG@10':>8} {'95% CI vs base':>18} {'R@10':>7} {'R@100':>7}")
    table = {}
    for name, result in results.items():
        interval = (
            paired_bootstrap(result.per_query["ndcg@10"], base, 2000) if name != "base (dense)" else None
        )
        text = f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""
        m = result.metrics
        print(f"{name:<16} {m['ndcg@10']:>8.4f} {text:>18} {m['recall@10']:>7.4f} {m['recall@100']:>7.4f}")
        table[name] = {
            "ndcg@10": m["ndcg@10"],
            "recall@10": m["recall@10"],
            "recall@100": m["recall@100"],
            "ci_vs_base": interval,
        }
    if args.json:
        args.json.write_text(
            json.dumps({"dataset": args.dataset.name, "language": language, "rows": table}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
