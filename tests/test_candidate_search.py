"""Candidate search that scales: exact below a size, an HNSW graph above, and O(count) random top-ups."""

from __future__ import annotations

import random

import numpy as np


def _unit(rows: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_large_corpora_get_an_hnsw_graph_that_finds_what_exact_search_finds():
    import faiss

    from stages.negatives import build_index, search_depth

    corpus, queries = _unit(2000), _unit(50, seed=1)
    exact = build_index(corpus)
    graph = build_index(corpus, exact_limit=1000)
    assert isinstance(exact, faiss.IndexFlatIP) and isinstance(graph, faiss.IndexHNSWFlat)
    search_depth(graph, 10)
    _s, truth = exact.search(queries, 10)
    _s, found = graph.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    assert recall > 0.9
    assert np.allclose(graph.reconstruct(5), corpus[5])  # the top-up reads vectors back


def test_mining_on_a_graph_index_keeps_the_rules():
    from stages.negatives import build_index, mine_hard_negatives

    corpus = _unit(600)
    queries = corpus[:20] + 0.01
    mined = mine_hard_negatives(
        queries, [{i} for i in range(20)], corpus[:20], build_index(corpus, exact_limit=100), count=3
    )
    for row, result in enumerate(mined):
        assert len(result.negatives) == 3 and row not in result.negatives
        assert all(score <= result.positive_score for score in result.negative_scores)


def test_random_others_are_distinct_and_outside_the_exclusion():
    from stages.negatives import random_others

    rng = random.Random(0)
    picked = random_others(rng, 1_000_000, {1, 2, 3}, 50)
    assert len(set(picked)) == 50 and not {1, 2, 3} & set(picked)
    assert sorted(random_others(rng, 5, {0, 1}, 10)) == [2, 3, 4]  # fewer available than asked
    assert random_others(rng, 3, {0, 1, 2}, 2) == []
