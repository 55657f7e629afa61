"""Issue 37: logged questions grouped and split for good into train/judge, and stored judgments.
Real SQLite files through state.db.Database, queries and events written by the real QueryLog."""

from __future__ import annotations

import math
import random
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from state.db import Database, connect
from state.query_log import LoggedEvent, LoggedQuery, QueryLog
from state.real_queries import (
    JUDGE,
    TRAIN,
    JudgmentStore,
    LoggedEventRef,
    RealQueryStore,
    normalise,
    question_key,
    split_for,
)


def _db(tmp_path) -> Database:
    return Database(tmp_path / "state" / "embedtune.db")


def _ask(log: QueryLog, query_id: str, text: str, minute: int, hits: list[int] | None = None) -> None:
    """Log one answered search, dated `minute` minutes after a fixed start (so order is explicit)."""
    log.record_queries(
        [
            LoggedQuery(
                query_id=query_id,
                user_query=text,
                client_id="app-1",
                source="http",
                mode="hybrid",
                model_version=f"v{minute}",
                collection="embedtune_chunks_v1_1",
                hit_ids=hits if hits is not None else [1, 2, 3],
            )
        ]
    )
    at = (datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=minute)).isoformat(timespec="milliseconds")
    log.conn.execute("UPDATE queries SET at = ? WHERE query_id = ?", (at, query_id))


def _click(log: QueryLog, query_id: str, object_id: str, position: int, action: str = "click") -> None:
    assert log.record_event(LoggedEvent(query_id, action, object_id, position, "app-1")) == ""


def test_question_key_is_32_hex_and_shared_by_rewordings():
    key = question_key("What is a river?")
    assert len(key) == 32 and int(key, 16) >= 0
    for wording in ("  what   IS a\tRIVER?\n", "ＷＨＡＴ is a river?", "what is a river?"):
        assert question_key(wording) == key
    assert question_key("Straße") == question_key("STRASSE")  # casefold, not lower()
    assert question_key("what is a lake?") != key


@pytest.mark.parametrize(
    ("asked", "reworded"),
    [
        ("How do I reset my password?", "how do i reset my password"),
        ("How do I reset my password?!", "  how do I reset my password . "),
        ("What's a river's delta?", "what s a river s delta"),
        ("如何重置密码？", "如何重置密码"),  # full-width question mark
        ("「如何」重置密码。", "如何 重置密码"),  # CJK brackets and full stop
        ("price: $100 + 5%", "price 100 5"),  # symbols too, not only punctuation
    ],
)
def test_rewordings_that_differ_only_in_punctuation_or_symbols_share_a_key(asked, reworded):
    assert normalise(asked) == normalise(reworded)
    assert question_key(asked) == question_key(reworded)


def test_punctuation_keeps_words_apart_and_words_still_count():
    assert normalise("e-mail/phone") == "e mail phone"  # a mark between words leaves a space
    assert question_key("reset my password?") != question_key("reset my passwords?")


def test_punctuated_rewordings_land_on_one_side_and_a_punctuation_only_query_is_no_question(tmp_path):
    db = _db(tmp_path)
    log = QueryLog(db.conn)
    _ask(log, "en1", "How do I reset my password?", 1)
    _ask(log, "en2", "how do i reset my password", 2)
    _ask(log, "zh1", "如何重置密码？", 3)
    _ask(log, "zh2", "如何重置密码", 4)
    _ask(log, "marks", " ?!… 。？ ", 5)
    store = RealQueryStore(db.conn)
    questions = store.questions(10, judge_share=0.5)
    assert [q.text for q in questions] == ["如何重置密码", "how do i reset my password"]
    assert [[a.query_id for a in q.answers] for q in questions] == [["zh1", "zh2"], ["en1", "en2"]]
    assert sum(store.split_counts().values()) == 2  # one side each, none for the marks


def test_rewordings_of_one_question_are_one_question_with_every_answer(tmp_path):
    db = _db(tmp_path)
    log = QueryLog(db.conn)
    _ask(log, "q1", "What is a river?", 1, hits=[5, 6])
    _ask(log, "q2", "  what   IS a RIVER? ", 2, hits=[7])
    _ask(log, "q3", "ＷＨＡＴ is a river?", 3, hits=[9, 8, 7])
    _ask(log, "q4", "What is a lake?", 4)
    questions = RealQueryStore(db.conn).questions(10, judge_share=0.5)
    assert [q.text for q in questions] == ["What is a lake?", "ＷＨＡＴ is a river?"]
    river = questions[1]
    assert river.key == question_key("what is a river?")
    assert [a.query_id for a in river.answers] == ["q1", "q2", "q3"]  # oldest first
    assert [a.hit_ids for a in river.answers] == [[5, 6], [7], [9, 8, 7]]  # rank order kept
    assert [a.model_version for a in river.answers] == ["v1", "v2", "v3"]
    assert river.answers[0].mode == "hybrid"
    assert river.last_at == river.answers[-1].at > river.answers[0].at
    assert questions[0].last_at > river.last_at


def test_the_limit_keeps_the_most_recently_asked_questions_with_their_older_askings(tmp_path):
    db = _db(tmp_path)
    log = QueryLog(db.conn)
    for minute, text in enumerate(["alpha", "beta", "gamma", "delta", "epsilon"]):
        _ask(log, f"q-{text}", text, minute)
    _ask(log, "q-alpha-again", "ALPHA", 10)  # asked again last: now the most recent question
    _ask(log, "q-blank", "  \t \u3000 ", 11)  # nothing asked (NFKC turns the ideographic space into one)
    store = RealQueryStore(db.conn)
    questions = store.questions(3, judge_share=0.5)
    assert [q.text for q in questions] == ["ALPHA", "epsilon", "delta"]
    assert [a.query_id for a in questions[0].answers] == ["q-alpha", "q-alpha-again"]
    assert len(store.questions(100, judge_share=0.5)) == 5  # the blank query is no question
    assert store.questions(0, judge_share=0.5) == []
    assert sum(store.split_counts().values()) == 5  # sides only for the questions read


def test_events_are_attached_to_the_answer_they_name_in_arrival_order(tmp_path):
    db = _db(tmp_path)
    log = QueryLog(db.conn)
    _ask(log, "first", "how do  tides work?", 1, hits=[11, 12, 13])
    _ask(log, "second", "How do tides work?", 2, hits=[21, 22])
    _ask(log, "other", "why is the sky blue", 3, hits=[31])
    _click(log, "second", "22", 2)
    _click(log, "first", "13", 3)
    _click(log, "second", "21", 1, action="cited")
    questions = {q.text: q for q in RealQueryStore(db.conn).questions(10, judge_share=0.0)}
    tides = questions["How do tides work?"]
    first, second = tides.answers
    assert first.events == [LoggedEventRef("click", "13", 3)]
    assert second.events == [LoggedEventRef("click", "22", 2), LoggedEventRef("cited", "21", 1)]
    assert tides.has_events
    assert questions["why is the sky blue"].answers[0].events == []
    assert not questions["why is the sky blue"].has_events


def test_a_side_once_given_never_changes_whatever_the_share_becomes(tmp_path):
    db = _db(tmp_path)
    log = QueryLog(db.conn)
    for i in range(40):
        _ask(log, f"q{i}", f"question number {i}", i)
    store = RealQueryStore(db.conn)
    first = {q.key: q.split for q in store.questions(100, judge_share=0.0)}
    assert set(first.values()) == {TRAIN}
    assert {q.key: q.split for q in store.questions(100, judge_share=1.0)} == first  # nothing moved
    _ask(log, "late", "a question asked later", 100)
    after = {q.key: q.split for q in store.questions(100, judge_share=1.0)}
    assert after[question_key("a question asked later")] == JUDGE  # only the new one follows the share
    assert {k: v for k, v in after.items() if k in first} == first
    assert store.split_counts() == {TRAIN: 40, JUDGE: 1}
    # a second process reading the same state sees the same sides
    other = RealQueryStore(connect(db.path))
    assert {q.key: q.split for q in other.questions(100, judge_share=0.5)} == after


def test_about_the_judge_share_of_questions_go_to_judge():
    rng = random.Random(37)
    keys = [question_key(f"question {rng.random()}") for _ in range(20_000)]
    for share in (0.1, 0.25, 0.5):
        judged = sum(split_for(key, share) == JUDGE for key in keys) / len(keys)
        assert abs(judged - share) < 0.02, (share, judged)
    assert all(split_for(key, 0.0) == TRAIN for key in keys[:500])
    assert all(split_for(key, 1.0) == JUDGE for key in keys[:500])
    assert [split_for(k, 0.3) for k in keys[:200]] == [split_for(k, 0.3) for k in keys[:200]]
    for bad in (-0.1, 1.5, math.nan, True):
        with pytest.raises(ValueError):
            split_for(keys[0], bad)


def test_a_question_asked_again_after_the_log_was_pruned_keeps_its_side(tmp_path):
    db = _db(tmp_path)
    log = QueryLog(db.conn)
    log.record_queries([LoggedQuery("old", "Where do eels spawn?", "", "http", "dense", "v1", "c", [4])])
    store = RealQueryStore(db.conn)
    [question] = store.questions(10, judge_share=1.0)
    assert question.split == JUDGE
    old_at = (datetime.now(UTC) - timedelta(days=40)).isoformat(timespec="milliseconds")
    db.conn.execute("UPDATE queries SET at = ? WHERE query_id = 'old'", (old_at,))
    assert log.prune(30) == 1
    assert store.questions(10, judge_share=1.0) == []  # the log forgot the question...
    assert store.split_counts() == {TRAIN: 0, JUDGE: 1}  # ...its side did not
    log.record_queries([LoggedQuery("new", "where do  EELS spawn?", "", "http", "dense", "v2", "c", [4])])
    [again] = store.questions(10, judge_share=0.0)  # a share that would now say "train"
    assert again.key == question.key and again.split == JUDGE
    assert [a.query_id for a in again.answers] == ["new"]


def test_the_log_is_read_in_one_snapshot(tmp_path):
    """A writer that commits while the questions are being read (between the queries and the events
    statements) is not seen: answers and events come from one view of the log."""
    db = _db(tmp_path)
    log = QueryLog(db.conn)
    _ask(log, "q1", "what feeds a glacier", 1)
    _click(log, "q1", "1", 1)
    writer = QueryLog(connect(db.path))
    wrote: list[bool] = []

    def write_between(statement: str) -> None:
        if "FROM query_events" in statement and not wrote:
            wrote.append(True)
            _click(writer, "q1", "2", 2)  # another connection commits mid-read

    db.conn.set_trace_callback(write_between)
    try:
        [question] = RealQueryStore(db.conn).questions(10, judge_share=0.0)
    finally:
        db.conn.set_trace_callback(None)
    assert wrote == [True]
    assert question.answers[0].events == [LoggedEventRef("click", "1", 1)]
    assert not db.conn.in_transaction  # the read transaction was closed
    [later] = RealQueryStore(db.conn).questions(10, judge_share=0.0)
    assert later.answers[0].events == [LoggedEventRef("click", "1", 1), LoggedEventRef("click", "2", 2)]


def test_judgments_round_trip_are_reused_and_kept_per_judge(tmp_path):
    db = _db(tmp_path)
    store = JudgmentStore(db.conn)
    judge = "llm:tiny"
    q = question_key("what is a river?")
    pairs = [((q, f"p{i}"), float(i % 4)) for i in range(1000)]  # more than one lookup chunk
    assert store.put_many(judge, pairs) == 1000
    assert store.get_many(judge, [key for key, _ in pairs]) == dict(pairs)
    # the next round asks again with new pairs mixed in: only the graded ones come back
    asked = [(q, "p5"), (q, "new"), (q, "p5")]
    assert store.get_many(judge, asked) == {(q, "p5"): 1.0}
    assert store.get_many("teacher:other", asked) == {}
    store.put_many(judge, [((q, "p5"), 2.5)])  # a judge's later grade replaces its earlier one
    assert store.get_many(judge, [(q, "p5")]) == {(q, "p5"): 2.5}
    store.put_many("teacher:other", [((q, "p5"), 0)])
    assert store.count(judge) == 1000 and store.count("teacher:other") == 1 and store.count() == 1001
    # stored for good: another connection (a later process) reads the same grades
    assert JudgmentStore(connect(db.path)).get_many(judge, [(q, "p3")]) == {(q, "p3"): 3.0}


def test_judgments_join_a_transaction_the_caller_already_holds(tmp_path):
    db = _db(tmp_path)
    store = JudgmentStore(db.conn)
    db.conn.execute("BEGIN IMMEDIATE")
    store.put_many("llm:tiny", [(("q", "a"), 1.0)])
    assert db.conn.in_transaction  # the caller's transaction: it commits or rolls back
    db.conn.execute("ROLLBACK")
    assert store.count() == 0


@pytest.mark.parametrize("bad", [3.5, -0.5, math.nan, math.inf, True, "2", None])
def test_a_bad_grade_is_refused_and_nothing_of_its_batch_is_stored(tmp_path, bad):
    db = _db(tmp_path)
    store = JudgmentStore(db.conn)
    with pytest.raises(ValueError, match="grade"):
        store.put_many("llm:tiny", [(("q", "a"), 1.0), (("q", "b"), bad), (("q", "c"), 2.0)])
    assert store.count() == 0
    assert not db.conn.in_transaction


def test_the_schema_refuses_a_side_that_is_neither_train_nor_judge(tmp_path):
    db = _db(tmp_path)
    with pytest.raises(sqlite3.IntegrityError):
        db.conn.execute("INSERT INTO question_splits VALUES ('k', 'heldout', 'now')")


def test_training_queries_that_are_gate_questions_are_found_however_long_ago_they_were_asked(tmp_path):
    """A round leaves out a synthetic pair whose query is a judged question, also one outside the
    window of recent questions it reads."""
    from state.db import Database
    from state.real_queries import JUDGE, TRAIN, RealQueryStore, question_key

    conn = Database(tmp_path / "embedtune.db").conn
    judged, trained = "Where is the backup kept?", "how do I restore"
    conn.executemany(
        "INSERT INTO question_splits (question_key, split, at) VALUES (?, ?, 't')",
        [(question_key(judged), JUDGE), (question_key(trained), TRAIN)],
    )
    store = RealQueryStore(conn)
    found = store.judged_among(["where is the backup kept", judged, trained, "never asked"])
    assert found == {"where is the backup kept", judged}
