"""Training recipes on real queries, fast: which pseudo-queries, labels and loss carry a teacher over?

Skips the daemon (bench/quality.py runs the whole pipeline): the set's documents are the corpus, pseudo-
queries are made from a sample of them, the hybrid teacher labels them (label repair included), negatives
are mined with the base model, one model is trained under the same bound as a CPU round, and the real
queries score it against the base with a paired-bootstrap 95% interval. The base model's corpus vectors
are cached under bench/out/cache, so a recipe costs its training plus one corpus encoding.

    python -m bench.distill ../shared/data/nfcorpus --generator keyphrase --loss mnrl+margin_mse
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

CACHE = Path(__file__).parent / "out" / "cache"


def main() -> int:
    from stages.encoder import EncodeParams, Encoder
    from stages.evalsets import load_beir
    from stages.evaluate import RetrievalEvaluator
    from stages.gate import paired_bootstrap
    from stages.labels import (
        LabelParams,
        LabelQuery,
        label_examples,
        pair_texts,
        pairs_to_score,
        student_candidates,
    )
    from stages.models import resolve_model_path
    from stages.pseudo import pseudo_queries
    from stages.teacher import HybridTeacher, teacher_bm25_share
    from stages.text import detect_language
    from stages.train import TrainParams, train_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--generator", default="inverse_cloze")
    parser.add_argument("--per-doc", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=1000, help="training pairs (a CPU round's max_pairs)")
    parser.add_argument("--loss", default="mnrl")
    parser.add_argument("--repair", default="relabel", choices=["none", "drop", "relabel"])
    parser.add_argument("--keep-rank", type=int, default=3)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--weight", type=float, help="BM25 weight of the teacher (default by language)")
    parser.add_argument("--no-teacher", action="store_true", help="source chunk as positive, base negatives")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    started = time.monotonic()
    real = load_beir(args.dataset, name="real")
    language = detect_language(" ".join(real.corpus_texts[:200]))
    base_path = resolve_model_path(args.model)
    params = EncodeParams("auto", "", 64)
    encoder = Encoder(base_path, params)
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = CACHE / f"{args.dataset.name}-{base_path.name}.npy"
    if cached.exists():
        corpus_vectors = np.load(cached)
    else:
        corpus_vectors = encoder.passages(real.corpus_texts)
        np.save(cached, corpus_vectors)
    weight = args.weight if args.weight is not None else teacher_bm25_share(language)
    teacher = HybridTeacher(real.corpus_texts, encoder, weight, corpus_vectors)

    rng = random.Random(args.seed)
    order = list(range(len(real.corpus_texts)))
    rng.shuffle(order)
    queries, sources = [], []
    for doc in order:
        text = real.corpus_texts[doc]
        title, _, body = text.partition("\n")
        for candidate in pseudo_queries(
            body or title,
            title,
            language,
            f"{doc}",
            args.generator,
            args.per_doc,
            args.seed,
            idf=teacher.bm25.idf,
        ):
            queries.append(candidate.query)
            sources.append(doc)
        if len(queries) >= args.pairs * 1.6:
            break
    made = time.monotonic()
    query_vectors = encoder.queries(queries)
    label_queries = [
        LabelQuery(q, doc, real.corpus_texts[doc], float(query_vectors[i] @ corpus_vectors[doc]))
        for i, (q, doc) in enumerate(zip(queries, sources, strict=True))
    ]
    label_params = LabelParams(
        negatives=args.negatives, keep_rank=args.keep_rank, repair=args.repair, seed=args.seed
    )
    found = student_candidates(query_vectors, corpus_vectors, label_params.rank_range[1] + 1)
    scores = None
    if not args.no_teacher:
        pairs = pairs_to_score(label_queries, found, label_params)
        q_texts, p_texts = pair_texts(label_queries, pairs, real.corpus_texts)
        values = np.concatenate(
            [
                teacher.score_pairs(q_texts[k : k + 4096], p_texts[k : k + 4096])
                for k in range(0, len(pairs), 4096)
            ]
        )
        scores = dict(zip(pairs, values.tolist(), strict=True))
    labelled = label_examples(label_queries, found, scores, label_params)
    examples = [
        {
            "query": e.query,
            "pos": real.corpus_texts[e.positive],
            "neg": [real.corpus_texts[j] for j in e.negatives],
            "scores": e.scores,
        }
        for e in labelled.examples[: args.pairs]
    ]
    labelled_at = time.monotonic()
    out = Path(f"/tmp/distill-{args.dataset.name}-{int(started)}")
    outcome = train_model(
        base_path,
        out / "model",
        examples,
        TrainParams(
            epochs=args.epochs, batch_size=args.batch, learning_rate=args.lr, loss=args.loss, max_minutes=60
        ),
    )
    trained = time.monotonic()
    evaluator = RetrievalEvaluator(real, "ndcg@10")
    base = evaluator(encoder, corpus_vectors)
    tuned = evaluator(Encoder(out / "model", params))
    interval = paired_bootstrap(tuned.per_query["ndcg@10"], base.per_query["ndcg@10"], 2000)
    result = {
        "dataset": args.dataset.name,
        "args": {k: str(v) for k, v in vars(args).items()},
        "queries_made": len(queries),
        "label_stats": labelled.stats,
        "examples": len(examples),
        "train": {"steps": outcome.steps, "loss": outcome.final_loss, "seconds": round(outcome.seconds)},
        "base": {k: base.metrics[k] for k in ("ndcg@10", "recall@10", "recall@100")},
        "tuned": {k: tuned.metrics[k] for k in ("ndcg@10", "recall@10", "recall@100")},
        "gain": tuned.metrics["ndcg@10"] - base.metrics["ndcg@10"],
        "ci": interval,
        "seconds": {
            "queries": round(made - started),
            "label": round(labelled_at - made),
            "train": round(trained - labelled_at),
            "eval": round(time.monotonic() - trained),
        },
        "sample_queries": queries[:8],
    }
    print(json.dumps(result, indent=1, ensure_ascii=False))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
