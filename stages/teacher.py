"""Teachers: models that judge (query, passage) pairs better than the student being trained.

The hybrid teacher needs nothing beyond what every install has: BM25 (rank_bm25; jieba for Chinese) and the
base embedding model, each z-normalised over the whole corpus for the query, mixed as
`w * z(bm25) + (1 - w) * z(dense)`. Measured outside the project (../shared/FINDINGS.md) it beats both of
its parts on English sets at w ≈ 0.3, while on Chinese with an English base model BM25 carries everything
(w ≥ 0.7): the weight follows the corpus language unless configured. `bench/teacher.py` measures it as a
retriever on real queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stages.embed_cache import model_key
from stages.encoder import Encoder
from stages.filter import Bm25Index

# BM25's share of the mix by corpus language (English: the dense model carries more; Chinese with an
# English base model: BM25 carries almost everything).
DEFAULT_BM25_WEIGHT = {"en": 0.3, "zh": 0.7}


def default_bm25_weight(language: str) -> float:
    return DEFAULT_BM25_WEIGHT.get(language, DEFAULT_BM25_WEIGHT["en"])


def zscore(rows: np.ndarray) -> np.ndarray:
    """Per-row z-normalisation (each query's scores over the corpus); a constant row becomes zeros."""
    rows = np.asarray(rows, dtype=np.float64)
    mean = rows.mean(axis=1, keepdims=True)
    std = rows.std(axis=1, keepdims=True)
    return np.where(std > 0, (rows - mean) / np.where(std > 0, std, 1.0), 0.0)


@dataclass(frozen=True)
class HybridScores:
    bm25: np.ndarray  # queries x corpus, raw
    dense: np.ndarray  # queries x corpus, cosine

    def mix(self, bm25_weight: float) -> np.ndarray:
        return bm25_weight * zscore(self.bm25) + (1.0 - bm25_weight) * zscore(self.dense)


class HybridTeacher:
    """BM25 fused with an embedding model over a fixed corpus.

    >>> teacher = HybridTeacher(corpus, Encoder(base_path, EncodeParams()), bm25_weight=0.3)  # doctest: +SKIP
    >>> teacher.corpus_scores(["how do rivers form?"]).shape                                  # doctest: +SKIP
    (1, len(corpus))
    """

    def __init__(
        self,
        corpus_texts: Sequence[str],
        encoder: Encoder,
        bm25_weight: float,
        corpus_vectors: np.ndarray | None = None,
    ) -> None:
        if not 0.0 <= bm25_weight <= 1.0:
            raise ValueError("bm25_weight must be in [0, 1]")
        self.corpus_texts = list(corpus_texts)
        self.encoder = encoder
        self.bm25_weight = bm25_weight
        self.bm25 = Bm25Index(self.corpus_texts)
        self.vectors = corpus_vectors if corpus_vectors is not None else encoder.passages(self.corpus_texts)

    @property
    def teacher_id(self) -> str:
        """Identifies the judgements: the same id means the same scores (for the score store)."""
        return f"hybrid:w={self.bm25_weight:g}:{model_key(self.encoder.path)}"

    def components(self, queries: Sequence[str]) -> HybridScores:
        dense = self.encoder.queries(queries) @ self.vectors.T
        bm25 = np.stack([self.bm25.scores(query) for query in queries]) if queries else np.zeros_like(dense)
        return HybridScores(bm25, dense)

    def corpus_scores(self, queries: Sequence[str]) -> np.ndarray:
        """The teacher's score of every corpus passage for each query (queries x corpus)."""
        return self.components(queries).mix(self.bm25_weight)

    def score(self, queries: Sequence[str], passage_indices: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Scores of given corpus passages per query (e.g. the positive and the mined negatives)."""
        matrix = self.corpus_scores(queries)
        return [matrix[row, list(indices)] for row, indices in enumerate(passage_indices)]
