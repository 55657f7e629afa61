"""Hybrid ranking: one query's dense and lexical (BM25) result lists fused into one.

The teacher (stages/teacher.py) mixes z-normalised scores of every corpus passage; a search engine returns
each side's top-N list only. Measured on nfcorpus over Milvus top-100 lists (docs/benchmarks.md, "Hybrid
retrieval"), what matters is how a candidate that only one side returned is scored:
- found by BM25 only: its dense score is computed exactly (the caller passes the candidates' cosines,
  from their stored vectors); filling it with the dense list's lowest score instead lost 0.015 nDCG@10;
- found by the dense side only: BM25 0 (its true score is below the N-th, and usually 0: no query word).
Each side is then z-normalised with its own top-N list's mean and spread and mixed as
`w * z(bm25) + (1 - w) * z(dense)`, `w` being the BM25 share. Reciprocal rank fusion is kept as the
alternative measured beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MODES = ("hybrid", "dense", "lexical")
RRF_K = 60


@dataclass(frozen=True)
class Scored:
    """A candidate from one side: its id and that side's raw score (higher is better)."""

    chunk_id: int
    score: float


def _stats(hits: Sequence[Scored]) -> tuple[float, float]:
    if not hits:
        return 0.0, 1.0
    scores = np.asarray([hit.score for hit in hits], dtype=np.float64)
    std = float(scores.std())
    return float(scores.mean()), std if std > 0 else 1.0


def lexical_only(dense: Sequence[Scored], lexical: Sequence[Scored]) -> list[int]:
    """Candidates BM25 found that the dense list lacks: the ones whose cosine `zmix` needs."""
    seen = {hit.chunk_id for hit in dense}
    return [hit.chunk_id for hit in lexical if hit.chunk_id not in seen]


def zmix(
    dense: Sequence[Scored],
    lexical: Sequence[Scored],
    bm25_weight: float,
    k: int,
    dense_of: Mapping[int, float] | None = None,
) -> list[Scored]:
    """The top k of the weighted z-score mix of two top-N lists (see the module docstring). `dense_of`
    holds the exact dense scores of `lexical_only` candidates; one missing there gets the dense list's
    lowest score."""
    if not 0.0 <= bm25_weight <= 1.0:
        raise ValueError("bm25_weight must be in [0, 1]")
    dense_mean, dense_std = _stats(dense)
    lexical_mean, lexical_std = _stats(lexical)
    dense_scores = {hit.chunk_id: hit.score for hit in dense}
    lexical_scores = {hit.chunk_id: hit.score for hit in lexical}
    floor = min(dense_scores.values()) if dense_scores else 0.0
    extra = dense_of or {}
    fused = []
    for chunk_id in dict.fromkeys([*dense_scores, *lexical_scores]):
        cosine = dense_scores.get(chunk_id, extra.get(chunk_id, floor))
        bm25 = lexical_scores.get(chunk_id, 0.0)
        score = (
            bm25_weight * (bm25 - lexical_mean) / lexical_std
            + (1.0 - bm25_weight) * (cosine - dense_mean) / dense_std
        )
        fused.append(Scored(chunk_id, score))
    fused.sort(key=lambda hit: (-hit.score, hit.chunk_id))
    return fused[:k]


def rrf(dense: Sequence[Scored], lexical: Sequence[Scored], k: int, constant: int = RRF_K) -> list[Scored]:
    """Reciprocal rank fusion (Cormack et al., 2009): sum of 1 / (constant + rank) over both lists."""
    totals: dict[int, float] = {}
    for hits in (dense, lexical):
        for rank, hit in enumerate(hits, 1):
            totals[hit.chunk_id] = totals.get(hit.chunk_id, 0.0) + 1.0 / (constant + rank)
    fused = [Scored(chunk_id, score) for chunk_id, score in totals.items()]
    fused.sort(key=lambda hit: (-hit.score, hit.chunk_id))
    return fused[:k]


# BM25's share of the hybrid score by analyzer (so by corpus language), measured on the dev sets over
# Milvus top-N lists (docs/benchmarks.md, "Hybrid retrieval").
DEFAULT_BM25_WEIGHT = {"standard": 0.3, "jieba": 0.7}


def default_bm25_weight(analyzer: str) -> float:
    return DEFAULT_BM25_WEIGHT.get(analyzer, DEFAULT_BM25_WEIGHT["standard"])
