"""A bounded corpus for judging new models on a large corpus (TREC-style pooling).

The model in service has its corpus vectors cached, so it can search the whole corpus for free; a
candidate or a merge has none, and encoding 100k chunks per variant costs an hour of CPU. So variants
are judged on a pool: every chunk relevant to an evaluation query, the model in service's top `depth`
for each query, and random chunks up to `size`. The model in service ranks the same within the pool as in
the whole corpus down to `depth` (its top chunks are all there), so its scores are exact; a new model's
are optimistic by the distractors it would have ranked high that the pool left out. bench/eval_pool.py
measures that bias against whole-corpus evaluation (docs/benchmarks.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from stages.evalsets import EvalSet
from stages.negatives import build_index, random_others

MAX_DEPTH = 100  # the evaluator's own search depth (stages.evaluate.SEARCH_DEPTH)


def pool_depth(size: int, queries: int, relevant: int, min_depth: int = 10) -> int:
    """How deep each query's search reaches so that the pool stays near `size` (queries' results
    overlap, so this is a bound, not an exact count). Never shallower than `min_depth`, the gate
    metric's cut-off, below which the model in service's own score would no longer be exact."""
    room = max(size - relevant, 0)
    return max(min_depth, min(MAX_DEPTH, room // max(queries, 1)))


def pool_indices(
    query_vectors: np.ndarray,
    relevant: Sequence[dict[int, float]],
    corpus_vectors: np.ndarray,
    size: int,
    seed: int = 0,
    min_depth: int = 10,
) -> np.ndarray | None:
    """Sorted corpus indices of the pool, or None when the whole corpus is small enough to use."""
    total = len(corpus_vectors)
    if size <= 0 or total <= size:
        return None
    chosen: set[int] = set()
    for judged in relevant:
        chosen.update(judged)
    if len(query_vectors):
        depth = min(pool_depth(size, len(query_vectors), len(chosen), min_depth), total)
        _scores, ids = build_index(corpus_vectors).search(
            np.ascontiguousarray(query_vectors, dtype=np.float32), depth
        )
        chosen.update(int(i) for i in ids.ravel() if i >= 0)
    missing = size - len(chosen)
    if missing > 0:
        chosen.update(random_others(random.Random(seed), total, chosen, missing))
    return np.fromiter(sorted(chosen), dtype=np.int64)


def restrict(eval_set: EvalSet, pool: np.ndarray) -> EvalSet:
    """The same queries against the pool only; relevance re-indexed to pool positions."""
    position = {int(old): new for new, old in enumerate(pool)}
    return EvalSet(
        eval_set.name,
        eval_set.queries,
        [eval_set.corpus_texts[i] for i in pool],
        [{position[d]: g for d, g in judged.items() if d in position} for judged in eval_set.relevant],
        [eval_set.corpus_keys[i] for i in pool],
        stand_ins=[{position[d]: t for d, t in own.items() if d in position} for own in eval_set.stand_ins],
    )
