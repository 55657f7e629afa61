"""Issue 36: the query and event log (User Behavior Insights shape) the gate on real questions reads.
Real SQLite, the real CLI in this process, the tiny real embedder, a real daemon for retention."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from state.db import Database, migrate
from state.layout import StateLayout
from state.query_log import LoggedEvent, LoggedQuery, QueryLog
from tests.conftest import wait_for
from tests.test_served import _cli, _state


def _log(tmp_path) -> QueryLog:
    return QueryLog(Database(tmp_path / "state" / "embedtune.db").conn)


def _query(query_id: str, hits: list[int] | None = None, source: str = "http") -> LoggedQuery:
    return LoggedQuery(
        query_id=query_id,
        user_query=f"what about {query_id}",
        client_id="app-1",
        source=source,
        mode="hybrid",
        model_version="v2",
        collection="embedtune_chunks_v2_1",
        hit_ids=hits if hits is not None else [7, 3, 9],
    )


def _event(query_id: str, **fields) -> LoggedEvent:
    values = {
        "query_id": query_id,
        "action_name": "click",
        "object_id": "3",
        "position": 2,
        "client_id": "app-1",
        "attributes": {"object": {"object_id": "3"}, "position": {"ordinal": 2}},
    }
    values.update(fields)
    return LoggedEvent(**values)


def _age(log: QueryLog, query_id: str, days: float) -> None:
    """Back-date a logged query, as if it had been logged `days` ago."""
    at = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="milliseconds")
    log.conn.execute("UPDATE queries SET at = ? WHERE query_id = ?", (at, query_id))


def test_a_query_is_logged_exactly_once_per_request(tmp_path):
    log = _log(tmp_path)
    log.record_queries([_query("a"), _query("b", hits=[])])
    log.record_queries([_query("a", hits=[1])])  # the same request written again (a retry)
    assert log.counts() == {"queries": 2, "events": 0, "queries_with_events": 0}
    rows = {r["query_id"]: r for r in log.conn.execute("SELECT * FROM queries")}
    assert json.loads(rows["a"]["hit_ids"]) == [7, 3, 9]  # the first write stands, in rank order
    assert json.loads(rows["b"]["hit_ids"]) == []
    assert rows["a"]["source"] == "http" and rows["a"]["model_version"] == "v2"
    assert datetime.fromisoformat(rows["a"]["at"]).tzinfo is not None  # UTC, as state.db.utcnow writes
    # one transaction per request: a malformed entry writes none of its batch
    with pytest.raises(ValueError, match="source"):
        log.record_queries([_query("c"), _query("d", source="web")])
    with pytest.raises(ValueError, match="hit_ids"):
        log.record_queries([_query("e", hits=["7"])])
    assert log.counts()["queries"] == 2


def test_events_are_refused_for_unknown_queries_and_bad_fields(tmp_path):
    log = _log(tmp_path)
    log.record_queries([_query("known")])
    assert "unknown query_id" in log.record_event(_event("nope"))
    refused = [
        (_event(""), "query_id is missing"),
        (_event("known", action_name=" "), "action_name"),
        (_event("known", position=0), "1-based"),
        (_event("known", object_id=["3"]), "object_id"),
        (_event("known", attributes={"when": datetime.now(UTC)}), "not JSON"),
        (_event("known", attributes=["not", "an", "object"]), "a JSON object"),
    ]
    for event, reason in refused:
        assert reason in log.record_event(event)
    assert log.counts()["events"] == 0  # nothing refused was stored
    assert log.record_event(_event("known")) == ""
    assert log.record_event(_event("known", action_name="cited", object_id=9, position=None)) == ""
    assert log.counts() == {"queries": 1, "events": 2, "queries_with_events": 1}
    stored = log.conn.execute("SELECT object_id, position FROM query_events ORDER BY id").fetchall()
    assert [tuple(r) for r in stored] == [("3", 2), ("9", None)]  # a numeric chunk id names the same chunk


def test_retention_removes_old_queries_with_their_events(tmp_path):
    log = _log(tmp_path)
    log.record_queries([_query("old"), _query("new")])
    assert log.record_event(_event("old")) == "" and log.record_event(_event("new")) == ""
    _age(log, "old", 100)
    assert log.prune(0) == 0  # 0 keeps everything for ever
    assert log.prune(90) == 1
    assert log.counts() == {"queries": 1, "events": 1, "queries_with_events": 1}
    assert [e["query_id"] for e in log.export()] == ["new"]
    assert "unknown query_id" in log.record_event(_event("old"))  # pruned: its events are refused too


def test_the_daemon_prunes_the_log_at_start(make_settings, start_daemon):
    settings = make_settings(index={"enabled": False}, query_log={"retention_days": 30})
    layout = StateLayout(settings.paths.state_dir).ensure()
    log = QueryLog(Database(layout.database).conn)
    log.record_queries([_query("stale"), _query("fresh")])
    assert log.record_event(_event("stale")) == ""
    _age(log, "stale", 31)
    running = start_daemon(settings)
    wait_for(lambda: running.scalar("SELECT COUNT(*) FROM queries") == 1, message="the stale query pruned")
    assert running.scalar("SELECT query_id FROM queries") == "fresh"
    assert running.scalar("SELECT COUNT(*) FROM query_events") == 0
    job = running.daemon.scheduler.get_job("query-log-prune")
    assert job is not None and job.trigger.interval == timedelta(days=1)


def test_export_writes_one_line_per_query_with_its_events(make_settings, tmp_path, capsys):
    settings = make_settings(index={"enabled": False})
    layout = StateLayout(settings.paths.state_dir).ensure()
    log = QueryLog(Database(layout.database).conn)
    log.record_queries([_query("first"), _query("second", hits=[4])])
    assert log.record_event(_event("second", object_id="4", position=1)) == ""
    assert log.record_event(_event("second", action_name="cited", object_id="4", position=1)) == ""
    output = tmp_path / "out" / "queries.jsonl"
    code, out, err = _cli(
        capsys, settings, tmp_path, "export", "--format", "queries", "--output", str(output)
    )
    assert code == 0, err
    assert "wrote 2 queries record(s)" in out
    lines = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [line["query_id"] for line in lines] == ["first", "second"]  # the order they were logged
    assert set(lines[0]) == {
        "query_id",
        "user_query",
        "client_id",
        "source",
        "mode",
        "model_version",
        "collection",
        "hit_ids",
        "at",
        "trial_id",
        "teams",
        "trial_arm",
        "split",
        "events",
    }
    assert lines[0]["hit_ids"] == [7, 3, 9] and lines[0]["events"] == []
    assert [line["split"] for line in lines] == [None, None]  # no round has read the log yet
    events = lines[1]["events"]
    assert [e["action_name"] for e in events] == ["click", "cited"]
    assert events[0]["object_id"] == "4" and events[0]["position"] == 1
    assert events[0]["attributes"] == {"object": {"object_id": "3"}, "position": {"ordinal": 2}}
    assert {"id", "client_id", "at"} <= set(events[0])
    assert not output.with_name(output.name + ".tmp").exists()


def _asked(query_id: str, text: str) -> LoggedQuery:
    return LoggedQuery(query_id, text, "app-1", "http", "hybrid", "v2", "embedtune_chunks_v2_1", [7, 3])


def test_export_says_which_part_each_querys_question_is_in(tmp_path):
    from state.real_queries import JUDGE, TRAIN, RealQueryStore

    log = _log(tmp_path)
    log.record_queries([_asked("a", "How do I reset my password?"), _asked("b", "where are the logs kept")])
    RealQueryStore(log.conn).questions(10, judge_share=0.0)  # a round reads them: both go to train
    log.record_queries([_asked("c", "What rotates the keys")])
    RealQueryStore(log.conn).questions(10, judge_share=1.0)  # only the new question follows this share
    log.record_queries(
        [
            _asked("d", "how do i reset my password"),  # a rewording: its question's part, read or not
            _asked("e", "is the backup encrypted"),  # asked after the last round read the log
            _asked("f", " ?！ "),  # only punctuation: no question, no part
        ]
    )
    exported = {entry["query_id"]: entry["split"] for entry in log.export()}
    assert exported == {"a": TRAIN, "b": TRAIN, "c": JUDGE, "d": TRAIN, "e": None, "f": None}
    assert not log.conn.in_transaction  # the snapshot was closed


def test_export_from_a_database_from_before_the_splits_says_null(tmp_path):
    from state.db import connect

    path = tmp_path / "state" / "embedtune.db"
    path.parent.mkdir(parents=True)
    conn = connect(path)
    migrate(conn, target=14)  # the query log, not yet question_splits
    log = QueryLog(conn)
    log.record_queries([_asked("a", "where are the logs kept")])
    assert [(entry["query_id"], entry["split"]) for entry in log.export()] == [("a", None)]


def test_search_logs_one_row_per_query_marked_cli(make_settings, tmp_path, capsys):
    settings = make_settings(index={"enabled": False})
    layout, db = _state(settings)
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        "\n".join(
            json.dumps(row)
            for row in (
                {"id": "r", "query": "what carves valleys"},
                {"id": "bad", "query": "??"},  # answered with an error: nothing shown, nothing logged
                {"id": "v", "query": "volcanoes and islands"},
            )
        )
        + "\n",
        encoding="utf-8",
    )
    code, out, err = _cli(
        capsys, settings, tmp_path, "search", "--queries", str(queries), "--json", "-k", "3"
    )
    assert code == 0, err
    answers = {a["id"]: a for a in map(json.loads, out.splitlines())}
    assert all(len(a["query_id"]) == 32 for a in answers.values())
    assert len({a["query_id"] for a in answers.values()}) == 3  # a fresh id per answer
    rows = {r["query_id"]: dict(r) for r in db.conn.execute("SELECT * FROM queries")}
    assert set(rows) == {answers["r"]["query_id"], answers["v"]["query_id"]}
    for key in ("r", "v"):
        answer, row = answers[key], rows[answers[key]["query_id"]]
        assert row["source"] == "cli" and row["client_id"] == ""
        assert row["user_query"] == answer["query"] and row["mode"] == answer["mode"] == "hybrid"
        assert row["model_version"] == answer["model"]
        assert json.loads(row["hit_ids"]) == [hit["chunk_id"] for hit in answer["hits"]]
        assert answer["hits"] and row["collection"] == answer["source"]  # exact search: its own words
    # a single question is one more row
    code, _out, err = _cli(capsys, settings, tmp_path, "search", "glaciers grind mountains")
    assert code == 0, err
    assert QueryLog(db.conn).counts()["queries"] == 3
    # answered from a collection, the row names the collection
    from daemon.query_logging import answered_from
    from daemon.search import SearchAnswer

    assert answered_from(SearchAnswer("v1", "hybrid", "collection embedtune_chunks_v1_2", "")) == (
        "embedtune_chunks_v1_2"
    )


def test_the_off_switch_logs_nothing(make_settings, tmp_path, capsys):
    settings = make_settings(index={"enabled": False}, query_log={"enabled": False})
    _layout, db = _state(settings)
    code, out, err = _cli(capsys, settings, tmp_path, "search", "--json", "what carves valleys")
    assert code == 0, err
    assert json.loads(out)["query_id"]  # the answer still names itself
    assert QueryLog(db.conn).counts() == {"queries": 0, "events": 0, "queries_with_events": 0}


def test_a_failure_to_log_never_reaches_the_search(make_settings, tmp_path, capsys):
    from daemon.logs import configure_logging
    from daemon.query_logging import log_answers
    from daemon.search import SearchAnswer
    from state.vector_store import Hit

    settings = make_settings()
    layout = StateLayout(settings.paths.state_dir)
    layout.database.mkdir(parents=True)  # a database path SQLite cannot open
    answer = SearchAnswer("base", "dense", "exact search over 1 chunks", "", [Hit(1, 0.5, "a.md", "t")])
    answer.query = "the payroll of the finance team"
    answer.query_id = "x" * 32
    configure_logging("warning", "json")  # onto this test's captured stderr
    log_answers(settings, [answer], "cli")  # logs a warning, raises nothing
    warning = capsys.readouterr().err
    assert "query_log_write_failed" in warning and "unable to open database" in warning
    assert "payroll" not in warning  # the query text stays out of the process log


def test_status_counts_queries_and_events(make_settings, tmp_path, capsys):
    settings = make_settings(index={"enabled": False})
    layout = StateLayout(settings.paths.state_dir).ensure()
    log = QueryLog(Database(layout.database).conn)
    log.record_queries([_query("a"), _query("b"), _query("c")])
    for event in (_event("a"), _event("a", action_name="cited"), _event("b")):
        assert log.record_event(event) == ""
    code, out, err = _cli(capsys, settings, tmp_path, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["query_log"] == {
        "queries": 3,
        "events": 3,
        "queries_with_events": 2,
        "enabled": True,
        "questions": {"train": 0, "judge": 0},  # splits are given when a round first reads a question
        "judgments": 0,
    }
    code, out, err = _cli(capsys, settings, tmp_path, "status")
    assert code == 0, err
    assert "queries   logged=3 events=3 (on 2 queries)" in out


def test_status_reads_a_database_from_before_the_log(tmp_path):
    from state.db import connect
    from state.status import format_status, read_status

    layout = StateLayout(tmp_path / "state").ensure()
    conn = connect(layout.database)
    migrate(conn, target=13)
    conn.close()
    status = read_status(layout)
    assert status["query_log"] == {"queries": 0, "events": 0, "queries_with_events": 0}
    assert status["daemon"]["activity"]  # the rest of the report was still filled
    assert "logged=0" in format_status(status)
