"""Search answers into the query log (state/query_log.py), for `embedtune search` and the HTTP server.

Logging is a side effect of answering: a failure to log (a locked or read-only database, a full disk) is
logged as a warning and the search still answers. The query text is written to the state database only,
never to the process log.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from daemon.logs import get_logger
from daemon.settings import Settings
from state.layout import StateLayout
from state.query_log import LoggedQuery, QueryLog

if TYPE_CHECKING:
    from daemon.search import SearchAnswer

log = get_logger("embedtune.query_log")

COLLECTION_PREFIX = "collection "


def answered_from(answer: SearchAnswer) -> str:
    """Where the hits came from: the collection's name, or the answer's own words for an exact search
    ("exact search over N chunks"), so the gate can tell the two apart."""
    source = answer.source
    return source[len(COLLECTION_PREFIX) :] if source.startswith(COLLECTION_PREFIX) else source


def logged_queries(answers: list[SearchAnswer], source: str, client_id: str = "") -> list[LoggedQuery]:
    """The log's rows for the answers that were searched (an answer with an error showed nothing)."""
    return [
        LoggedQuery(
            query_id=answer.query_id,
            user_query=answer.query,
            client_id=client_id,
            source=source,
            mode=answer.mode,
            model_version=answer.model,
            collection=answered_from(answer),
            hit_ids=[int(hit.chunk_id) for hit in answer.hits],
            trial_id=answer.trial_id,
            teams=answer.teams,
            trial_arm=answer.trial_arm,
        )
        for answer in answers
        if not answer.error and answer.query_id
    ]


class LogUnavailable(Exception):
    """The state database cannot take log rows now (written by another embedtune version)."""


def open_log(layout: StateLayout) -> sqlite3.Connection:
    """A writable connection for log rows, on a database of this embedtune's schema only: a search or the
    serving process never migrates the daemon's database (the daemon does when it starts)."""
    from state.db import SCHEMA_VERSION, connect

    conn = connect(layout.database)
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version != SCHEMA_VERSION:
        conn.close()
        raise LogUnavailable(
            f"the state database has schema {version}, this embedtune writes {SCHEMA_VERSION}: restart the "
            "daemon (it migrates) or use the matching embedtune"
        )
    return conn


def log_answers(settings: Settings, answers: list[SearchAnswer], source: str, client_id: str = "") -> None:
    """Write the answers' queries (each already carries its query_id) in one transaction on a short-lived
    connection, when `query_log.enabled`. Never raises: the search has answered whatever happens here."""
    if not settings.query_log.enabled:
        return
    try:
        entries = logged_queries(answers, source, client_id)
        if not entries:
            return
        layout = StateLayout(settings.paths.state_dir)
        if not layout.database.exists():  # search answered without a state folder: nothing to log into
            return
        conn = open_log(layout)
        try:
            QueryLog(conn).record_queries(entries)
        finally:
            conn.close()
    except Exception as exc:
        log.warning(
            "query_log_write_failed",
            queries=len(answers),
            source=source,
            error=f"{type(exc).__name__}: {exc}",
        )
