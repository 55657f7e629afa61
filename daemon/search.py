"""`embedtune search` and `embedtune compare`: what a model retrieves from the team's own chunks.

The model in service answers from the live Milvus collection (what RAG clients get through the alias).
Any other model (the base, an older version) answers from a kept collection of its own when there is one
that holds exactly the active chunks, and otherwise by exact search over the active chunks, encoded once
and kept in the embedding cache, so a second question to the same model encodes only the query.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np

from daemon.evaluation import ModelChoice, ModelChoiceError, resolve_model_choice
from daemon.settings import Settings
from state.db import Database
from state.index_records import IndexRecords, active_chunks, chunk_signature
from state.layout import StateLayout
from state.vector_store import Hit, IndexUnavailable


class SearchError(Exception):
    """A request that cannot be answered; the message says why."""


@dataclass
class SearchAnswer:
    model: str
    source: str  # "collection <name>" or "exact search over N chunks"
    note: str
    hits: list[Hit]


def _model_id(choice: ModelChoice) -> int | None:
    return int(choice.label[1:]) if choice.label.startswith("v") else None


def search(settings: Settings, query: str, model: str = "current", k: int = 10) -> SearchAnswer:
    if not query.strip():
        raise SearchError("the query is empty")
    if k < 1:
        raise SearchError("-k must be at least 1")
    try:
        choice = resolve_model_choice(settings, model)
    except ModelChoiceError as exc:
        raise SearchError(str(exc)) from None
    layout = StateLayout(settings.paths.state_dir)
    if not layout.database.exists():
        raise SearchError(f"no documents yet: no state in {settings.paths.state_dir}")
    db = Database(layout.database)
    try:
        conn = db.conn
        note = choice.note
        record = IndexRecords(conn).for_model(_model_id(choice), str(choice.path))
        if (
            settings.index.enabled
            and record is not None
            and record.state in ("live", "ready")
            and record.signature == chunk_signature(conn)
        ):
            return SearchAnswer(
                choice.label,
                f"collection {record.name}",
                note,
                _search_collection(settings, record.name, choice, query, k),
            )
        if model == "current" and settings.index.enabled:
            note = "; ".join(
                filter(None, [note, "the index is not yet in line with this model: exact search"])
            )
        chunks = active_chunks(conn)
    finally:
        db.close()
    if not chunks:
        raise SearchError("no active chunks yet: drop documents into the inbox first")
    return SearchAnswer(
        choice.label,
        f"exact search over {len(chunks)} chunks",
        note,
        _search_exact(settings, layout, choice, chunks, query, k),
    )


def _encoder(settings: Settings, layout: StateLayout, choice: ModelChoice):
    from daemon.round_process import encode_params
    from stages.encoder import Encoder

    return Encoder(choice.path, encode_params(settings), layout.cache)


def _search_collection(settings: Settings, name: str, choice: ModelChoice, query: str, k: int) -> list[Hit]:
    from daemon.indexing import index_target
    from state.vector_store import open_store

    vector = _encoder(settings, StateLayout(settings.paths.state_dir), choice).queries([query])
    with open_store(index_target(settings)) as store:
        return store.search(name, vector, k)[0]


def _search_exact(settings, layout, choice, chunks, query: str, k: int) -> list[Hit]:
    encoder = _encoder(settings, layout, choice)
    from daemon.progress import Progress

    with Progress(f"encode chunks ({choice.label})", len(chunks), "chunks") as progress:
        vectors = []
        for start in range(0, len(chunks), 256):
            batch = chunks[start : start + 256]
            vectors.append(encoder.passages([c.text for c in batch]))
            progress.update(len(batch))
    encoder.save_cache()
    matrix = np.concatenate(vectors)
    scores = matrix @ encoder.queries([query])[0]
    order = np.argsort(-scores)[:k]
    return [Hit(chunks[i].id, float(scores[i]), chunks[i].path, chunks[i].text) for i in order]


def _snippet(text: str, width: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def cmd_search(settings: Settings, query: str, model: str, k: int, as_json: bool) -> int:
    try:
        answer = search(settings, query, model, k)
    except (SearchError, IndexUnavailable) as exc:
        print(f"embedtune: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(
            json.dumps(
                {
                    "model": answer.model,
                    "source": answer.source,
                    "note": answer.note,
                    "hits": [hit.__dict__ for hit in answer.hits],
                },
                ensure_ascii=False,
                indent=1,
            )
        )
        return 0
    print(f"model {answer.model} ({answer.source})" + (f": {answer.note}" if answer.note else ""))
    for rank, hit in enumerate(answer.hits, 1):
        print(f"{rank:>3}  {hit.score:.4f}  {hit.path}#{hit.chunk_id}  {_snippet(hit.text)}")
    return 0


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


def cmd_compare(settings: Settings, query: str, k: int, as_json: bool) -> int:
    try:
        current = search(settings, query, "current", k)
        base = current if current.model == "base" else search(settings, query, "base", k)
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
    print(f"{'base':<{width + 6}}  {current.model + ' (in service)':<{width}}")
    for (rank, hit, change), base_hit in zip(rows, base.hits + [None] * len(rows), strict=False):
        left = f"{rank:>2} {_snippet(base_hit.text, width)}" if base_hit else ""
        print(f"{left:<{width + 6}}  {rank:>2} {change:>4} {_snippet(hit.text, width)}")
    if dropped:
        print("left the top", k, "of", current.model + ":")
        for rank, hit in dropped:
            print(f"  base #{rank}: {hit.path}#{hit.chunk_id}  {_snippet(hit.text)}")
    return 0
