"""The hybrid teacher on the tiny model: BM25 and dense scores z-normalised per query and mixed."""

from __future__ import annotations

import numpy as np
import pytest

from stages.encoder import EncodeParams, Encoder
from stages.evaluate import evaluate_retrieval, evaluate_scores
from stages.teacher import HybridTeacher, teacher_bm25_share, zscore

CORPUS = [
    "The river flows through the city and its history is long.",
    "Solar power and energy from the sun feed the grid.",
    "A database server stores files in a folder.",
    "Music and history of the city.",
    "河流 流过 城市 历史 很 长",
]


@pytest.fixture(scope="module")
def teacher(tiny_embedder):
    return HybridTeacher(CORPUS, Encoder(tiny_embedder, EncodeParams(device="cpu")), bm25_weight=0.3)


def test_zscore_rows():
    rows = zscore(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert np.allclose(rows[0], [-1.2247, 0.0, 1.2247], atol=1e-4) and not rows[1].any()


def test_the_weight_moves_the_ranking_from_dense_to_bm25(teacher):
    queries = ["database server files", "solar energy"]
    parts = teacher.components(queries)
    assert parts.bm25.shape == parts.dense.shape == (2, len(CORPUS))
    assert (np.argsort(-parts.mix(1.0), axis=1) == np.argsort(-zscore(parts.bm25), axis=1)).all()
    assert (np.argsort(-parts.mix(0.0), axis=1) == np.argsort(-zscore(parts.dense), axis=1)).all()
    assert np.argmax(parts.mix(1.0)[0]) == 2 and np.argmax(parts.mix(1.0)[1]) == 1  # lexical matches
    assert np.allclose(teacher.corpus_scores(queries), parts.mix(0.3))


def test_scores_of_given_passages_and_identity(teacher):
    scores = teacher.score(["river city"], [[0, 2]])
    assert scores[0].shape == (2,) and scores[0][0] > scores[0][1]
    assert teacher.teacher_id.startswith("hybrid:w=0.3:")
    assert teacher_bm25_share("zh") > teacher_bm25_share("en")
    with pytest.raises(ValueError):
        HybridTeacher(CORPUS, teacher.encoder, 1.5, teacher.vectors)


def test_chinese_queries_use_jieba_tokens(teacher):
    assert np.argmax(teacher.components(["城市 河流"]).bm25[0]) == 4


def test_scores_and_vectors_evaluate_alike(teacher):
    queries = ["river city history", "database files", "solar power"]
    relevant = [{0: 1.0}, {2: 1.0}, {1: 1.0}]
    by_vectors = evaluate_retrieval(teacher.encoder.queries(queries), teacher.vectors, relevant)
    by_scores = evaluate_scores(teacher.components(queries).dense, relevant)
    for name, value in by_vectors.metrics.items():
        assert by_scores.metrics[name] == pytest.approx(value), name
