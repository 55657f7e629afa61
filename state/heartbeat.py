"""The daemon's row: who runs, what it is doing, and the LLM client's state, for `status` to read."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from state.db import transaction, utcnow


def mark_started(conn: sqlite3.Connection, pid: int, host: str) -> None:
    with transaction(conn):
        conn.execute(
            "UPDATE daemon SET pid=?, host=?, started=?, heartbeat=?, heartbeat_ts=?, activity='starting' "
            "WHERE id=1",
            (pid, host, utcnow(), utcnow(), time.time()),
        )


def write_heartbeat(
    conn: sqlite3.Connection,
    activity: str,
    breaker: str,
    llm: dict[str, Any] | None,
    restart_needed: list[str] | None = None,
) -> None:
    with transaction(conn):
        conn.execute(
            "UPDATE daemon SET heartbeat=?, heartbeat_ts=?, activity=?, breaker=?, llm=?, restart_keys=? "
            "WHERE id=1",
            (
                utcnow(),
                time.time(),
                activity,
                breaker,
                json.dumps(llm) if llm is not None else None,
                json.dumps(restart_needed or []),
            ),
        )


def mark_stopped(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        conn.execute("UPDATE daemon SET activity='stopped', heartbeat=? WHERE id=1", (utcnow(),))
