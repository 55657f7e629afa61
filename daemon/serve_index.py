"""The memory replica `embedtune serve` answers `/v1/search` from (stages/memory_index.py).

A replica mirrors the live collection of the model in service: the active chunks read from SQLite in one
snapshot with the change log's position, their vectors through the served model's embedding cache (the
index job encoded the same chunks with the same runtime and saved them there, so these are cache hits; a
miss is encoded, one batch at a time under the model's lock so requests interleave), BM25 with the
collection's analyzer. Each poll of the serving state (daemon/serve_state.py) follows the change log from
that position and swaps in a new replica with the changes, once the index job has cached the new chunks'
vectors (it waits up to FOLLOW_GRACE_S for that, then encodes the rest itself: two processes encoding the
same chunks on the same cores would slow both); if the log was pruned past it (the index job
prunes what every collection applied), the replica is checked against the active chunks and brought in
line by a diff. Answers name it "memory replica of <collection>".
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.logs import get_logger
from daemon.serving import ModelChoice
from stages.memory_index import MemoryIndex
from state.db import transaction
from state.index_records import (
    ActiveChunk,
    CollectionRecord,
    active_chunks,
    change_seq,
    changes_after,
    changes_since,
)

log = get_logger("embedtune.serve")

# New chunks wait this long for the index job to encode them into the cache before the server encodes
# them itself: normally the job has within seconds, and two processes encoding the same chunks on the
# same cores slows both (the replica follows a few seconds later instead).
FOLLOW_GRACE_S = 60.0
KEPT_READERS = 2  # cache readers kept in memory: the model in service and the one before it

# texts -> their passage vectors (normalised float32 rows), in order
VectorSource = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class PreparedReplica:
    """What one request reads, taken once: the replica, the model it holds and how hybrid fuses. This is
    what `daemon.search.search_many(replica=...)` answers from."""

    choice: ModelChoice
    index: MemoryIndex
    collection: str
    weight: float | None  # the collection's BM25 share (None: each query's language decides)
    note: str = ""

    @property
    def source(self) -> str:
        return f"memory replica of {self.collection}"


class ServeIndex:
    """The replica of one collection for one loaded model, following the change log. `prepared()` is
    one reference, replaced whole by `follow`."""

    def __init__(
        self, choice: ModelChoice, record: CollectionRecord, index: MemoryIndex, seq: int, seconds: float
    ) -> None:
        self.choice = choice
        self.name = record.name
        self.seq = seq
        self.build_seconds = seconds
        self._prepared = PreparedReplica(choice, index, record.name, record.bm25_weight, choice.note)
        self._following = threading.Lock()
        self._waiting_since: float | None = None  # new chunks seen whose vectors are not cached yet

    def prepared(self) -> PreparedReplica:
        return self._prepared  # one reference: read once per request

    @property
    def size(self) -> int:
        return self._prepared.index.size

    def set_weight(self, weight: float | None) -> None:
        """The collection's share changed (a query-time setting): the next requests use it."""
        current = self._prepared
        if current.weight != weight:
            self._prepared = PreparedReplica(
                current.choice, current.index, current.collection, weight, current.note
            )

    def follow(self, conn: sqlite3.Connection, signature: str, vectors: VectorSource) -> int:
        """Apply the chunk changes after this replica's position; returns how many chunks changed.
        `signature`: the active chunks' signature the caller just read (state.index_records)."""
        with self._following:
            current = self._prepared
            if current.index.signature == signature and changes_after(conn, self.seq) == 0:
                return 0
            changes = changes_since(conn, self.seq)
            if self._wait_for_vectors(changes.added, vectors):
                return 0  # the index job encodes them: the next poll applies the changes with its vectors
            index = current.index
            if changes.added or changes.removed:
                index = _apply(index, changes.added, changes.removed, vectors)
            seq, changed = changes.seq, len(changes.added) + len(changes.removed)
            if index.signature != changes.signature:  # the log was pruned past our position: a diff
                with transaction(conn, immediate=False):
                    chunks, seq = active_chunks(conn), change_seq(conn)
                present = set(index.ids.tolist())
                wanted = {chunk.id for chunk in chunks}
                added = [chunk for chunk in chunks if chunk.id not in present]
                removed = sorted(present - wanted)
                index = _apply(index, added, removed, vectors)
                changed += len(added) + len(removed)
                log.info(
                    "serve_replica_resynced", collection=self.name, added=len(added), removed=len(removed)
                )
            self.seq = seq
            if index is not current.index:
                self._prepared = PreparedReplica(
                    current.choice, index, current.collection, current.weight, current.note
                )
                log.info("serve_replica_followed", collection=self.name, changed=changed, chunks=index.size)
            return changed

    def _wait_for_vectors(self, added: list[ActiveChunk], vectors: VectorSource) -> bool:
        """True while some added chunk has no cached vector and the grace has not run out."""
        missing = getattr(vectors, "missing", None)
        if not added or missing is None or not missing([chunk.text for chunk in added]):
            self._waiting_since = None
            return False
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < FOLLOW_GRACE_S:
            return True
        self._waiting_since = None
        return False


def _apply(
    index: MemoryIndex, added: list[ActiveChunk], removed: list[int], vectors: VectorSource
) -> MemoryIndex:
    if not added and not removed:
        return index
    matrix = vectors([chunk.text for chunk in added]) if added else np.zeros((0, index.vectors.shape[1]))
    return index.with_changes(added, matrix, removed)


def build_serve_index(
    conn: sqlite3.Connection,
    choice: ModelChoice,
    record: CollectionRecord,
    analyzer: str,
    vectors: VectorSource,
) -> ServeIndex:
    """A replica of `record` for the model `choice`: the active chunks and the change log's position in
    one snapshot, then their vectors and BM25 terms."""
    started = time.monotonic()
    with transaction(conn, immediate=False):
        chunks, seq = active_chunks(conn), change_seq(conn)
    matrix = vectors([chunk.text for chunk in chunks]) if chunks else np.zeros((0, 0), np.float32)
    index = MemoryIndex.build(chunks, matrix, record.analyzer or analyzer)
    seconds = time.monotonic() - started
    log.info(
        "serve_replica_built",
        collection=record.name,
        chunks=index.size,
        analyzer=index.analyzer,
        seconds=round(seconds, 2),
    )
    return ServeIndex(choice, record, index, seq, seconds)


class CachedVectors:
    """Passage vectors through the model's embedding cache as the index job saved it (re-read only when
    the file changed: a 100k-chunk cache is hundreds of MB); misses are encoded 64 at a time under
    `lock` (the model's: one call at a time, so a request waits for one batch at most) and saved."""

    _readers: dict[tuple[str, str], tuple[float, object]] = {}
    _readers_lock = threading.Lock()

    def __init__(
        self,
        cache_root: Path,
        model_key: str,
        encode: Callable[[list[str]], np.ndarray],
        lock: threading.Lock,
    ) -> None:
        self.cache_root, self.model_key, self.encode, self.lock = cache_root, model_key, encode, lock

    def _file_mtime(self) -> float:
        from stages.embed_cache import CACHE_FILE, cache_folder

        try:
            return (cache_folder(self.cache_root, self.model_key) / CACHE_FILE).stat().st_mtime
        except OSError:
            return -1.0

    def _cache(self):
        from stages.embed_cache import EmbeddingCache

        mtime, key = self._file_mtime(), (str(self.cache_root), self.model_key)
        with self._readers_lock:
            known = self._readers.pop(key, None)
            if known is None or known[0] != mtime:
                known = (mtime, EmbeddingCache(self.cache_root, self.model_key))
            self._readers[key] = known  # the most recently used last
            while len(self._readers) > KEPT_READERS:  # a model no longer served lets its cache go
                self._readers.pop(next(iter(self._readers)))
        return known[1]

    def _saved(self, cache) -> None:
        """Our own save changed the file: remember its new time, so it is not read back at once."""
        with self._readers_lock:
            self._readers[(str(self.cache_root), self.model_key)] = (self._file_mtime(), cache)

    def missing(self, texts: list[str]) -> int:
        """How many of `texts` have no cached vector (nothing is encoded)."""
        from stages.embed_cache import text_key

        return self._cache().count_missing([text_key(text) for text in texts])

    def _encode_locked(self, texts: list[str]) -> np.ndarray:
        parts = []
        for start in range(0, len(texts), 64):
            with self.lock:
                parts.append(np.asarray(self.encode(texts[start : start + 64]), dtype=np.float32))
        return np.concatenate(parts)

    def __call__(self, texts: list[str]) -> np.ndarray:
        from stages.embed_cache import text_key

        cache = self._cache()
        keys = [text_key(text) for text in texts]
        if not cache.count_missing(keys):
            return np.asarray(cache.get_many(keys, texts, self._encode_locked), dtype=np.float32)
        out = cache.get_many(keys, texts, self._encode_locked)
        cache.save()
        self._saved(cache)
        return np.asarray(out, dtype=np.float32)
