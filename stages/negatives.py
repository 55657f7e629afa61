"""Hard-negative mining the way FlagEmbedding's hn_mine does it: retrieve with the model in service
(faiss inner product on normalized vectors), sample from a rank window, never the positive, and skip
candidates scoring within a margin of the positive (likely unlabeled positives)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class MinedNegatives:
    negatives: list[int]  # corpus indices
    positive_score: float
    negative_scores: list[float]


def build_index(corpus_vectors: np.ndarray) -> faiss.Index:
    vectors = np.ascontiguousarray(corpus_vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def mine_hard_negatives(
    query_vectors: np.ndarray,
    positive_indices: Sequence[set[int]],
    positive_vectors: np.ndarray,
    index: faiss.Index,
    count: int,
    rank_range: tuple[int, int] = (2, 200),
    margin: float = 0.05,
    seed: int = 0,
) -> list[MinedNegatives]:
    """For each query, `count` negatives drawn from retrieval ranks [low, high) (1-based ranks)."""
    low, high = rank_range
    depth = min(index.ntotal, high)
    rng = random.Random(seed)
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    scores, ids = (
        index.search(queries, depth) if depth else (np.zeros((len(queries), 0)), np.zeros((len(queries), 0)))
    )
    results = []
    for row, positives in enumerate(positive_indices):
        positive_score = float(np.dot(queries[row], positive_vectors[row]))
        window = []
        for rank in range(max(0, low - 1), depth):
            candidate = int(ids[row][rank])
            if candidate < 0 or candidate in positives:
                continue
            if float(scores[row][rank]) > positive_score - margin:
                continue  # too close to (or above) the positive: probably relevant too
            window.append((candidate, float(scores[row][rank])))
        picked = rng.sample(window, k=min(count, len(window))) if window else []
        if len(picked) < count:
            # Too few in the window (a small corpus): top up from the whole corpus, as hn_mine does.
            taken = {c for c, _s in picked} | set(positives)
            pool = [i for i in range(index.ntotal) if i not in taken]
            for candidate in rng.sample(pool, k=min(count - len(picked), len(pool))):
                score = float(np.dot(queries[row], index.reconstruct(candidate)))
                picked.append((candidate, score))
        results.append(MinedNegatives([c for c, _s in picked], positive_score, [s for _c, s in picked]))
    return results
