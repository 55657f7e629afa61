"""Logged questions as training and judging material, and the judgments made about them.

A *question* is a distinct logged query text: rewordings that differ only in case, spacing, punctuation,
symbols or Unicode form are one question (`question_key`). Each question is put once, for good, on one
side: "train" (rounds may learn from its clicked pairs) or "judge" (only the gate sees it). The side is
stored, not recomputed, so a later change of the judge share, or a question asked again after the query
log pruned it, never moves a question across; otherwise a round could train on what the gate then judges
it by.

Judgments grade (question, passage) pairs 0..3 per judge and are kept, keyed by text hashes, so the
next round asks the judge only about pairs it has not graded yet.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog

from state.db import transaction, utcnow

log = structlog.get_logger("embedtune.real_queries")

TRAIN = "train"
JUDGE = "judge"
SPLITS = (TRAIN, JUDGE)
MAX_GRADE = 3.0

JudgmentKey = tuple[str, str]  # (question key, passage key)
# SQLite's default limit on bound parameters is 32766 (>= 3.32); stay well below it.
_LOOKUP_CHUNK = 400


def _in_parts(values: list[str]) -> Iterator[tuple[list[str], str]]:
    """`values` in parts small enough to bind in one `IN (...)`, each with its placeholders."""
    for start in range(0, len(values), _LOOKUP_CHUNK):
        part = values[start : start + _LOOKUP_CHUNK]
        yield part, ", ".join("?" * len(part))


_SPLIT_BUCKETS = 10_000
_SPACE = re.compile(r"\s+")
_DROPPED = ("P", "S")  # Unicode category classes: punctuation, symbols


def normalise(text: str) -> str:
    """The form two wordings of one question share: NFKC, casefolded, punctuation and symbols turned into
    spaces, whitespace collapsed and stripped. "Reset my password?" and "reset my password" must be one
    question, or one could land in train and the other in judge (a leak). Only punctuation: ""."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    spaced = "".join(" " if unicodedata.category(ch)[0] in _DROPPED else ch for ch in folded)
    return _SPACE.sub(" ", spaced).strip()


def question_key(text: str) -> str:
    """32 hex characters naming a question, the same for every wording `normalise` makes equal."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:32]


def split_for(key: str, judge_share: float) -> str:
    """The side a new question goes to, from its key alone (so any process assigns it the same way)."""
    bucket = int(key[:8], 16) % _SPLIT_BUCKETS
    return JUDGE if bucket < round(_share(judge_share) * _SPLIT_BUCKETS) else TRAIN


def _share(judge_share: float) -> float:
    if isinstance(judge_share, bool) or not isinstance(judge_share, numbers.Real):
        raise ValueError(f"judge_share must be a number from 0 to 1, not {judge_share!r}")
    if not 0.0 <= float(judge_share) <= 1.0:
        raise ValueError(f"judge_share must be a number from 0 to 1, not {judge_share!r}")
    return float(judge_share)


@dataclass(frozen=True)
class LoggedEventRef:
    """What an application did with one answer (action_name, the chunk id it names, its 1-based rank)."""

    action: str
    object_id: str | None
    position: int | None


@dataclass(frozen=True)
class LoggedAnswer:
    """One logged search for a question: the hits shown in rank order and the events, in arrival order."""

    query_id: str
    hit_ids: list[int]
    events: list[LoggedEventRef]
    model_version: str
    mode: str
    at: str


@dataclass(frozen=True)
class LoggedQuestion:
    """A distinct question, worded as it was last asked, with every logged answer oldest first."""

    key: str
    text: str
    split: str
    answers: list[LoggedAnswer] = field(default_factory=list)
    last_at: str = ""

    @property
    def has_events(self) -> bool:
        return any(answer.events for answer in self.answers)


@dataclass
class _Group:
    """A question while the scan collects it (rows newest first; text is the newest wording)."""

    text: str
    last_at: str
    rows: list[sqlite3.Row] = field(default_factory=list)


class RealQueryStore:
    """Reads logged questions with their answers and events, and keeps each question's side for good."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def questions(self, limit: int, judge_share: float) -> list[LoggedQuestion]:
        """The `limit` most recently asked questions, newest first, each with its side (assigned now if
        it has none). Queries, events and known sides are read in one snapshot, so they agree."""
        _share(judge_share)  # a bad share is refused even when no question needs a side
        if limit <= 0:
            return []
        with _snapshot(self.conn):
            groups = self._recent_groups(limit)
            events = self._events([row["query_id"] for group in groups.values() for row in group.rows])
            splits = self._known_splits(list(groups))
        missing = [key for key in groups if key not in splits]
        if missing:
            splits.update(self._assign(missing, judge_share))
        return [
            LoggedQuestion(
                key=key,
                text=group.text,
                split=splits[key],
                answers=[_answer(row, events.get(row["query_id"], [])) for row in reversed(group.rows)],
                last_at=group.last_at,
            )
            for key, group in groups.items()
        ]

    def split_counts(self) -> dict[str, int]:
        """Questions on each side so far (`status`)."""
        counts = dict.fromkeys(SPLITS, 0)
        for split, n in self.conn.execute("SELECT split, COUNT(*) FROM question_splits GROUP BY split"):
            counts[split] = int(n)
        return counts

    def judged_among(self, texts: Sequence[str]) -> set[str]:
        """Those of `texts` whose question is in the gate's part (however long ago it was asked): a
        round leaves them out of its training pairs."""
        keys: dict[str, list[str]] = {}
        for text in texts:
            keys.setdefault(question_key(text), []).append(text)
        found: set[str] = set()
        for part, marks in _in_parts(list(keys)):
            rows = self.conn.execute(
                f"SELECT question_key FROM question_splits WHERE split = ? AND question_key IN ({marks})",
                [JUDGE, *part],
            )
            for row in rows:
                found.update(keys[row[0]])
        return found

    def _recent_groups(self, limit: int) -> dict[str, _Group]:
        """One newest-first scan of the log, grouped by question; only the first `limit` questions met
        are kept, but each with all of its rows (older askings included)."""
        groups: dict[str, _Group] = {}
        keys_by_text: dict[str, str] = {}  # the same wording is hashed once
        rows = self.conn.execute(
            "SELECT query_id, user_query, mode, model_version, hit_ids, at FROM queries "
            "ORDER BY at DESC, rowid DESC"
        )
        for row in rows:
            text = row["user_query"]
            key = keys_by_text.get(text)
            if key is None:
                key = question_key(text) if normalise(text) else ""
                keys_by_text[text] = key
            if not key:
                continue
            group = groups.get(key)
            if group is None:
                if len(groups) >= limit:
                    continue
                group = groups[key] = _Group(text=text, last_at=row["at"])
            group.rows.append(row)
        return groups

    def _events(self, query_ids: list[str]) -> dict[str, list[LoggedEventRef]]:
        found: dict[str, list[LoggedEventRef]] = {}
        for part, marks in _in_parts(query_ids):
            rows = self.conn.execute(
                "SELECT query_id, action_name, object_id, position FROM query_events "
                f"WHERE query_id IN ({marks}) ORDER BY id",
                part,
            )
            for query_id, action, object_id, position in rows:
                found.setdefault(query_id, []).append(LoggedEventRef(action, object_id, position))
        return found

    def _known_splits(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for part, marks in _in_parts(keys):
            rows = self.conn.execute(
                f"SELECT question_key, split FROM question_splits WHERE question_key IN ({marks})", part
            )
            found.update({key: split for key, split in rows})
        return found

    def _assign(self, keys: list[str], judge_share: float) -> dict[str, str]:
        """Give new questions their side in one transaction; a side another process stored first wins,
        so what is returned is always what is stored."""
        chosen = [(key, split_for(key, judge_share), utcnow()) for key in keys]
        with _writing(self.conn):
            self.conn.executemany(
                "INSERT OR IGNORE INTO question_splits (question_key, split, at) VALUES (?, ?, ?)", chosen
            )
            stored = self._known_splits(keys)
        log.info(
            "question sides assigned",
            new=len(keys),
            judge=sum(1 for key in keys if stored[key] == JUDGE),
            judge_share=judge_share,
        )
        return stored


class JudgmentStore:
    """Graded (question key, passage key) pairs per judge, kept across rounds (like TeacherScoreStore)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def get_many(self, judge_id: str, keys: Sequence[JudgmentKey]) -> dict[JudgmentKey, float]:
        """The stored grades among `keys` (pairs not graded yet are absent from the result)."""
        found: dict[JudgmentKey, float] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            part = unique[start : start + _LOOKUP_CHUNK]
            rows = self.conn.execute(
                "SELECT question_key, passage_key, grade FROM judgments WHERE judge_id = ? AND "
                f"(question_key, passage_key) IN (VALUES {', '.join(['(?, ?)'] * len(part))})",
                [judge_id, *(k for key in part for k in key)],
            ).fetchall()
            found.update({(row[0], row[1]): float(row[2]) for row in rows})
        return found

    def put_many(self, judge_id: str, items: Iterable[tuple[JudgmentKey, float]]) -> int:
        """Store one batch in one transaction. Every grade is checked first: one outside 0..3 (or not a
        finite number) raises ValueError and stores none of the batch."""
        at = utcnow()
        rows = [(judge_id, q, p, _grade(grade), at) for (q, p), grade in items]
        with _writing(self.conn):
            self.conn.executemany(
                "INSERT OR REPLACE INTO judgments (judge_id, question_key, passage_key, grade, at) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def count(self, judge_id: str | None = None) -> int:
        if judge_id is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0])
        return int(
            self.conn.execute("SELECT COUNT(*) FROM judgments WHERE judge_id = ?", (judge_id,)).fetchone()[0]
        )


def _grade(grade: object) -> float:
    if isinstance(grade, bool) or not isinstance(grade, numbers.Real):
        raise ValueError(f"a grade is a number from 0 to {MAX_GRADE:g}, not {grade!r}")
    value = float(grade)
    if not math.isfinite(value) or not 0.0 <= value <= MAX_GRADE:
        raise ValueError(f"a grade is a number from 0 to {MAX_GRADE:g}, not {grade!r}")
    return value


def _answer(row: sqlite3.Row, events: list[LoggedEventRef]) -> LoggedAnswer:
    return LoggedAnswer(
        query_id=row["query_id"],
        hit_ids=[int(i) for i in json.loads(row["hit_ids"])],
        events=events,
        model_version=row["model_version"],
        mode=row["mode"],
        at=row["at"],
    )


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """A read transaction (one consistent view) unless the caller already holds one."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        yield
    finally:
        if own and conn.in_transaction:
            conn.execute("COMMIT")


@contextmanager
def _writing(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction, or the caller's own when it holds one (it commits or rolls back)."""
    if conn.in_transaction:
        yield
        return
    with transaction(conn):
        yield
