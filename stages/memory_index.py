"""An immutable in-memory replica of a served collection: what `embedtune serve` answers `/v1/search` from.

Opening Milvus Lite per request starts its embedded server and reloads the collection (and holds the file
lock the daemon's index jobs need), and its BM25 took 158 ms a query at 100k chunks. A replica holds the
same chunks in this process: the chunk ids, paths and texts, a float32 matrix of the normalised chunk
vectors (dense top-N is one matrix product) and BM25 as a sparse matrix of per-term weights, scored the way
Milvus scores it (k1 = 1.2, b = 0.75, idf = log(1 + (N - n + 0.5) / (n + 0.5))) with the collection's
analyzer, so a query's lexical half is one sparse row product over the chunks holding its words.

A replica is never changed: `with_changes` makes a new one (the term counts of unchanged chunks are
reused, never re-tokenised) and the caller swaps one reference, so a request that took a replica reads it
whole. Nothing here touches a database or the daemon.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from stages.fusion import sample_covariance
from state.vector_store import ANALYZERS, CJK_PUNCTUATION, TEXT_BYTES, Hit

K1 = 1.2
B = 0.75
# Milvus' "standard" tokenizer keeps runs of Unicode word characters (letters, digits, underscore: an
# apostrophe or a dot splits), then the analyzer lower-cases (checked against Milvus Lite's scores).
_STANDARD = re.compile(r"\w+", re.UNICODE)
_WORDLIKE = re.compile(r"\w", re.UNICODE)
_STOP = frozenset(CJK_PUNCTUATION)


class ChunkLike(Protocol):
    id: int
    path: str
    text: str


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def analyze(text: str, analyzer: str) -> list[str]:
    """The terms Milvus' analyzer makes of a text (state/vector_store.ANALYZERS): "standard", lower-cased
    letter-and-digit runs; "jieba", jieba's search-mode words lower-cased, the stop list (Chinese
    punctuation) and tokens without a letter or digit (spaces, ASCII punctuation) dropped."""
    if analyzer not in ANALYZERS:
        raise ValueError(f"unknown analyzer {analyzer!r}: use {', '.join(ANALYZERS)}")
    if analyzer == "standard":
        return [word.lower() for word in _STANDARD.findall(text)]
    terms = []
    for token in _jieba().lcut_for_search(text):
        token = token.strip().lower()
        if token and token not in _STOP and _WORDLIKE.search(token):
            terms.append(token)
    return terms


def _cut(text: str) -> str:
    """The text as the collection stores (and analyses) it: at most TEXT_BYTES of UTF-8."""
    data = text.encode("utf-8")
    return text if len(data) <= TEXT_BYTES else data[:TEXT_BYTES].decode("utf-8", errors="ignore")


@dataclass(frozen=True)
class _Terms:
    """The vocabulary (term -> column) and one chunk-by-term matrix of term counts: the chunks' token
    lists in the form a rebuild reuses."""

    vocabulary: dict[str, int]
    counts: sp.csr_matrix  # chunks x terms, term frequencies


def _count_rows(token_lists: Sequence[list[str]], vocabulary: dict[str, int]) -> sp.csr_matrix:
    """Term counts of new chunks; new terms are appended to `vocabulary` (a fresh dict the caller owns)."""
    indptr, indices, data = [0], [], []
    for tokens in token_lists:
        for term, count in Counter(tokens).items():
            column = vocabulary.setdefault(term, len(vocabulary))
            indices.append(column)
            data.append(count)
        indptr.append(len(indices))
    return sp.csr_matrix(
        (np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
        shape=(len(token_lists), len(vocabulary)),
    )


def _bm25_weights(counts: sp.csr_matrix) -> sp.csr_matrix:
    """Terms x chunks: each chunk's BM25 weight per term (a query's score is the sum over its terms)."""
    n = counts.shape[0]
    lengths = np.asarray(counts.sum(axis=1)).ravel()
    average = float(lengths.mean()) if n else 0.0
    df = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float64)
    idf = np.log1p((n - df + 0.5) / (df + 0.5))
    rows = np.repeat(np.arange(n), np.diff(counts.indptr))
    tf = counts.data.astype(np.float64)
    norm = K1 * (1.0 - B + B * lengths[rows] / average) if average > 0 else np.full(len(tf), K1)
    weights = idf[counts.indices] * tf * (K1 + 1.0) / (tf + norm)
    matrix = sp.csr_matrix((weights.astype(np.float32), counts.indices, counts.indptr), shape=counts.shape)
    return matrix.T.tocsr()


class MemoryIndex:
    """The chunks of one collection, both halves searchable in memory; ordered by chunk id."""

    def __init__(
        self,
        ids: np.ndarray,
        paths: Sequence[str],
        texts: Sequence[str],
        vectors: np.ndarray,
        terms: _Terms,
        analyzer: str,
    ) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.paths = tuple(paths)
        self.texts = tuple(texts)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.analyzer = analyzer
        self._terms = terms
        self._weights = _bm25_weights(terms.counts)
        self.covariance = sample_covariance(self.vectors) if len(self.ids) else None
        # chunk_signature's form (count:max:sum), to check a replica against the state's active chunks
        self.signature = (
            f"{len(self.ids)}:{int(self.ids.max()) if len(self.ids) else 0}:{int(self.ids.sum())}"
        )

    @classmethod
    def build(cls, chunks: Sequence[ChunkLike], vectors: np.ndarray, analyzer: str) -> MemoryIndex:
        """A replica of these chunks (any order) with their vectors (rows in the same order)."""
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].id)
        chunks = [chunks[i] for i in order]
        vectors = _rows(vectors, order)
        vocabulary: dict[str, int] = {}
        counts = _count_rows([analyze(_cut(c.text), analyzer) for c in chunks], vocabulary)
        return cls(
            np.asarray([c.id for c in chunks], dtype=np.int64),
            [c.path for c in chunks],
            [c.text for c in chunks],
            vectors,
            _Terms(vocabulary, counts),
            analyzer,
        )

    @property
    def size(self) -> int:
        return len(self.ids)

    def with_changes(
        self, added: Sequence[ChunkLike], added_vectors: np.ndarray, removed: Sequence[int]
    ) -> MemoryIndex:
        """A new replica without `removed` and with `added` (an added id already present is replaced);
        only the added chunks are analysed."""
        added_ids = np.asarray([c.id for c in added], dtype=np.int64)
        gone = np.union1d(np.asarray(list(removed), dtype=np.int64), added_ids)
        keep = np.flatnonzero(~np.isin(self.ids, gone))
        vocabulary = dict(self._terms.vocabulary)
        fresh = _count_rows([analyze(_cut(c.text), self.analyzer) for c in added], vocabulary)
        kept = self._terms.counts[keep]
        kept.resize((len(keep), len(vocabulary)))
        counts = sp.vstack([kept, fresh], format="csr") if len(added) else kept.tocsr()
        ids = np.concatenate([self.ids[keep], added_ids])
        paths = [self.paths[i] for i in keep] + [c.path for c in added]
        texts = [self.texts[i] for i in keep] + [c.text for c in added]
        # an empty replica (built before any chunk) takes its width from the first vectors it is given
        dim = (
            self.vectors.shape[1]
            if self.size and self.vectors.ndim == 2
            else np.asarray(added_vectors).shape[-1]
        )
        new_vectors = np.asarray(added_vectors, dtype=np.float32).reshape(len(added), dim)
        vectors = np.concatenate([self.vectors[keep].reshape(len(keep), dim), new_vectors])
        if len(ids) < 2 or bool(np.all(ids[1:] >= ids[:-1])):  # ids only grow: usually already in order
            return MemoryIndex(ids, paths, texts, vectors, _Terms(vocabulary, counts), self.analyzer)
        order = np.argsort(ids, kind="stable")
        counts = counts[order]
        return MemoryIndex(
            ids[order],
            [paths[i] for i in order],
            [texts[i] for i in order],
            vectors[order],
            _Terms(vocabulary, counts),
            self.analyzer,
        )

    # --- search -----------------------------------------------------------------------------------
    def dense(self, query_vectors: np.ndarray, depth: int) -> list[list[Hit]]:
        """Each query's top `depth` chunks by inner product (cosine of normalised vectors), best first."""
        queries = np.asarray(query_vectors, dtype=np.float32)
        if not self.size:
            return [[] for _ in queries]
        scores = queries @ self.vectors.T
        return [self._top(np.arange(self.size), row, depth) for row in scores]

    def lexical(self, query_texts: Sequence[str], depth: int) -> list[list[Hit]]:
        """Each query's top `depth` chunks by BM25, best first; only chunks holding a query term (a
        score above 0), as Milvus returns them."""
        vocabulary = self._terms.vocabulary
        out = []
        for text in query_texts:
            counted = Counter(t for t in analyze(text, self.analyzer) if t in vocabulary)
            if not counted or not self.size:
                out.append([])
                continue
            columns = [vocabulary[t] for t in counted]
            weights = np.asarray(list(counted.values()), dtype=np.float32)
            row = sp.csr_matrix(weights[None, :]) @ self._weights[columns]
            positive = row.data > 0
            out.append(self._top(row.indices[positive], row.data[positive], depth))
        return out

    def _top(self, positions: np.ndarray, scores: np.ndarray, depth: int) -> list[Hit]:
        """The best `depth` of (position, score) pairs; ties by chunk id."""
        if len(scores) > depth:
            cut = np.argpartition(-scores, depth - 1)[:depth]
            floor = scores[cut].min()
            cut = np.flatnonzero(scores >= floor)  # every tie at the boundary, ordered below
            positions, scores = positions[cut], scores[cut]
        order = np.lexsort((self.ids[positions], -scores))[:depth]
        return [
            Hit(int(self.ids[p]), float(scores[i]), self.paths[p], self.texts[p])
            for i, p in ((i, positions[i]) for i in order)
        ]

    def vectors_of(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """The vectors of these chunks (absent ids are left out)."""
        wanted = np.asarray(list(ids), dtype=np.int64)
        if not len(wanted) or not self.size:
            return {}
        places = np.searchsorted(self.ids, wanted)
        places = np.minimum(places, self.size - 1)
        return {int(i): self.vectors[p] for i, p in zip(wanted, places, strict=True) if self.ids[p] == i}


def _rows(vectors: np.ndarray, order: list[int]) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float32)
    if not len(order):
        return matrix.reshape(0, matrix.shape[-1] if matrix.ndim == 2 else 0)
    return matrix[order]
