"""`embedtune search` and `embedtune compare`: what the index serves for the team's own questions.

Three modes (`--mode`, default `index.mode`): "hybrid" (BM25 over the chunk text fused with the model's
vectors, stages/fusion.py), "dense" (the model alone) and "lexical" (BM25 alone). The model in service
answers from the live Milvus collection, which holds both halves (what RAG clients get through the alias).
Any other model (the base, an older version) answers from a kept collection of its own when one holds
exactly the active chunks, and otherwise by exact search over the active chunks (vectors from the
embedding cache, BM25 with the teacher's tokenizer), so a question is always answered, with a note.

`search_many` answers a batch in one process (one model load, one store connection): `--queries FILE` and
`embedtune eval --mode` use it, so what eval scores is exactly what search returns.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from daemon.serving import (
    ModelChoice,
    ModelChoiceError,
    NothingServed,
    choose_model,
    open_state,
    resolve_served,
    served_bm25_weight,
)
from daemon.settings import Settings
from daemon.step_params import encode_params
from stages.encoder import Encoder
from stages.fusion import (
    MODES,
    Scored,
    candidate_depth,
    fuse_hybrid,
    fusion_spreads,
    lexical_only,
    sample_covariance,
)
from state.db import connect
from state.index_records import ActiveChunk, CollectionRecord, IndexRecords, active_chunks
from state.layout import StateLayout
from state.vector_store import Hit, IndexRefused, IndexUnavailable

if TYPE_CHECKING:
    from daemon.serve_index import PreparedReplica
    from stages.memory_index import MemoryIndex

_WORD = re.compile(r"\w", re.UNICODE)


class SearchError(Exception):
    """A request that cannot be answered; the message says why."""


@dataclass
class SearchAnswer:
    model: str
    mode: str
    source: str  # "collection <name>" or "exact search over N chunks"
    note: str
    hits: list[Hit] = field(default_factory=list)
    query: str = ""
    id: str = ""
    error: str = ""  # this query was not searched, and why (the others of a batch still are)
    query_id: str = ""  # names this answer in the query log and in the events about it (state/query_log.py)
    # an interleaved trial's answer (daemon/serve_trial.py): the trial, its candidate, each hit's model
    trial_id: int | None = None
    trial_candidate: str = ""
    teams: list[str] | None = None
    trial_arm: int | None = None  # which of the trial's BM25 shares the candidate answered at

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "query_id": self.query_id,
            "query": self.query,
            "model": self.model,
            "mode": self.mode,
            "source": self.source,
            "note": self.note,
            **({"error": self.error} if self.error else {}),
            **(
                {"trial": {"id": self.trial_id, "candidate": self.trial_candidate, "arm": self.trial_arm}}
                if self.trial_id is not None
                else {}
            ),
            "hits": [
                {"chunk_id": h.chunk_id, "path": h.path, "score": round(h.score, 6), "text": h.text}
                for h in self.hits
            ],
        }


def query_problem(query: str) -> str:
    """Why a query cannot be searched, or "" when it can."""
    if not query.strip():
        return "the query is empty"
    if not _WORD.search(query):
        return "the query has no words to search (only punctuation or symbols)"
    return ""


def search(
    settings: Settings, query: str, model: str = "current", k: int = 10, mode: str | None = None
) -> SearchAnswer:
    """One query; a query that cannot be searched raises SearchError with the reason."""
    answer = search_many(settings, [query], model, k, mode)[0]
    if answer.error:
        raise SearchError(answer.error)
    return answer


def search_many(
    settings: Settings,
    queries: list[str],
    model: str = "current",
    k: int = 10,
    mode: str | None = None,
    ids: list[str] | None = None,
    *,
    encoder: Encoder | None = None,
    replica: PreparedReplica | None = None,
    bm25_weight: float | None = None,
) -> list[SearchAnswer]:
    """Answers in the order of `queries`; a query that cannot be searched gets its `error`. Whatever the
    index's state (behind the chunks, Milvus down, its lock held too long) the questions are answered,
    with a note saying from where. `encoder`: one already loaded (`embedtune serve` keeps the served
    model's), used when it is the chosen model's, so a request does not load the model again. `replica`:
    a memory replica of the live collection (`embedtune serve`, daemon/serve_index.py) whose model the
    caller resolved as the one in service: for `model="current"` it answers, with no database read and
    no Milvus open, through the same fusion as a collection. `bm25_weight`: fuse with this BM25 share
    instead of the one the model is served with (an interleaved trial's arm)."""
    mode = mode or settings.index.mode
    if mode not in MODES:
        raise SearchError(f"--mode {mode!r}: use {', '.join(MODES)}")
    if k < 1:
        raise SearchError("-k must be at least 1")
    layout = StateLayout(settings.paths.state_dir)
    if not layout.database.exists():
        raise SearchError(
            f"no documents yet: drop documents into {settings.paths.inbox} first (no state in "
            f"{settings.paths.state_dir})"
        )
    if replica is not None and model.strip().lower() == "current":
        plan = _Plan(replica.choice, replica.source, replica.note, replica.weight, replica=replica.index)
    else:
        plan = _plan(settings, layout, model, mode)
    if bm25_weight is not None:
        plan.weight = bm25_weight
    ids = ids or [str(i) for i in range(1, len(queries) + 1)]
    answers = [
        SearchAnswer(
            plan.choice.label,
            mode,
            plan.source,
            plan.note,
            query=q,
            id=i,
            error=query_problem(q),
            query_id=uuid.uuid4().hex,
        )
        for q, i in zip(queries, ids, strict=True)
    ]
    todo = [a for a in answers if not a.error]
    if not todo:
        return answers
    depth = candidate_depth(k, settings.index.candidates) if mode == "hybrid" else k
    texts = [a.query for a in todo]
    if mode == "lexical":
        encoder = None
    elif encoder is None or Path(encoder.path) != Path(plan.choice.path):
        encoder = Encoder(plan.choice.path, encode_params(settings), layout.cache)
    vectors = None
    if encoder is not None:
        vectors = encoder.queries(texts)
        window = _window(encoder)
        for answer in todo:
            if window and _tokens(encoder, encoder.query_prefix + answer.query) > window:
                answer.note = _join(answer.note, f"query cut to the model's {window} tokens")
    found = None
    if plan.replica is not None:
        found = _from_replica(plan.replica, mode, vectors, texts, depth)
    elif plan.collection is not None:
        try:
            found = _from_collection(settings, layout, plan.collection, mode, vectors, texts, depth)
        except (IndexUnavailable, IndexRefused) as exc:  # Milvus down, its lock held: exact search answers
            plan.chunks = _read_chunks(layout)
            if not plan.chunks:
                raise SearchError("no active chunks yet: drop documents into the inbox first") from None
            plan.source = f"exact search over {len(plan.chunks)} chunks"
            for answer in answers:
                answer.source = plan.source
                answer.note = _join(plan.choice.note, f"the index could not be read ({exc}): exact search")
    if found is None:
        found = _exact(plan.choice, plan.chunks, encoder, mode, vectors, texts, depth)
    for row, answer in enumerate(todo):
        vector = vectors[row] if vectors is not None else None
        answer.hits = _combine(mode, found, row, plan, vector, answer.query, k)
    return answers


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


@dataclass
class _Found:
    """Each half's top-N hits per query, and for hybrid the cosines of BM25-only candidates."""

    dense: list[list[Hit]] | None
    lexical: list[list[Hit]] | None
    dense_of: list[dict[int, float]] | None = None
    covariance: np.ndarray | None = None  # of the chunk vectors (None: no statistics yet)
    corpus_size: int = 0


@dataclass
class _Plan:
    choice: ModelChoice
    source: str
    note: str
    weight: float | None  # None: each query's language decides (stages/fusion.query_bm25_weight)
    collection: CollectionRecord | None = None
    chunks: list[ActiveChunk] = field(default_factory=list)
    replica: MemoryIndex | None = None


def _plan(settings: Settings, layout: StateLayout, model: str, mode: str) -> _Plan:
    """Which model answers and from where, on one read-only connection: the model in service from the
    live collection (however far behind the chunks; the note says how far), another model from a kept
    collection holding exactly the active chunks, else exact search over the active chunks."""
    try:
        conn = open_state(layout)
    except NothingServed as exc:
        raise SearchError(str(exc)) from None
    try:
        served = resolve_served(conn, settings, layout)
        try:
            choice = choose_model(conn, settings, layout, model, served)
        except ModelChoiceError as exc:
            raise SearchError(str(exc)) from None
        in_service = choice.path == served.path and choice.model_id == served.model_id
        weight = served.bm25_weight if in_service else served_bm25_weight(settings, choice.path, conn)
        note = choice.note
        if settings.index.enabled:
            record = None
            if in_service and served.live_is_ours() and (served.live.hybrid or mode == "dense"):
                record, note = served.live, _join(note, served.index_note())
            elif not in_service:
                record = next(
                    (
                        r
                        for r in IndexRecords(conn).collections_for_model(choice.model_id, str(choice.path))
                        if r.state in ("live", "ready")
                        and r.signature == served.signature
                        and (r.hybrid or mode == "dense")
                    ),
                    None,
                )
            if record is not None:  # what the collection serves (None: by each query's language)
                return _Plan(choice, f"collection {record.name}", note, record.bm25_weight, collection=record)
            if in_service:
                why = (
                    "the collection was built before hybrid search (a rebuild runs in the background)"
                    if served.live_is_ours()
                    else "the index is not yet in line with this model"
                )
                note = _join(note, f"{why}: exact search")
        chunks = active_chunks(conn)
    finally:
        conn.close()
    if not chunks:
        raise SearchError("no active chunks yet: drop documents into the inbox first")
    return _Plan(choice, f"exact search over {len(chunks)} chunks", note, weight, chunks=chunks)


def _read_chunks(layout: StateLayout) -> list[ActiveChunk]:
    conn = connect(layout.database, readonly=True)
    try:
        return active_chunks(conn)
    finally:
        conn.close()


def _window(encoder) -> int:
    return int(getattr(encoder.model, "max_seq_length", 0) or 0)


def _tokens(encoder, text: str) -> int:
    if hasattr(encoder.model, "token_count"):  # an ONNX export (stages/onnx_encoder.py)
        return int(encoder.model.token_count(text))
    tokenizer = getattr(encoder.model, "tokenizer", None)
    if tokenizer is None:
        return 0
    return len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


def _from_collection(
    settings, layout: StateLayout, record: CollectionRecord, mode: str, vectors, texts: list[str], depth: int
) -> _Found:
    from daemon.indexing import index_target
    from state.index_stats import load_stats
    from state.vector_store import open_store

    with open_store(index_target(settings)) as store:
        found = _halves(
            lambda: store.search(record.name, vectors, depth),
            lambda: store.search_text(record.name, texts, depth),
            lambda ids: store.vectors_of(record.name, ids),
            mode,
            vectors,
        )
    if mode == "hybrid":
        stats = load_stats(layout.index_stats, record.name)
        found.covariance = stats.covariance if stats is not None else None
        found.corpus_size = record.chunks
    return found


def _from_replica(index: MemoryIndex, mode: str, vectors, texts: list[str], depth: int) -> _Found:
    """The collection's answer, from its memory replica (stages/memory_index.py): the same halves."""
    found = _halves(
        lambda: index.dense(vectors, depth),
        lambda: index.lexical(texts, depth),
        index.vectors_of,
        mode,
        vectors,
    )
    if mode == "hybrid":
        found.covariance, found.corpus_size = index.covariance, index.size
    return found


def _halves(dense_search, lexical_search, vectors_of, mode: str, vectors) -> _Found:
    """Each half's top-N (from a collection or its replica) and, for hybrid, the cosines of the
    candidates only BM25 found, from the stored vectors."""
    dense = dense_search() if mode != "lexical" else None
    lexical = lexical_search() if mode != "dense" else None
    found = _Found(dense, lexical)
    if mode == "hybrid" and dense is not None and lexical is not None:
        wanted = [lexical_only(_scored(d), _scored(le)) for d, le in zip(dense, lexical, strict=True)]
        stored = vectors_of([i for ids in wanted for i in ids])
        found.dense_of = [
            {i: float(stored[i] @ vectors[row]) for i in ids if i in stored} for row, ids in enumerate(wanted)
        ]
    return found


def _scored(hits: list[Hit]) -> list[Scored]:
    return [Scored(hit.chunk_id, hit.score) for hit in hits]


def _exact(choice: ModelChoice, chunks, encoder, mode: str, vectors, texts: list[str], depth: int) -> _Found:
    """Both halves over the active chunks in memory: the same fusion as a collection's."""
    dense = lexical = scores = None
    if mode != "lexical":
        from daemon.progress import Progress

        with Progress(f"encode chunks ({choice.label})", len(chunks), "chunks") as progress:
            parts = []
            for start in range(0, len(chunks), 256):
                batch = chunks[start : start + 256]
                parts.append(encoder.passages([c.text for c in batch]))
                progress.update(len(batch))
        encoder.save_cache()
        matrix = np.concatenate(parts)
        scores = vectors @ matrix.T
        dense = [_top(row, chunks, depth) for row in scores]
        covariance = sample_covariance(matrix)
    if mode != "dense":
        from stages.filter import Bm25Index

        bm25 = Bm25Index([c.text for c in chunks])
        lexical = [_top(bm25.scores(text), chunks, depth, positive_only=True) for text in texts]
    found = _Found(dense, lexical, corpus_size=len(chunks))
    if scores is not None:
        found.covariance = covariance
    if scores is not None and lexical is not None:
        row_of = {chunk.id: i for i, chunk in enumerate(chunks)}
        found.dense_of = [
            {hit.chunk_id: float(scores[row, row_of[hit.chunk_id]]) for hit in hits}
            for row, hits in enumerate(lexical)
        ]
    return found


def _top(scores: np.ndarray, chunks: list[ActiveChunk], depth: int, positive_only: bool = False) -> list[Hit]:
    order = np.argsort(-scores, kind="stable")[:depth]
    return [
        Hit(chunks[i].id, float(scores[i]), chunks[i].path, chunks[i].text)
        for i in order
        if not positive_only or scores[i] > 0  # BM25 0: no query word in the chunk (as Milvus returns)
    ]


def _combine(mode: str, found: _Found, row: int, plan: _Plan, vector, query: str, k: int) -> list[Hit]:
    dense = found.dense[row] if found.dense else []
    lexical = found.lexical[row] if found.lexical else []
    if mode == "dense":
        return dense[:k]
    if mode == "lexical":
        return lexical[:k]
    by_id = {hit.chunk_id: hit for hit in lexical} | {hit.chunk_id: hit for hit in dense}
    extra = found.dense_of[row] if found.dense_of else None
    dense_scored, lexical_scored = _scored(dense), _scored(lexical)
    spreads = fusion_spreads(vector, found.covariance, dense_scored, lexical_scored, found.corpus_size)
    fused = fuse_hybrid(query, dense_scored, lexical_scored, plan.weight, k, extra, spreads)
    return [Hit(s.chunk_id, s.score, by_id[s.chunk_id].path, by_id[s.chunk_id].text) for s in fused]


# --- the commands ------------------------------------------------------------------------------
def read_queries(path: Path) -> tuple[list[str], list[str]]:
    """(ids, queries) from a file: JSON lines with `query` (and optional `id`), or one query a line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SearchError(f"cannot read --queries {path}: {exc}") from None
    ids, queries = [], []
    as_json = path.suffix == ".jsonl" or next(
        (ln.lstrip().startswith("{") for ln in lines if ln.strip()), False
    )
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not as_json:
            ids.append(str(number))
            queries.append(line.strip())
            continue
        try:
            row = json.loads(line)
            query = row["query"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SearchError(f"{path}:{number}: expected a JSON object with a 'query' string") from None
        if not isinstance(query, str):
            raise SearchError(f"{path}:{number}: 'query' must be a string")
        ids.append(str(row.get("id", number)))
        queries.append(query)
    if not queries:
        raise SearchError(f"{path} holds no queries")
    return ids, queries


def _snippet(text: str, width: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def cmd_search(
    settings: Settings,
    query: str | None,
    model: str,
    k: int,
    as_json: bool,
    mode: str | None = None,
    queries_file: str | None = None,
) -> int:
    try:
        if queries_file:
            ids, queries = read_queries(Path(queries_file))
        elif query is not None:
            ids, queries = ["1"], [query]
        else:
            raise SearchError("give a query, or --queries FILE")
        answers = search_many(settings, queries, model, k, mode, ids)
    except (SearchError, IndexUnavailable) as exc:
        print(f"embedtune: {exc}", file=sys.stderr)
        return 2
    from daemon.query_logging import log_answers

    log_answers(settings, answers, "cli")
    if as_json:
        for answer in answers:  # one object per query (a JSON lines stream for a batch)
            print(json.dumps(answer.to_json(), ensure_ascii=False, indent=None if queries_file else 1))
    else:
        for answer in answers:
            _print_answer(answer, batch=bool(queries_file))
    failed = [a for a in answers if a.error]
    if failed and not queries_file:
        return 2
    return 0


def _print_answer(answer: SearchAnswer, batch: bool) -> None:
    if batch:
        print(f"[{answer.id}] {_snippet(answer.query, 70)}")
    if answer.error:
        print(f"embedtune: {answer.error}", file=sys.stderr if not batch else sys.stdout)
        return
    if not batch or answer.id == "1":
        head = f"model {answer.model}, {answer.mode} ({answer.source})"
        print(head + (f": {answer.note}" if answer.note else ""))
    for rank, hit in enumerate(answer.hits, 1):
        print(f"{rank:>3}  {hit.score:.4f}  {hit.path}#{hit.chunk_id}  {_snippet(hit.text)}")


def rank_changes(base: list[Hit], current: list[Hit]) -> list[tuple[int, Hit, str]]:
    """For each hit of the current model: its rank and how it moved against the base's ranking."""
    base_rank = {hit.chunk_id: rank for rank, hit in enumerate(base, 1)}
    rows = []
    for rank, hit in enumerate(current, 1):
        before = base_rank.get(hit.chunk_id)
        if before is None:
            change = "new"
        elif before == rank:
            change = "="
        elif before > rank:
            change = f"↑{before - rank}"
        else:
            change = f"↓{rank - before}"
        rows.append((rank, hit, change))
    return rows


def cmd_compare(settings: Settings, query: str, k: int, as_json: bool, mode: str | None = None) -> int:
    try:
        current = search(settings, query, "current", k, mode)
        base = current if current.model == "base" else search(settings, query, "base", k, mode)
    except (SearchError, IndexUnavailable) as exc:
        print(f"embedtune: {exc}", file=sys.stderr)
        return 2
    rows = rank_changes(base.hits, current.hits)
    current_ids = {hit.chunk_id for hit in current.hits}
    dropped = [(rank, hit) for rank, hit in enumerate(base.hits, 1) if hit.chunk_id not in current_ids]
    if as_json:
        print(
            json.dumps(
                {
                    "mode": current.mode,
                    "base": {"source": base.source, "hits": [h.__dict__ for h in base.hits]},
                    "current": {
                        "model": current.model,
                        "source": current.source,
                        "hits": [dict(h.__dict__, rank=r, change=c) for r, h, c in rows],
                    },
                    "dropped": [dict(h.__dict__, base_rank=r) for r, h in dropped],
                    "note": current.note,
                },
                ensure_ascii=False,
                indent=1,
            )
        )
        return 0
    if current.model == "base":
        print("nothing promoted yet: the model in service is the base model, so both columns agree")
    width = 60
    print(f"{current.mode} retrieval")
    print(f"{'base':<{width + 6}}  {current.model + ' (in service)':<{width}}")
    for (rank, hit, change), base_hit in zip(rows, base.hits + [None] * len(rows), strict=False):
        left = f"{rank:>2} {_snippet(base_hit.text, width)}" if base_hit else ""
        print(f"{left:<{width + 6}}  {rank:>2} {change:>4} {_snippet(hit.text, width)}")
    if dropped:
        print("left the top", k, "of", current.model + ":")
        for rank, hit in dropped:
            print(f"  base #{rank}: {hit.path}#{hit.chunk_id}  {_snippet(hit.text)}")
    return 0
