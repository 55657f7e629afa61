"""Teachers: models that judge (query, passage) pairs better than the student being trained.

The hybrid teacher needs nothing beyond what every install has: BM25 (rank_bm25; jieba for Chinese) and the
base embedding model, each z-normalised over the whole corpus for the query, mixed as
`w * z(bm25) + (1 - w) * z(dense)`. Measured outside the project (../shared/FINDINGS.md) it beats both of
its parts on English sets at w ≈ 0.3, while on Chinese with an English base model BM25 carries everything
(w ≥ 0.7): the weight follows the corpus language unless configured. `bench/teacher.py` measures it as a
retriever on real queries.

Every teacher has one interface, `score_pairs(queries, passages)`: scores of (query, passage) pairs in
batches, higher = more relevant, and a `teacher_id` that names the judgements (same id, same scores), so
stored scores are reused across rounds and restarts. `model.teacher` picks one (`load_teacher`):
"hybrid", a cross-encoder folder (bge-reranker-*: FlagEmbedding's reranker), a bi-encoder folder, or a
weighted ensemble of them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from stages.embed_cache import text_key
from stages.encoder import EncodeParams, Encoder
from stages.filter import Bm25Index
from stages.models import model_key

# BM25's share of the *teacher's* mix by corpus language (English: the dense model carries more; Chinese
# with an English base model: BM25 carries almost everything), measured for this whole-corpus z-score mix
# (../shared/FINDINGS.md, reproduced in docs/benchmarks.md: nfcorpus 0.3469 at 0.3, 0.3501 at 0.2, within
# one interval). Not the served fusion's share (stages/fusion.py::SERVED_BM25_SHARE, 0.2 in English),
# which mixes two top-N lists at query time: a different function, tuned on its own. This one is part of
# `HybridTeacher.teacher_id`, so changing it discards every stored judgement (`model.teacher_bm25_weight`
# overrides it).
TEACHER_BM25_SHARE = {"en": 0.3, "zh": 0.7}


def teacher_bm25_share(language: str) -> float:
    """The hybrid teacher's BM25 share for a corpus language ("en", "zh"; others as English)."""
    return TEACHER_BM25_SHARE.get(language, TEACHER_BM25_SHARE["en"])


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

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """Pairwise scores, each z-normalised over the whole corpus for its query; a passage that is not
        in the corpus is scored against the same per-query statistics."""
        position = getattr(self, "_position", None)
        if position is None:
            position = self._position = {text_key(t): i for i, t in enumerate(self.corpus_texts)}
        unique = list(dict.fromkeys(queries))
        row_of = {query: row for row, query in enumerate(unique)}
        parts = self.components(unique)
        mixed = parts.mix(self.bm25_weight)
        out = np.empty(len(queries), dtype=np.float64)
        outside = [i for i, p in enumerate(passages) if text_key(p) not in position]
        extra_dense = (
            np.sum(
                self.encoder.queries([queries[i] for i in outside])
                * self.encoder.passages([passages[i] for i in outside]),
                axis=1,
            )
            if outside
            else np.zeros(0)
        )
        extra = dict(zip(outside, extra_dense, strict=True))
        for i, (query, passage) in enumerate(zip(queries, passages, strict=True)):
            row = row_of[query]
            index = position.get(text_key(passage))
            if index is not None:
                out[i] = mixed[row, index]
                continue
            bm25 = self.bm25.score_text(query, passage)
            out[i] = self.bm25_weight * _z(bm25, parts.bm25[row]) + (1 - self.bm25_weight) * _z(
                float(extra[i]), parts.dense[row]
            )
        return out


def _z(value: float, row: np.ndarray) -> float:
    std = float(row.std())
    return (value - float(row.mean())) / std if std > 0 else 0.0


class Teacher(Protocol):
    teacher_id: str

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray: ...


class CrossEncoderTeacher:
    """A cross-encoder folder (bge-reranker-v2-m3 and the like) through FlagEmbedding's reranker."""

    def __init__(self, path: Path, device: str = "auto", batch_size: int = 32, max_length: int = 512) -> None:
        from FlagEmbedding import FlagReranker

        from stages.models import pick_device

        self.path = Path(path)
        device = pick_device(device)
        self.model = FlagReranker(
            str(self.path),
            use_fp16=device == "cuda",
            devices=[device],
            batch_size=batch_size,
            max_length=max_length,
        )
        self.teacher_id = f"cross:{model_key(self.path)}"

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        if not queries:
            return np.zeros(0)
        scores = self.model.compute_score([[q, p] for q, p in zip(queries, passages, strict=True)])
        return np.atleast_1d(np.asarray(scores, dtype=np.float64))


class BiEncoderTeacher:
    """A larger embedding model folder: the cosine of query and passage vectors."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.teacher_id = f"bi:{model_key(encoder.path)}"

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        if not queries:
            return np.zeros(0)
        return np.sum(self.encoder.queries(queries) * self.encoder.passages(passages), axis=1).astype(
            np.float64
        )


class EnsembleTeacher:
    """A weighted sum of teachers, each standardised over the whole batch first (their scales differ)."""

    def __init__(self, members: Sequence[tuple[Teacher, float]]) -> None:
        self.members = list(members)
        self.teacher_id = "ensemble:" + "+".join(f"{w:g}*{t.teacher_id}" for t, w in self.members)

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        total = np.zeros(len(queries))
        for teacher, weight in self.members:
            scores = teacher.score_pairs(queries, passages)
            std = scores.std()
            total += weight * ((scores - scores.mean()) / std if std > 0 else 0.0)
        return total


def is_cross_encoder(path: Path) -> bool:
    """A folder whose transformers config names a sequence-classification head (one relevance logit)."""
    config = Path(path) / "config.json"
    if not config.exists() or (Path(path) / "modules.json").exists():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any("SequenceClassification" in name for name in architectures)


def parse_teacher_spec(spec: str) -> list[tuple[str, float]]:
    """'hybrid' | '/models/bge-reranker-v2-m3' | 'hybrid*0.5 + /models/rr*0.5' -> [(member, weight)]."""
    members = []
    for part in spec.split("+"):
        part = part.strip()
        if not part:
            raise ValueError("empty teacher in the list")
        name, star, weight = part.rpartition("*")
        if star and _is_number(weight):
            members.append((name.strip(), float(weight)))
        else:
            members.append((part, 1.0))
    return members


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_teacher(
    spec: str,
    corpus_texts: Sequence[str],
    base: Encoder,
    language: str,
    corpus_vectors: np.ndarray | None = None,
    bm25_weight: float | None = None,
    device: str = "auto",
    converted_root: Path | None = None,
) -> Teacher:
    """The teacher `model.teacher` names. "hybrid" uses the base model and BM25 over the round's corpus;
    a folder is a cross-encoder when its config says so, else a bi-encoder. A packaged teacher shipped in
    another form is converted under `converted_root` (the daemon passes its state folder: under the unit,
    home is read-only)."""
    from stages.models import resolve_model_path

    built: list[tuple[Teacher, float]] = []
    for name, weight in parse_teacher_spec(spec):
        if name == "hybrid":
            teacher: Teacher = HybridTeacher(
                corpus_texts,
                base,
                teacher_bm25_share(language) if bm25_weight is None else bm25_weight,
                corpus_vectors,
            )
        else:
            path = resolve_model_path(name, converted_root)
            if is_cross_encoder(path):
                teacher = CrossEncoderTeacher(path, device)
            else:
                teacher = BiEncoderTeacher(Encoder(path, EncodeParams(device, base.params.query_instruction)))
        built.append((teacher, weight))
    return built[0][0] if len(built) == 1 else EnsembleTeacher(built)
