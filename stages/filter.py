"""Keep a synthetic pair only when its own chunk stands out among the chunks that compete for its query.

Candidates are the BM25 top-N over all active chunks (jieba tokens for Chinese) plus the positive;
they are scored by the reranker (a cross-encoder) or, without one, by the embedding model. The pair is
kept when the positive ranks within the top `featured_percentage` of that list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from rank_bm25 import BM25Okapi

from stages.text import tokenize_for_bm25


@dataclass(frozen=True)
class FilterInput:
    sample_id: int
    query: str
    positive_index: int  # index of the positive chunk in the corpus
    positive_text: str  # the passage (the chunk, or the chunk minus the query sentence)


@dataclass(frozen=True)
class FilterResult:
    sample_id: int
    kept: bool
    rank: int
    candidates: int
    bm25_score: float
    rerank_score: float
    reason: str | None


class Bm25Index:
    def __init__(self, texts: Sequence[str]) -> None:
        self.tokens = [tokenize_for_bm25(text) or ["\u2205"] for text in texts]
        self.bm25 = BM25Okapi(self.tokens)

    @property
    def idf(self) -> dict[str, float]:
        """Inverse document frequency of each corpus token (keyphrase pseudo-queries weigh words by it)."""
        return self.bm25.idf

    def score_text(self, query: str, text: str) -> float:
        """BM25 of a text that is not in the index, with the index's statistics (idf, average length)."""
        bm25 = self.bm25
        tokens = tokenize_for_bm25(text)
        length = len(tokens)
        frequencies: dict[str, int] = {}
        for token in tokens:
            frequencies[token] = frequencies.get(token, 0) + 1
        total = 0.0
        for term in tokenize_for_bm25(query):
            tf = frequencies.get(term, 0)
            if tf:
                norm = tf + bm25.k1 * (1 - bm25.b + bm25.b * length / bm25.avgdl)
                total += bm25.idf.get(term, 0.0) * tf * (bm25.k1 + 1) / norm
        return total

    def scores(self, query: str) -> np.ndarray:
        return np.asarray(self.bm25.get_scores(tokenize_for_bm25(query)), dtype=np.float32)


# (queries, passages) -> scores, pairwise
PairScorer = Callable[[list[str], list[str]], np.ndarray]


def filter_pairs(
    items: Sequence[FilterInput],
    corpus_texts: Sequence[str],
    bm25: Bm25Index,
    score_pairs: PairScorer,
    featured_percentage: float,
    candidates: int,
) -> list[FilterResult]:
    results = []
    for item in items:
        bm25_scores = bm25.scores(item.query)
        order = np.argsort(-bm25_scores, kind="stable")[:candidates]
        competitors = [int(i) for i in order if int(i) != item.positive_index]
        texts = [item.positive_text] + [corpus_texts[i] for i in competitors]
        scores = np.asarray(score_pairs([item.query] * len(texts), texts), dtype=np.float32)
        rank = 1 + int(np.sum(scores[1:] > scores[0]))
        cutoff = max(1, math.ceil(featured_percentage * len(texts)))
        kept = rank <= cutoff
        results.append(
            FilterResult(
                sample_id=item.sample_id,
                kept=kept,
                rank=rank,
                candidates=len(texts),
                bm25_score=float(bm25_scores[item.positive_index]),
                rerank_score=float(scores[0]),
                reason=None if kept else f"positive ranked {rank} of {len(texts)} (top {cutoff} kept)",
            )
        )
    return results


def embedding_pair_scorer(
    encode_queries: Callable[[list[str]], np.ndarray], encode_passages: Callable[[list[str]], np.ndarray]
) -> PairScorer:
    """Similarity of the current embedding model, used when no reranker is configured."""

    def score(queries: list[str], passages: list[str]) -> np.ndarray:
        unique_queries = list(dict.fromkeys(queries))
        q = encode_queries(unique_queries)
        index = {text: row for row, text in enumerate(unique_queries)}
        p = encode_passages(passages)
        return np.einsum("ij,ij->i", q[[index[text] for text in queries]], p)

    return score


def reranker_pair_scorer(reranker) -> PairScorer:
    """A cross-encoder (FlagEmbedding's FlagReranker) scoring (query, passage) pairs."""

    def score(queries: list[str], passages: list[str]) -> np.ndarray:
        values = reranker.compute_score([[q, p] for q, p in zip(queries, passages, strict=True)])
        if isinstance(values, float | int):
            values = [values]
        return np.asarray(values, dtype=np.float32)

    return score
