"""The bounded evaluation pool: what it holds, and that the model in service scores the same on it as on
the whole corpus (its top results are all in the pool), which is what makes pooled comparisons fair to it."""

from __future__ import annotations

import numpy as np

from stages.eval_pool import pool_depth, pool_indices, restrict
from stages.evalsets import EvalSet
from stages.evaluate import evaluate_retrieval


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _case(seed: int = 0, chunks: int = 3000, queries: int = 40):
    rng = np.random.default_rng(seed)
    corpus = _unit(rng.normal(size=(chunks, 16)))
    relevant = [{int(i): 1.0 for i in rng.choice(chunks, size=3, replace=False)} for _ in range(queries)]
    # queries near their relevant chunks, so rankings are not random
    query_vectors = _unit(
        np.stack([corpus[list(r)].mean(axis=0) for r in relevant]) + rng.normal(0, 0.3, (queries, 16))
    )
    return corpus, relevant, query_vectors


def test_no_pool_when_the_corpus_fits_or_pooling_is_off():
    corpus, relevant, queries = _case(chunks=200)
    assert pool_indices(queries, relevant, corpus, size=200) is None
    assert pool_indices(queries, relevant, corpus, size=0) is None


def test_pool_holds_relevant_and_served_top_chunks_and_is_filled_to_size():
    corpus, relevant, queries = _case()
    pool = pool_indices(queries, relevant, corpus, size=1500)
    assert pool is not None and len(pool) == len(set(pool.tolist())) and list(pool) == sorted(pool)
    members = set(pool.tolist())
    assert all(set(r) <= members for r in relevant)
    depth = pool_depth(1500, len(queries), sum(len(r) for r in relevant))
    top = np.argsort(-(queries @ corpus.T), axis=1)[:, :depth]
    assert set(top.ravel().tolist()) <= members
    assert len(pool) >= 1500  # random chunks fill what relevant and top results leave


def test_model_in_service_scores_the_same_on_the_pool_as_on_the_whole_corpus():
    corpus, relevant, queries = _case(seed=3)
    pool = pool_indices(queries, relevant, corpus, size=800)
    assert pool is not None and len(pool) < len(corpus)
    texts = [f"chunk {i}" for i in range(len(corpus))]
    pooled = restrict(EvalSet("heldout", [f"q{i}" for i in range(len(queries))], texts, relevant), pool)
    assert pooled.corpus_texts == [texts[i] for i in pool]
    full = evaluate_retrieval(queries, corpus, relevant)
    on_pool = evaluate_retrieval(queries, corpus[pool], pooled.relevant)
    for metric in ("ndcg@10", "recall@10", "mrr@10"):
        assert on_pool.per_query[metric] == full.per_query[metric], metric


def test_a_new_model_is_scored_optimistically_never_pessimistically_on_the_pool():
    corpus, relevant, queries = _case(seed=5)
    pool = pool_indices(queries, relevant, corpus, size=800)
    other = _unit(
        queries + np.random.default_rng(9).normal(0, 0.5, queries.shape)
    )  # a different model's queries
    pooled = restrict(EvalSet("heldout", [""] * len(queries), [""] * len(corpus), relevant), pool)
    full = evaluate_retrieval(other, corpus, relevant).per_query["recall@10"]
    on_pool = evaluate_retrieval(other, corpus[pool], pooled.relevant).per_query["recall@10"]
    assert all(p >= f for p, f in zip(on_pool, full, strict=True))  # fewer distractors, never more
