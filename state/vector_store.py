"""The vector store: Milvus through pymilvus, the same code for Milvus Lite (one file under the state
directory) and a Milvus server or cluster (a URI and a token).

Milvus Lite serves its file from inside the process that opened it, and a second process cannot open it
meanwhile. So every user (the daemon's index job, `search`, `rollback`, `export`) opens the store for one
short piece of work under an exclusive file lock and closes it again; a long fill holds the file only
while a batch is written, never while the model encodes. A server needs no lock.
"""

from __future__ import annotations

import fcntl
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Milvus VARCHAR limits are in bytes; chunk texts are cut to this many bytes of UTF-8 in the store
# (the full text stays in SQLite).
TEXT_BYTES = 16_000
PATH_BYTES = 4_096
_PAGE = 16_384  # Milvus caps offset + limit of one query at 16384
CONNECT_TIMEOUT_S = 10.0


class IndexUnavailable(Exception):
    """The vector store cannot be reached or opened; the message says which and what to check."""


class IndexRefused(IndexUnavailable):
    """Milvus answered and refused (credentials, permissions, a parameter or schema it does not accept):
    retrying cannot help until the configuration or the server changes."""


# Refusals: what the server or pymilvus says about the request itself, not about being reachable.
_REFUSAL_CLASSES = (
    "ParamError",
    "ConnectionConfigException",
    "ServerVersionIncompatibleException",
    "DataTypeNotMatchException",
    "DataTypeNotSupportException",
    "DataNotMatchException",
    "FieldsTypeException",
    "FieldTypeException",
    "FunctionsTypeException",
    "PrimaryKeyException",
    "AutoIDException",
    "CannotInferSchemaException",
)
# Phrases a server or proxy uses for a refused request, matched as whole words of its message with every
# path and address left out first: "auth" inside /srv/authors/milvus.db or auth.internal:19530 is no refusal.
_REFUSAL_PHRASES = re.compile(
    r"\b(?:auth(?:entication)? (?:check )?fail(?:ure|ed)|not authenticated|unauthenticated|hasn't authenticated"
    r"|permission den(?:ied|y)|access denied|privilege not permitted|invalid token)\b"
)
_PATH_LIKE = re.compile(r"\S*[/\\]\S*")  # a token with a slash: a path, a URI
# common.ErrorCode (the codes older servers send): PermissionDenied 3, ForceDeny 48 (writes refused by
# quota or a read-only cluster until an operator acts); pymilvus' own ErrorCode.FORCE_DENY is 9.
_REFUSED_COMPATIBLE_CODES = {3, 48}
_FORCE_DENY = 9
# the server's own codes (merr): invalid, missing or too large parameter 1100-1102, not authenticated
# 1400, privilege not permitted 1401, needs authentication 1800
_REFUSED_CODES = {_FORCE_DENY, 1100, 1101, 1102, 1400, 1401, 1800}
# gRPC status codes pymilvus passes on unwrapped (or as the cause of a failed connect)
_REFUSED_GRPC_STATUS = {"UNAUTHENTICATED", "PERMISSION_DENIED"}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it was raised from (pymilvus wraps a gRPC error or an OSError with `from`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _refused_by_code(exc: BaseException) -> bool:
    """A Milvus code or a gRPC status that says the request itself is refused."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code in _REFUSED_CODES:
        return True
    if getattr(exc, "compatible_code", None) in _REFUSED_COMPATIBLE_CODES:
        return True
    if not callable(code):
        return False
    try:  # a grpc.RpcError: code() is its status
        return getattr(code(), "name", None) in _REFUSED_GRPC_STATUS
    except Exception:  # a code() that needs arguments or a live call: no gRPC status
        return False


def is_refusal(exc: BaseException) -> bool:
    """True when retrying the same request cannot succeed; connection faults, timeouts, a busy file and
    a full disk are not refusals (they pass), nor is anything raised from an OSError. Codes first, along
    what the exception was raised from; then whole phrases of the message, never words inside a path."""
    chain = list(_causes(exc))
    if any(isinstance(link, OSError) for link in chain):
        return False
    if type(exc).__name__ in _REFUSAL_CLASSES:
        return True
    if any(_refused_by_code(link) for link in chain):
        return True
    message = str(getattr(exc, "message", "") or exc).lower()
    return _REFUSAL_PHRASES.search(_PATH_LIKE.sub(" ", message)) is not None


@dataclass(frozen=True)
class IndexTarget:
    uri: str
    token: str
    index_type: str = "AUTOINDEX"
    lock_timeout_s: float = 120.0

    @property
    def lite_file(self) -> Path | None:
        return Path(self.uri) if self.uri.endswith(".db") else None


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    score: float
    path: str
    text: str


# What Milvus analyses the chunk text with for BM25. Both forms run on Milvus Lite (whose analyzers are
# `standard` and `jieba`) and on a server. "standard": lower-cased \w+ words, as the teacher's BM25
# (stages/text.py); "jieba": Chinese words (search mode, as the teacher's), with punctuation dropped so
# that "，" and "。" are not terms.
CJK_PUNCTUATION = list("，。、；：？！“”‘’（）《》【】—…·「」『』〈〉﹏～")
ANALYZERS: dict[str, dict[str, Any]] = {
    "standard": {"tokenizer": "standard", "filter": ["lowercase"]},
    "jieba": {
        "tokenizer": {"type": "jieba", "mode": "search"},
        "filter": ["lowercase", {"type": "stop", "stop_words": CJK_PUNCTUATION}],
    },
}
SPARSE_FIELD = "sparse"
BM25_FUNCTION = "text_bm25"


def _cut(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


@contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IndexUnavailable(
                        f"the Milvus Lite file {path.with_suffix('')} is busy (another embedtune process "
                        f"held it for {timeout_s:.0f}s; index.lock_timeout_s)"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock


class VectorStore:
    """One open connection; use through `open_store`."""

    def __init__(self, client: Any, target: IndexTarget) -> None:
        self.client = client
        self.target = target
        self._loaded: set[str] = set()

    def _load(self, name: str) -> None:
        """Queries and searches need the collection loaded (a reopened Milvus Lite file starts released)."""
        if name not in self._loaded:
            self.client.load_collection(name)
            self._loaded.add(name)

    # --- collections ----------------------------------------------------------------------------
    def collections(self) -> list[str]:
        return list(self.client.list_collections())

    def has(self, name: str) -> bool:
        return bool(self.client.has_collection(name))

    def create(self, name: str, dim: int, analyzer: str | None = "standard") -> None:
        """A collection of chunk id (primary key), vector (inner product on normalised vectors), the
        document path and the chunk text, so RAG clients get the passage back with each hit. With an
        analyzer, the text is also analysed for full-text search: Milvus' BM25 function fills the sparse
        field from it on every insert, so the two halves of a hybrid query can never disagree on which
        chunks exist. `analyzer=None` makes the dense-only form collections had before hybrid search."""
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        if self.has(name):
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("chunk_id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("path", DataType.VARCHAR, max_length=PATH_BYTES)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=self.target.index_type, metric_type="IP")
        if analyzer is None:
            schema.add_field("text", DataType.VARCHAR, max_length=TEXT_BYTES)
        else:
            schema.add_field(
                "text",
                DataType.VARCHAR,
                max_length=TEXT_BYTES,
                enable_analyzer=True,
                analyzer_params=ANALYZERS[analyzer],
            )
            schema.add_field(SPARSE_FIELD, DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(
                    name=BM25_FUNCTION,
                    function_type=FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=[SPARSE_FIELD],
                )
            )
            index.add_index(SPARSE_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        self.client.create_collection(name, schema=schema, index_params=index)

    def drop(self, name: str) -> None:
        if self.has(name):
            self.client.drop_collection(name)

    def ids(self, name: str, upper: int) -> set[int]:
        """Every chunk id in a collection. Chunk ids come from SQLite, so none exceeds `upper` (the largest
        chunk id ever made): the listing walks id windows, each within one query's result cap, which every
        Milvus deployment serves (query iterators need a timestamp service Milvus Lite lacks)."""
        return {int(row["chunk_id"]) for page in self._pages(name, upper, ["chunk_id"]) for row in page}

    def _pages(self, name: str, upper: int, fields: list[str]) -> Iterator[list[dict[str, Any]]]:
        self._load(name)
        for low in range(0, upper + 1, _PAGE):
            page = self.client.query(
                name,
                filter=f"chunk_id >= {low} and chunk_id < {low + _PAGE}",
                output_fields=fields,
                limit=_PAGE,
            )
            if page:
                yield list(page)

    def upsert(
        self, name: str, ids: Sequence[int], vectors: np.ndarray, paths: Sequence[str], texts: Sequence[str]
    ) -> None:
        rows = [
            {
                "chunk_id": int(chunk_id),
                "vector": vector.tolist(),
                "path": _cut(path, PATH_BYTES),
                "text": _cut(text, TEXT_BYTES),
            }
            for chunk_id, vector, path, text in zip(ids, vectors, paths, texts, strict=True)
        ]
        if rows:
            self.client.upsert(name, rows)

    def delete(self, name: str, ids: Sequence[int]) -> None:
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), _PAGE):
            self.client.delete(name, ids=ids[start : start + _PAGE])

    def vectors_of(self, name: str, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """The stored vectors of these chunks (a hybrid query scores lexical-only candidates exactly)."""
        self._load(name)
        ids = sorted({int(i) for i in ids})
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), _PAGE):
            part = ids[start : start + _PAGE]
            rows = self.client.query(
                name, filter=f"chunk_id in {part}", output_fields=["chunk_id", "vector"], limit=len(part)
            )
            for row in rows:
                out[int(row["chunk_id"])] = np.asarray(row["vector"], dtype=np.float32)
        return out

    def vectors(self, name: str, upper: int) -> Iterator[list[dict[str, Any]]]:
        """Pages of {chunk_id, vector} rows (for exports)."""
        return self._pages(name, upper, ["chunk_id", "vector"])

    # --- the alias clients query ----------------------------------------------------------------
    def alias_target(self, alias: str) -> str | None:
        if alias not in self.client.list_aliases().get("aliases", []):
            return None
        return self.client.describe_alias(alias).get("collection_name")

    def point_alias(self, alias: str, collection: str) -> None:
        """Swap the alias onto `collection` in one server-side operation (clients never see a gap)."""
        if self.alias_target(alias) is None:
            self.client.create_alias(collection, alias)
        else:
            self.client.alter_alias(collection, alias)

    # --- search ---------------------------------------------------------------------------------
    def search(self, name: str, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Dense search: inner product of normalised vectors (cosine), best first."""
        self._load(name)
        results = self.client.search(
            name,
            data=[vector.tolist() for vector in vectors],
            anns_field="vector",
            limit=k,
            output_fields=["chunk_id", "path", "text"],
            search_params={"metric_type": "IP"},
        )
        return _hits(results)

    def search_text(self, name: str, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Full-text search: BM25 of the raw query text against the analysed chunk text, best first.
        Milvus Lite reports BM25 as a negative distance and a server as a positive score; BM25 is never
        negative, so the magnitude is the score either way."""
        self._load(name)
        results = self.client.search(
            name,
            data=list(queries),
            anns_field=SPARSE_FIELD,
            limit=k,
            output_fields=["chunk_id", "path", "text"],
            search_params={"metric_type": "BM25"},
        )
        return _hits(results, magnitude=True)


def _hits(results, magnitude: bool = False) -> list[list[Hit]]:
    return [
        [
            Hit(
                int(hit["entity"]["chunk_id"]),
                abs(float(hit["distance"])) if magnitude else float(hit["distance"]),
                hit["entity"]["path"],
                hit["entity"]["text"],
            )
            for hit in hits
        ]
        for hits in results
    ]


@contextmanager
def open_store(target: IndexTarget) -> Iterator[VectorStore]:
    """Open the store for one piece of work. Milvus Lite: under the file lock, and the embedded server
    is stopped on close so that the next process can open the file."""
    lite = target.lite_file
    if lite is None:
        yield from _open_client(target)
        return
    # Milvus Lite's in-process gRPC server logs an ERROR with a traceback for each call it does not
    # implement (pymilvus asks for a timestamp while creating an index) and still answers the client;
    # every real failure reaches the client as an exception, so the server's own log adds only noise.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    with _file_lock(lite.with_name(lite.name + ".lock"), target.lock_timeout_s):
        lite.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield from _open_client(target)
        finally:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(lite))


def _open_client(target: IndexTarget) -> Iterator[VectorStore]:
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    where = f"Milvus Lite file {target.uri}" if target.lite_file else f"Milvus at {target.uri}"
    try:
        client = MilvusClient(uri=target.uri, token=target.token, timeout=CONNECT_TIMEOUT_S)
    except (MilvusException, OSError) as exc:
        kind = IndexRefused if is_refusal(exc) else IndexUnavailable
        raise kind(f"cannot open {where}: {exc} (index.uri, EMBEDTUNE_MILVUS_TOKEN)") from exc
    try:
        yield VectorStore(client, target)
    except (MilvusException, OSError) as exc:
        # a server gone mid-way, a full disk under Milvus Lite: the caller retries later, the alias stays;
        # a refusal is reported as one, so the daemon stops asking
        kind = IndexRefused if is_refusal(exc) else IndexUnavailable
        raise kind(f"{where} failed: {exc}") from exc
    finally:
        try:
            client.close()
        except Exception:  # closing a broken connection must not hide the error that broke it
            pass
