"""The gate's view of what users are served: a set's queries ranked by the hybrid the index serves
(BM25 over the set's corpus fused with the variant's vectors, stages/fusion.py), scored like any set.

In a round the corpus is the snapshot (or the evaluation pool), in memory, so BM25 here is rank_bm25 with
the teacher's tokenizer rather than Milvus' (the same words; docs/index.md), and the fusion is the same
function with the same candidate depth, the same spreads and the same BM25 share as `embedtune search`.
"""

from __future__ import annotations

import numpy as np

from stages.evalsets import EvalSet
from stages.evaluate import METRICS, SEARCH_DEPTH, EvalResult, evaluate_rankings, stand_in_vectors
from stages.filter import Bm25Index
from stages.fusion import (
    Scored,
    candidate_depth,
    fuse_hybrid,
    fusion_spreads,
    sample_covariance,
)
from stages.gate import SERVED_SUFFIX


def served_name(set_name: str) -> str:
    return set_name + SERVED_SUFFIX


class HybridEvaluator:
    """Like RetrievalEvaluator (same call, same result), ranking with the served hybrid fusion.
    BM25 depends on the corpus only, so it is computed once for every variant judged."""

    greater_is_better = True

    def __init__(
        self,
        eval_set: EvalSet,
        bm25_weight: float | None,
        primary_metric: str = "ndcg@10",
        candidates: int = 100,
        sweep: tuple[float, ...] = (),
    ) -> None:
        if primary_metric not in METRICS:
            raise ValueError(f"unknown metric {primary_metric!r}; one of {', '.join(METRICS)}")
        self.eval_set = eval_set
        self.name = served_name(eval_set.name)
        self.primary_metric = primary_metric
        self.bm25_weight = bm25_weight
        # Each half's list as `embedtune search -k <the metric's cutoff>` gets it (`index.candidates`).
        self.depth = candidate_depth(int(primary_metric.rsplit("@", 1)[1]), candidates)
        self.sweep = sweep  # also score these shares (the round picks the served one on the user's set)
        self._lexical: list[list[Scored]] | None = None

    def _lexical_lists(self) -> list[list[Scored]]:
        if self._lexical is None:
            index = Bm25Index(self.eval_set.corpus_texts)
            self._lexical = []
            stand_ins = self.eval_set.stand_ins or [{}] * len(self.eval_set.queries)
            for query, own in zip(self.eval_set.queries, stand_ins, strict=True):
                scores = index.scores(query)
                for position, text in own.items():  # the chunk with the query taken out
                    scores[position] = index.score_text(query, text)
                top = np.argsort(-scores, kind="stable")[: self.depth]
                self._lexical.append([Scored(int(i), float(scores[i])) for i in top if scores[i] > 0])
        return self._lexical

    def rankings(
        self, encoder, corpus_vectors: np.ndarray | None, weights: list[float | None]
    ) -> dict[float | None, list[list[int]]]:
        """Each query's fused list (corpus positions, best first) at each BM25 share in `weights`."""
        passages = (
            corpus_vectors
            if corpus_vectors is not None
            else encoder.passages(self.eval_set.corpus_texts, self.eval_set.corpus_keys)
        )
        queries = encoder.queries(self.eval_set.queries)
        covariance = sample_covariance(passages)
        cosines = queries @ passages.T
        for row, own in enumerate(stand_in_vectors(encoder, self.eval_set)):
            for position, vector in own.items():
                cosines[row, position] = float(np.dot(queries[row], vector))
        corpus_size = len(passages)
        weights = list(dict.fromkeys(weights))
        ranked: dict[float | None, list[list[int]]] = {w: [] for w in weights}
        for row, lexical in enumerate(self._lexical_lists()):
            scores = cosines[row]
            top = np.argsort(-scores, kind="stable")[: self.depth]
            dense = [Scored(int(i), float(scores[i])) for i in top]
            dense_of = {hit.chunk_id: float(scores[hit.chunk_id]) for hit in lexical}
            spreads = fusion_spreads(queries[row], covariance, dense, lexical, corpus_size)
            for weight in weights:
                fused = fuse_hybrid(
                    self.eval_set.queries[row], dense, lexical, weight, SEARCH_DEPTH, dense_of, spreads
                )
                ranked[weight].append([hit.chunk_id for hit in fused])
        return ranked

    def __call__(self, encoder, corpus_vectors: np.ndarray | None = None) -> EvalResult:
        if not self.eval_set.queries or not self.eval_set.corpus_texts:
            return evaluate_rankings([], [], self.primary_metric)
        ranked = self.rankings(encoder, corpus_vectors, [self.bm25_weight, *self.sweep])
        return self.score(ranked, self.eval_set.relevant)

    def score(
        self, ranked: dict[float | None, list[list[int]]], relevant: list[dict[int, float]]
    ) -> EvalResult:
        """The result at the served share, with the sweep's scores beside it when there is one."""
        result = evaluate_rankings(ranked[self.bm25_weight], relevant, self.primary_metric)
        if self.sweep:
            result.extra["bm25_weight"] = self.bm25_weight
            result.extra["bm25_sweep"] = {
                f"{w:g}": round(evaluate_rankings(ranked[w], relevant, self.primary_metric).primary, 5)
                for w in self.sweep
            }
        return result
