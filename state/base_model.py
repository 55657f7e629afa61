"""The base model this state folder is built on, kept in the daemon's row: what `model.base = "auto"`
chose (decided once, from the first document's language) or, when the daemon last ran with an explicit
base, that one. Every process and every later start with "auto" uses the same one, so a folder built by
`embedtune once --embedding-model X` keeps X when a later command's config says "auto"."""

from __future__ import annotations

import sqlite3

from state.db import transaction


def recorded_base(conn: sqlite3.Connection) -> tuple[str, str] | None:
    """(model reference, why) once chosen, else None."""
    row = conn.execute("SELECT base_model, base_reason FROM daemon WHERE id = 1").fetchone()
    return (row[0], row[1] or "") if row and row[0] else None


def record_base(conn: sqlite3.Connection, reference: str, reason: str) -> tuple[str, str]:
    """Record the choice unless one exists; returns the one that holds (the first writer wins)."""
    with transaction(conn):
        conn.execute(
            "UPDATE daemon SET base_model = ?, base_reason = ? WHERE id = 1 AND base_model IS NULL",
            (reference, reason),
        )
    recorded = recorded_base(conn)
    assert recorded is not None
    return recorded


def set_base(conn: sqlite3.Connection, reference: str, reason: str) -> None:
    """Record an explicitly configured base (it wins over any earlier record)."""
    with transaction(conn):
        conn.execute("UPDATE daemon SET base_model = ?, base_reason = ? WHERE id = 1", (reference, reason))
