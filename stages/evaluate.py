"""Retrieval evaluation: queries against a corpus with faiss inner product on normalized embeddings.

Primary metric is configurable; greater is better for every metric here. Per-query values are kept
so that two models can be compared query by query (paired bootstrap in stages.gate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stages.evalsets import EvalSet
from stages.negatives import build_index

METRICS = ("recall@1", "recall@5", "recall@10", "recall@20", "recall@100", "ndcg@10", "mrr@10", "map@10")
SEARCH_DEPTH = 100


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_query: dict[str, list[float]] = field(default_factory=dict)
    n_queries: int = 0
    primary_metric: str = "ndcg@10"
    extra: dict = field(default_factory=dict)  # evaluator-specific findings (the hybrid's weight sweep)

    @property
    def primary(self) -> float:
        """The value the gate compares (greater is better for every metric here)."""
        return self.metrics[self.primary_metric]

    @property
    def primary_per_query(self) -> list[float]:
        return self.per_query.get(self.primary_metric, [])

    def to_json(self) -> dict:
        """The summary a round records (per-query lists, the extras named with a leading "_", stay in
        per_query.json)."""
        return {
            "n_queries": self.n_queries,
            **{k: round(v, 5) for k, v in self.metrics.items()},
            **{k: v for k, v in self.extra.items() if not k.startswith("_")},
        }


def query_metrics(ranked: Sequence[int], relevant: dict[int, float]) -> dict[str, float]:
    """Metrics of one ranked list; `relevant` maps corpus index to graded relevance (> 0)."""
    hits = [1 if doc in relevant else 0 for doc in ranked]
    n_rel = len(relevant)
    out: dict[str, float] = {}
    for k in (1, 5, 10, 20, 100):
        out[f"recall@{k}"] = sum(hits[:k]) / n_rel if n_rel else 0.0
    gains = [relevant.get(doc, 0.0) for doc in ranked[:10]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted(relevant.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    out["ndcg@10"] = dcg / idcg if idcg else 0.0
    out["mrr@10"] = next((1.0 / (i + 1) for i, h in enumerate(hits[:10]) if h), 0.0)
    precisions = [sum(hits[: i + 1]) / (i + 1) for i, h in enumerate(hits[:10]) if h]
    out["map@10"] = sum(precisions) / min(n_rel, 10) if n_rel else 0.0
    return out


def evaluate_scores(
    scores: np.ndarray, relevant: Sequence[dict[int, float]], primary_metric: str = "ndcg@10"
) -> EvalResult:
    """The same metrics from a queries x corpus score matrix (retrievers that are not one vector space,
    such as BM25 or the hybrid teacher)."""
    per_query: dict[str, list[float]] = {name: [] for name in METRICS}
    depth = min(SEARCH_DEPTH, scores.shape[1]) if scores.ndim == 2 else 0
    for row, rel in enumerate(relevant):
        top = np.argpartition(-scores[row], depth - 1)[:depth] if depth else np.array([], dtype=int)
        ranked = top[np.argsort(-scores[row][top], kind="stable")]
        values = query_metrics([int(i) for i in ranked], rel)
        for name in METRICS:
            per_query[name].append(values[name])
    metrics = {name: float(np.mean(per_query[name])) if per_query[name] else 0.0 for name in METRICS}
    return EvalResult(metrics, per_query, len(relevant), primary_metric)


def evaluate_rankings(
    ranked: Sequence[Sequence[int]], relevant: Sequence[dict[int, float]], primary_metric: str = "ndcg@10"
) -> EvalResult:
    """The same metrics from ranked lists of corpus indices, one per query (what a search returned)."""
    per_query: dict[str, list[float]] = {name: [] for name in METRICS}
    for ranking, rel in zip(ranked, relevant, strict=True):
        values = query_metrics(list(ranking), rel)
        for name in METRICS:
            per_query[name].append(values[name])
    metrics = {name: float(np.mean(per_query[name])) if per_query[name] else 0.0 for name in METRICS}
    return EvalResult(metrics, per_query, len(relevant), primary_metric)


StandInVectors = dict[int, np.ndarray]  # corpus index -> the vector scored in that chunk's place


def evaluate_retrieval(
    query_vectors: np.ndarray,
    corpus_vectors: np.ndarray,
    relevant: Sequence[dict[int, float]],
    stand_ins: Sequence[StandInVectors] = (),
) -> EvalResult:
    """Exact top-100 search per query; a query's stand-ins replace those chunks' vectors for it alone."""
    if len(relevant) == 0 or len(corpus_vectors) == 0:
        return EvalResult({name: 0.0 for name in METRICS}, {name: [] for name in METRICS}, 0)
    return evaluate_rankings(dense_rankings(query_vectors, corpus_vectors, stand_ins), relevant)


def dense_rankings(
    query_vectors: np.ndarray, corpus_vectors: np.ndarray, stand_ins: Sequence[StandInVectors] = ()
) -> list[list[int]]:
    """Each query's top 100 corpus positions by exact inner product (stand-ins scored in their chunks'
    place for that query alone)."""
    if len(query_vectors) == 0 or len(corpus_vectors) == 0:
        return [[] for _ in range(len(query_vectors))]
    index = build_index(corpus_vectors)
    replaced = max((len(s) for s in stand_ins), default=0)
    depth = min(SEARCH_DEPTH + replaced, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), depth)
    return [
        _ranked_with_stand_ins(ids[row], scores[row], query_vectors[row], stand_ins[row] if stand_ins else {})
        for row in range(len(query_vectors))
    ]


def _ranked_with_stand_ins(
    ids: np.ndarray, scores: np.ndarray, query_vector: np.ndarray, stand_ins: StandInVectors
) -> list[int]:
    """The searched list with each stand-in chunk re-scored by its stand-in vector (the search went
    deep enough that the top 100 stays exact once those chunks are taken out of it)."""
    if not stand_ins:
        return [int(i) for i in ids[:SEARCH_DEPTH] if i >= 0]
    hits = [
        (float(s), int(i)) for s, i in zip(scores, ids, strict=True) if i >= 0 and int(i) not in stand_ins
    ]
    hits += [(float(np.dot(query_vector, vector)), position) for position, vector in stand_ins.items()]
    hits.sort(key=lambda hit: -hit[0])
    return [position for _score, position in hits[:SEARCH_DEPTH]]


def stand_in_vectors(encoder, eval_set: EvalSet) -> list[StandInVectors]:
    """Each query's stand-in texts encoded as passages, in one batch (empty when the set has none)."""
    if not any(eval_set.stand_ins):
        return []
    texts = [text for per_query in eval_set.stand_ins for text in per_query.values()]
    vectors = iter(encoder.passages(texts))
    return [{position: next(vectors) for position in per_query} for per_query in eval_set.stand_ins]


class RetrievalEvaluator:
    """Scores an encoder on one evaluation set. Like sentence-transformers' evaluators it names its
    primary metric and says that greater is better, so the gate compares named results, never dict keys
    picked by the caller.

    `corpus_vectors` lets the round pass passage vectors it already has (the model in service's, from
    its embedding cache) instead of encoding the corpus again."""

    greater_is_better = True

    def __init__(self, eval_set: EvalSet, primary_metric: str = "ndcg@10") -> None:
        if primary_metric not in METRICS:
            raise ValueError(f"unknown metric {primary_metric!r}; one of {', '.join(METRICS)}")
        self.eval_set = eval_set
        self.name = eval_set.name
        self.primary_metric = primary_metric

    def __call__(self, encoder, corpus_vectors: np.ndarray | None = None) -> EvalResult:
        passages = (
            corpus_vectors
            if corpus_vectors is not None
            else encoder.passages(self.eval_set.corpus_texts, self.eval_set.corpus_keys)
        )
        result = evaluate_retrieval(
            encoder.queries(self.eval_set.queries),
            passages,
            self.eval_set.relevant,
            stand_in_vectors(encoder, self.eval_set),
        )
        result.primary_metric = self.primary_metric
        return result
