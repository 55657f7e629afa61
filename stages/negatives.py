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


# Exact search below this many chunks; an HNSW graph above. Measured (docs/benchmarks.md, "Candidate
# search"): faiss's exact inner product over 100k x 384 answers 1,000 queries in 0.33 s on 2 cores, no
# slower than the graph (0.30 s, plus 7 s to build, recall@200 0.95-0.997), so exact search stays up to a
# million chunks, where queries x chunks (both grow with the folder) makes it the cost that matters.
EXACT_LIMIT = 1_000_000
HNSW_NEIGHBOURS = 32
HNSW_BUILD_DEPTH = 80


def build_index(corpus_vectors: np.ndarray, exact_limit: int = EXACT_LIMIT) -> faiss.Index:
    """Inner product over normalised vectors: flat (exact) for small corpora, HNSW above `exact_limit`.
    Both keep the vectors (`reconstruct` works) and take `search_depth` before a search."""
    vectors = np.ascontiguousarray(corpus_vectors, dtype=np.float32)
    if len(vectors) <= exact_limit:
        index = faiss.IndexFlatIP(vectors.shape[1])
    else:
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_BUILD_DEPTH
    index.add(vectors)
    return index


def search_depth(index: faiss.Index, depth: int) -> None:
    """An HNSW search explores at least `depth` candidates (its efSearch); a flat index needs nothing."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(2 * depth, 128)


def random_others(rng: random.Random, total: int, exclude: set[int], count: int) -> list[int]:
    """`count` distinct indices in [0, total) outside `exclude`, by rejection: O(count) for a large
    corpus instead of listing every index (which made top-ups O(queries x chunks))."""
    available = total - len(exclude)
    if available <= 0:
        return []
    count = min(count, available)
    if available <= 4 * count:  # small corpus: listing is cheap and rejection would spin
        return rng.sample([i for i in range(total) if i not in exclude], k=count)
    picked: list[int] = []
    seen = set(exclude)
    while len(picked) < count:
        candidate = rng.randrange(total)
        if candidate not in seen:
            seen.add(candidate)
            picked.append(candidate)
    return picked


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
    search_depth(index, depth)
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
            for candidate in random_others(rng, index.ntotal, taken, count - len(picked)):
                score = float(np.dot(queries[row], index.reconstruct(candidate)))
                picked.append((candidate, score))
        results.append(MinedNegatives([c for c, _s in picked], positive_score, [s for _c, s in picked]))
    return results
