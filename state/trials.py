"""Interleaved trials in the database (migrations 17, 18): the running trial, its history, its answers.

A trial pits a registered, never-promoted candidate against the version it was judged against
(`replacing_id`; None: the base model). `serve` reads the running trial every poll and mixes the
candidate's hits into `share` of its searches; each such query is logged with the trial's id and the
team of each hit, and its arm (which of the trial's BM25 shares the candidate was tried at; 0 for a
trial with one). The daemon tallies those answers' events and ends the trial (stages/interleaving.py
decides, daemon/trials.py acts). At most one trial runs at a time: opening one ends the one before.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta

from state.db import transaction, utcnow
from state.real_queries import LoggedAnswer, LoggedEventRef, question_key

GAIN, LOSS, EXPIRED, SUPERSEDED, SERVING_CHANGED, STOPPED = (  # how a trial ended
    "gain",
    "loss",
    "expired",
    "superseded",
    "serving_changed",
    "stopped",
)
RESULTS = (GAIN, LOSS, EXPIRED, SUPERSEDED, SERVING_CHANGED, STOPPED)


@dataclass(frozen=True)
class TrialRecord:
    id: int
    round_id: int | None
    model_id: int
    path: str
    replacing_id: int | None
    variant: str
    share: float
    started: str
    ended: str | None
    result: str | None
    reason: str
    arms: tuple[float, ...] = ()  # the BM25 shares the candidate is tried at; (): its folder's share
    arms_out: tuple[int, ...] = ()  # arms the served model beat, no longer mixed

    @property
    def version(self) -> str:
        return f"v{self.model_id}"

    @property
    def arm_shares(self) -> list[float | None]:
        """Each arm's share of BM25 for the candidate (None: the one its folder or config serves)."""
        return list(self.arms) if self.arms else [None]

    @property
    def active_arms(self) -> list[int]:
        return [arm for arm in range(len(self.arm_shares)) if arm not in self.arms_out]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TrialRecord:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["arms"] = tuple(float(w) for w in _json_list(values["arms"]))
        values["arms_out"] = tuple(int(a) for a in _json_list(values["arms_out"]))
        return cls(**values)


def _json_list(text: str | None) -> list:
    """A JSON list of numbers as this module writes them; anything else reads as [] (one arm, none out)
    rather than stopping every reader of the trial (the daemon's start, `status`, `trial stop`)."""
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    ok = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )
    return value if ok else []


@dataclass(frozen=True)
class TrialAnswer:
    """One interleaved search: its hits and events as logged, and the team of each hit."""

    answer: LoggedAnswer
    teams: list[str]
    arm: int = 0


_COLUMNS = ", ".join(TrialRecord.__dataclass_fields__)


class TrialStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def running(self) -> TrialRecord | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM trials WHERE ended IS NULL").fetchone()
        return TrialRecord.from_row(row) if row is not None else None

    def get(self, trial_id: int) -> TrialRecord:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM trials WHERE id = ?", (trial_id,)).fetchone()
        if row is None:
            raise KeyError(f"no trial {trial_id}")
        return TrialRecord.from_row(row)

    def recent(self, limit: int = 5) -> list[TrialRecord]:
        rows = self.conn.execute(f"SELECT {_COLUMNS} FROM trials ORDER BY id DESC LIMIT ?", (limit,))
        return [TrialRecord.from_row(row) for row in rows]

    def open(
        self,
        *,
        round_id: int | None,
        model_id: int,
        path: str,
        replacing_id: int | None,
        variant: str,
        share: float,
        arms: list[float] | None = None,
    ) -> tuple[TrialRecord, TrialRecord | None]:
        """Start a trial (`arms`: the BM25 shares to try the candidate at; none: its folder's); the one
        running before (returned second) ends as superseded, in the same transaction, so there is never
        a moment with two."""
        with transaction(self.conn):
            before = self.running()
            if before is not None:
                self.write_end(before.id, SUPERSEDED, f"superseded by round {round_id}'s candidate")
            trial_id = self.conn.execute(
                "INSERT INTO trials (round_id, model_id, path, replacing_id, variant, share, started, arms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (round_id, model_id, path, replacing_id, variant, share, utcnow(), json.dumps(arms or [])),
            ).fetchone()[0]
        return self.get(trial_id), before

    def write_end(self, trial_id: int, result: str, reason: str) -> bool:
        """End a running trial inside the caller's transaction; False when it had already ended."""
        if result not in RESULTS:
            raise ValueError(f"trial result {result!r}: use one of {', '.join(RESULTS)}")
        cursor = self.conn.execute(
            "UPDATE trials SET ended = ?, result = ?, reason = ? WHERE id = ? AND ended IS NULL",
            (utcnow(), result, reason, trial_id),
        )
        return cursor.rowcount > 0

    def note(self, trial_id: int, reason: str) -> None:
        """The running trial's standing as the last check found it (`embedtune status` shows it)."""
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE trials SET reason = ? WHERE id = ? AND ended IS NULL", (reason, trial_id)
            )

    def take_out_arm(self, trial_id: int, arm: int, reason: str) -> None:
        """An arm the served model beat stops being mixed; the trial goes on with the others."""
        with transaction(self.conn):
            row = self.conn.execute(
                "SELECT arms_out FROM trials WHERE id = ? AND ended IS NULL", (trial_id,)
            ).fetchone()
            if row is None:
                return
            out = sorted({*json.loads(row[0] or "[]"), arm})
            self.conn.execute(
                "UPDATE trials SET arms_out = ?, reason = ? WHERE id = ?", (json.dumps(out), reason, trial_id)
            )

    def end(self, trial_id: int, result: str, reason: str) -> bool:
        with transaction(self.conn):
            return self.write_end(trial_id, result, reason)

    def settled_answers(self, trial_id: int, now: datetime, window_s: float) -> list[TrialAnswer]:
        """The trial's searches asked at least `window_s` before `now`, oldest first, each with the
        events that came within `window_s` of it, and only the first of each client's question (the
        same client asking again is not a new outcome). An outcome is fixed once it appears here, so
        the daemon's repeated looks see one growing sequence (one snapshot)."""
        cutoff = (now - timedelta(seconds=window_s)).isoformat()
        window_days = window_s / 86400.0
        own = not self.conn.in_transaction
        if own:
            self.conn.execute("BEGIN")
        try:
            rows = self.conn.execute(
                "SELECT query_id, user_query, client_id, hit_ids, teams, trial_arm, model_version, mode, at "
                "FROM queries "
                "WHERE trial_id = ? AND julianday(at) <= julianday(?) ORDER BY rowid",
                (trial_id, cutoff),
            ).fetchall()
            events: dict[str, list[LoggedEventRef]] = {}
            for query_id, action, object_id, position in self.conn.execute(
                "SELECT e.query_id, e.action_name, e.object_id, e.position FROM query_events e "
                "JOIN queries q ON q.query_id = e.query_id WHERE q.trial_id = ? "
                "AND julianday(q.at) <= julianday(?) AND julianday(e.at) <= julianday(q.at) + ? ORDER BY e.id",
                (trial_id, cutoff, window_days),
            ):
                events.setdefault(query_id, []).append(LoggedEventRef(action, object_id, position))
        finally:
            if own and self.conn.in_transaction:
                self.conn.execute("COMMIT")
        out, seen = [], set()
        for row in rows:
            asker = (row["client_id"], question_key(row["user_query"]))
            if asker in seen:
                continue
            seen.add(asker)
            answer = LoggedAnswer(
                query_id=row["query_id"],
                hit_ids=[int(i) for i in json.loads(row["hit_ids"])],
                events=events.get(row["query_id"], []),
                model_version=row["model_version"],
                mode=row["mode"],
                at=row["at"],
            )
            teams = list(json.loads(row["teams"] or "[]"))
            out.append(TrialAnswer(answer, teams, row["trial_arm"] or 0))
        return out

    def question_count(self, trial_id: int) -> int:
        return int(
            self.conn.execute("SELECT COUNT(*) FROM queries WHERE trial_id = ?", (trial_id,)).fetchone()[0]
        )
