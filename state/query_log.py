"""The query log: what users asked, what they were shown, and what their applications did with it.

Shaped like User Behavior Insights (the open schema OpenSearch uses): a query carries its `query_id`, the
question, the client, the model version and mode that answered, where the hits came from and their chunk
ids in rank order; an event (`click`, `cited`, ...) names a logged query and, optionally, the chunk it is
about and that chunk's 1-based position in the hits. The gate on real questions reads this log, so it
is kept exact: a query is stored once however often it is recorded, and an event for a query the log does
not hold is refused with the reason rather than stored.

One QueryLog per connection; a connection is not shared between threads while a method runs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from state.db import transaction, utcnow
from state.real_queries import normalise, question_key

SOURCES = ("cli", "http")
TEAMS = ("served", "candidate")  # the interleaving teams, named as stages/interleaving.py names them
MAX_ACTION_CHARS = 100
MAX_ID_CHARS = 200
MAX_ATTRIBUTES_BYTES = 64 * 1024


MAX_POSITION = 100_000  # a rank beyond any served depth (and far inside SQLite's integers)


@dataclass(frozen=True)
class LoggedQuery:
    """One answered search as it is logged (hit_ids: chunk ids in the order they were shown)."""

    query_id: str
    user_query: str
    client_id: str
    source: str  # "cli" or "http"
    mode: str
    model_version: str
    collection: str  # where the hits came from: the collection's name, or the exact search that answered
    hit_ids: list[int] = field(default_factory=list)
    # an interleaved trial's search (state/trials.py): the trial, and the model that showed each hit
    trial_id: int | None = None
    teams: list[str] | None = None
    trial_arm: int | None = None  # which of the trial's BM25 shares the candidate answered at


@dataclass(frozen=True)
class LoggedEvent:
    """What an application did with a hit (UBI: action_name, object_id, position ordinal, attributes)."""

    query_id: str
    action_name: str
    object_id: str | None
    position: int | None  # 1-based rank of the object in the query's hits
    client_id: str
    attributes: dict[str, Any] = field(default_factory=dict)


class QueryLog:
    """Reads and writes the `queries` and `query_events` tables (migration 14)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def record_queries(self, entries: list[LoggedQuery]) -> None:
        """All of one request's queries in one transaction; a query_id already logged is left as it was
        (a retried write never duplicates a query). A malformed entry raises ValueError and writes none."""
        for entry in entries:
            _check_query(entry)
        if not entries:
            return
        at = utcnow()
        # the trial columns (migrations 17, 18) only when a trial's answer is among them: a plain search
        # writes the columns every schema since the log's has
        trial = any(e.trial_id is not None for e in entries)
        columns = "query_id, user_query, client_id, source, mode, model_version, collection, hit_ids, at"
        columns += ", trial_id, teams, trial_arm" if trial else ""
        marks = ", ".join("?" * len(columns.split(", ")))
        rows = []
        for e in entries:
            row = [
                e.query_id,
                e.user_query,
                e.client_id,
                e.source,
                e.mode,
                e.model_version,
                e.collection,
                json.dumps([int(i) for i in e.hit_ids]),
                at,
            ]
            if trial:
                row += [e.trial_id, json.dumps(e.teams) if e.teams is not None else None, e.trial_arm]
            rows.append(row)
        with transaction(self.conn):
            self.conn.executemany(f"INSERT OR IGNORE INTO queries ({columns}) VALUES ({marks})", rows)

    def record_event(self, event: LoggedEvent) -> str:
        """Store one event; "" when stored, else why it was refused (nothing is stored then)."""
        problem, object_id, attributes = _check_event(event)
        if problem:
            return problem
        with transaction(self.conn):
            known = self.conn.execute(
                "SELECT 1 FROM queries WHERE query_id = ?", (event.query_id,)
            ).fetchone()
            if known is None:
                return (
                    f"unknown query_id {event.query_id!r}: events must name a query_id a search answer "
                    "carried (and that the retention period has not removed)"
                )
            self.conn.execute(
                "INSERT INTO query_events (query_id, action_name, object_id, position, client_id, "
                "attributes, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    event.query_id,
                    event.action_name.strip(),
                    object_id,
                    event.position,
                    event.client_id,
                    attributes,
                    utcnow(),
                ),
            )
        return ""

    def counts(self) -> dict[str, int]:
        """Logged queries, events, and queries with at least one event (`status`)."""
        queries = self.conn.execute("SELECT COUNT(*) FROM queries").fetchone()[0]
        events, with_events = self.conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT query_id) FROM query_events"
        ).fetchone()
        return {"queries": queries, "events": events, "queries_with_events": with_events}

    def prune(self, retention_days: float) -> int:
        """Remove queries logged more than `retention_days` ago, with their events; 0 keeps everything.
        Returns the number of queries removed."""
        if retention_days <= 0:
            return 0
        cutoff = (datetime.now(UTC) - timedelta(days=retention_days)).isoformat(timespec="milliseconds")
        with transaction(self.conn):
            self.conn.execute(
                "DELETE FROM query_events WHERE query_id IN (SELECT query_id FROM queries WHERE at < ?)",
                (cutoff,),
            )
            return self.conn.execute("DELETE FROM queries WHERE at < ?", (cutoff,)).rowcount

    def export(self) -> Iterator[dict[str, Any]]:
        """One dict per query in the order they were logged (every column, hit_ids as a list), with its
        events in the order they arrived and its question's `split` ("train", "judge", or None while no
        round has read it), so an outside trainer can keep the gate's part out of its training; read in
        one snapshot, so queries, events and splits agree."""
        own = not self.conn.in_transaction
        if own:
            self.conn.execute("BEGIN")
        try:
            split_of = _split_lookup(self.conn)
            columns = {row[1] for row in self.conn.execute("PRAGMA table_info(queries)")}
            trial_columns = ", ".join(
                f"q.{name}" if name in columns else f"NULL AS {name}"
                for name in ("trial_id", "teams", "trial_arm")
            )
            rows = self.conn.execute(
                "SELECT q.query_id, q.user_query, q.client_id, q.source, q.mode, q.model_version, "
                f"q.collection, q.hit_ids, q.at, {trial_columns}, e.id AS e_id, e.action_name AS e_action, "
                "e.object_id AS e_object, e.position AS e_position, e.client_id AS e_client, "
                "e.attributes AS e_attributes, e.at AS e_at "
                "FROM queries q LEFT JOIN query_events e ON e.query_id = q.query_id "
                "ORDER BY q.rowid, e.id"
            )
            current: dict[str, Any] | None = None
            for row in rows:
                if current is None or current["query_id"] != row["query_id"]:
                    if current is not None:
                        yield current
                    current = {
                        "query_id": row["query_id"],
                        "user_query": row["user_query"],
                        "client_id": row["client_id"],
                        "source": row["source"],
                        "mode": row["mode"],
                        "model_version": row["model_version"],
                        "collection": row["collection"],
                        "hit_ids": json.loads(row["hit_ids"]),
                        "at": row["at"],
                        "trial_id": row["trial_id"],
                        "teams": json.loads(row["teams"]) if row["teams"] else None,
                        "trial_arm": row["trial_arm"],
                        "split": split_of(row["user_query"]),
                        "events": [],
                    }
                if row["e_id"] is not None:
                    current["events"].append(
                        {
                            "id": row["e_id"],
                            "action_name": row["e_action"],
                            "object_id": row["e_object"],
                            "position": row["e_position"],
                            "client_id": row["e_client"],
                            "attributes": json.loads(row["e_attributes"]),
                            "at": row["e_at"],
                        }
                    )
            if current is not None:
                yield current
        finally:
            if own and self.conn.in_transaction:
                self.conn.execute("COMMIT")


def _split_lookup(conn: sqlite3.Connection) -> Callable[[str], str | None]:
    """A query text -> its question's split, from one read of `question_splits` (a database from before
    migration 16 has no such table: every split is then None). A text that is no question (blank, only
    punctuation) has none."""
    table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'question_splits'"
    ).fetchone()
    splits: dict[str, str] = (
        dict(conn.execute("SELECT question_key, split FROM question_splits").fetchall()) if table else {}
    )

    def split_of(text: str) -> str | None:
        return splits.get(question_key(text)) if splits and normalise(text) else None

    return split_of


def _check_query(entry: LoggedQuery) -> None:
    if not isinstance(entry.query_id, str) or not entry.query_id:
        raise ValueError("a logged query needs a query_id")
    if entry.source not in SOURCES:
        raise ValueError(f"query source {entry.source!r}: use {' or '.join(SOURCES)}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in entry.hit_ids):
        raise ValueError(f"query {entry.query_id}: hit_ids must be chunk ids (integers)")
    if entry.teams is not None and (
        entry.trial_id is None
        or len(entry.teams) != len(entry.hit_ids)
        or not all(t in TEAMS for t in entry.teams)
    ):
        raise ValueError(f"query {entry.query_id}: teams name {' or '.join(TEAMS)} for each hit of a trial")
    if entry.trial_arm is not None and (entry.trial_id is None or entry.trial_arm < 0):
        raise ValueError(f"query {entry.query_id}: a trial arm is a trial's (an index from 0)")


def _check_event(event: LoggedEvent) -> tuple[str, str | None, str]:
    """(why the event is refused or "", its object_id as stored, its attributes as JSON)."""
    if not isinstance(event.query_id, str) or not event.query_id.strip():
        return "query_id is missing: an event names the query_id its search answer carried", None, ""
    if not isinstance(event.action_name, str) or not event.action_name.strip():
        return "action_name is missing (e.g. 'click' or 'cited')", None, ""
    if len(event.action_name) > MAX_ACTION_CHARS:
        return f"action_name is longer than {MAX_ACTION_CHARS} characters", None, ""
    object_id = event.object_id
    if isinstance(object_id, int) and not isinstance(object_id, bool):
        object_id = str(object_id)  # a chunk id sent as a number names the same chunk
    if object_id is not None and (not isinstance(object_id, str) or len(object_id) > MAX_ID_CHARS):
        return f"object_id must be a string of at most {MAX_ID_CHARS} characters (a chunk id)", None, ""
    position = event.position
    if position is not None and (
        not isinstance(position, int) or isinstance(position, bool) or not 1 <= position <= MAX_POSITION
    ):
        return f"position must be the hit's 1-based rank (an integer from 1 to {MAX_POSITION})", None, ""
    if not isinstance(event.client_id, str) or len(event.client_id) > MAX_ID_CHARS:
        return f"client_id must be a string of at most {MAX_ID_CHARS} characters", None, ""
    if not isinstance(event.attributes, dict):
        return "attributes must be a JSON object", None, ""
    try:
        attributes = json.dumps(event.attributes, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"attributes are not JSON: {exc}", None, ""
    if len(attributes.encode()) > MAX_ATTRIBUTES_BYTES:
        return f"attributes are larger than {MAX_ATTRIBUTES_BYTES // 1024} KiB", None, ""
    return "", object_id, attributes
