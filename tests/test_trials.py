"""Interleaved trials (daemon/trials.py, daemon/serve_trial.py, state/trials.py): a real server on
127.0.0.1 with the served tiny model and a candidate of other weights, the real query log, events posted
over HTTP, and the daemon's check deciding from them. Tests wait on the server's state, never on time."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from state.round_records import RoundStore
from tests.conftest import serves_a_version, wait_for
from tests.test_index import _add_document
from tests.test_serve import _serving
from tests.test_served import TEXTS, _state

QUESTIONS = [
    "what carves valleys",
    "how are islands made",
    "where do deserts form",
    "what grinds mountains",
    "why does the tide rise",
    "what cools into rock",
]
MORE = [
    "tides rise twice a day along the coast",
    "lava cools into black basalt rock",
    "sand dunes move with the desert wind",
    "rain clouds drop water on the windward side",
    "ice ages left moraines across the plains",
    "rivers deposit silt in wide deltas",
]


def _trial_state(make_settings, tmp_path, arms=None, **promotion):
    """A state with ten chunks, the base model serving, and a registered candidate of other weights with
    a running trial against the base model (at the BM25 shares `arms`, when given)."""
    from state.registry import ModelRegistry

    settings = make_settings(
        index={"enabled": False},
        promotion={"trial_share": 1.0, "trial_min_decided": 10, **promotion},
    )
    layout, db = _state(settings)
    _add_document(db.conn, "/inbox/more.md", MORE)
    registry = ModelRegistry(db.conn, layout)
    return settings, layout, db, registry, _open_trial(registry, tmp_path, arms)


def _open_trial(registry, tmp_path, arms=None):
    """A candidate of other weights registered, and its trial against the base model opened for a
    round the gate rejected for want of evidence."""
    from state.trials import TrialStore
    from tests.tiny_models import build_tiny_embedder

    candidate = registry.register(
        build_tiny_embedder(tmp_path / "candidate", seed=7), metrics={"trial": True}
    )
    trial, before = TrialStore(registry.conn).open(
        round_id=_rejected_round(registry.conn),
        model_id=candidate.id,
        path=str(candidate.path),
        replacing_id=None,
        variant="candidate",
        share=1.0,
        arms=arms,
    )
    assert before is None
    return trial


def _rejected_round(conn) -> int:
    """A finished round the gate rejected for want of evidence, as the round process records one."""
    from state.round_records import RoundOutcome, RoundStore

    records = RoundStore(conn)
    round_id = records.create("test", "base")
    records.finish(round_id, RoundOutcome.REJECTED, "gain inside the noise", None, [], cause="below_min_gain")
    return round_id


def _ask(url: str, rounds: int, client: str = "user") -> list[dict]:
    """Every question asked over HTTP, `rounds` times, each time by another user (the trial counts a
    question once per client); the answers' bodies."""
    answers = []
    for number in range(rounds):
        for question in QUESTIONS:
            body = httpx.post(
                f"{url}/v1/search",
                json={"query": question, "k": 4},
                headers={"X-Client-Id": f"{client}-{number}"},
            ).json()
            answers.append(body)
    return answers


def _ready(state) -> bool:
    """The server would interleave a search now (its candidate and, with the index on, its replica)."""
    loaded = state.current
    return loaded is not None and state.trial_for(loaded) is not None


def _later():
    """An hour from now: every question asked so far has settled (promotion.trial_event_window_s)."""
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(hours=1)


def _teams(layout, query_id: str) -> list[str]:
    from state.db import connect

    conn = connect(layout.database, readonly=True)
    try:
        row = conn.execute("SELECT teams, trial_id FROM queries WHERE query_id = ?", (query_id,)).fetchone()
    finally:
        conn.close()
    return json.loads(row["teams"]) if row["teams"] else []


def _cite(url: str, layout, answers: list[dict], favour: str) -> int:
    """Post `cited` for the first hit of each answer that `favour`'s model contributed."""
    cited = 0
    for body in answers:
        teams = _teams(layout, body["query_id"])
        if favour not in teams:
            continue
        position = teams.index(favour) + 1
        hit = body["hits"][position - 1]
        event = {"query_id": body["query_id"], "action_name": "cited", "object_id": str(hit["chunk_id"])}
        assert httpx.post(f"{url}/v1/events", json=event).status_code == 200
        cited += 1
    return cited


def test_searches_mix_both_models_and_the_log_credits_each_hit_to_its_model(make_settings, tmp_path):
    settings, layout, db, _registry, trial = _trial_state(make_settings, tmp_path)
    with _serving(settings) as (url, state):
        wait_for(lambda: _ready(state), message="the trial's candidate loaded")
        body = httpx.post(f"{url}/v1/search", json={"query": QUESTIONS[0], "k": 4}).json()
        lexical = httpx.post(
            f"{url}/v1/search", json={"query": QUESTIONS[0], "k": 4, "mode": "lexical"}
        ).json()
        metrics = httpx.get(f"{url}/metrics").text
    assert body["trial"] == {"id": trial.id, "candidate": trial.version, "arm": 0} and body["model"] == "base"
    hits = [hit["chunk_id"] for hit in body["hits"]]
    assert len(hits) == len(set(hits)) == 4
    teams = _teams(layout, body["query_id"])
    assert len(teams) == 4 and set(teams) <= {"served", "candidate"}
    assert abs(teams.count("served") - teams.count("candidate")) <= 2  # turns, as far as the lists allow
    # each model's hits come in that model's own order
    from daemon.search import search_many

    served = [h.chunk_id for h in search_many(settings, [QUESTIONS[0]], "base", 40)[0].hits]
    theirs = [h.chunk_id for h in search_many(settings, [QUESTIONS[0]], trial.version, 40)[0].hits]
    for team, ranking in (("served", served), ("candidate", theirs)):
        own = [hit for hit, t in zip(hits, teams, strict=True) if t == team]
        assert own == sorted(own, key=ranking.index)
    assert "trial" not in lexical and not _teams(layout, lexical["query_id"])  # BM25 alone: no contest
    assert "embedtune_serve_trial_searches_total 1.0" in metrics


def test_a_candidate_whose_hits_are_used_more_is_promoted_and_then_served(make_settings, tmp_path):
    from daemon.trials import check_trial
    from state.trials import TrialStore

    settings, layout, db, registry, trial = _trial_state(make_settings, tmp_path)
    with _serving(settings) as (url, state):
        wait_for(lambda: _ready(state), message="the trial's candidate loaded")
        answers = _ask(url, 1, "early")
        _cite(url, layout, answers, "candidate")
        early = check_trial(settings, layout, db.conn, now=_later())
        assert early.result == "running" and "fewer than 10 decided" in early.reason
        assert "fewer than 10 decided" in TrialStore(db.conn).get(trial.id).reason  # status shows it
        answers = _ask(url, 4)
        _cite(url, layout, answers, "candidate")
        done = check_trial(settings, layout, db.conn, now=_later())
        assert done.result == "gain", done.reason
        wait_for(lambda: httpx.get(f"{url}/health").json()["model"] == trial.version, message="v1 served")
        after = httpx.post(f"{url}/v1/search", json={"query": QUESTIONS[0], "k": 4}).json()
        wait_for(lambda: not _ready(state), message="the trial left the server")
    assert registry.current().id == trial.model_id
    ended = TrialStore(db.conn).get(trial.id)
    assert ended.result == "gain" and ended.ended is not None and "won, 0 lost" in ended.reason
    assert after["model"] == trial.version and "trial" not in after
    from state.round_records import RoundStore

    round_row = RoundStore(db.conn).get(trial.round_id)
    assert round_row["decision"] == "promoted" and round_row["model_id"] == trial.model_id
    assert round_row["reason"].startswith("gain inside the noise; then promoted by interleaved trial")
    assert check_trial(settings, layout, db.conn, now=_later()) is None  # nothing runs any more


def _cite_by_arm(url: str, answers: list[dict], layout, favour: dict[int, str | None]) -> None:
    """Cite, in each answer, the first hit of the team `favour` names for the answer's arm (None: none)."""
    for arm, team in favour.items():
        if team is not None:
            _cite(url, layout, [a for a in answers if a["trial"]["arm"] == arm], team)


def test_a_trial_with_two_shares_takes_out_the_arm_that_lost_and_promotes_the_one_that_won(
    make_settings, tmp_path
):
    """A candidate tried at two BM25 shares: each question tries one; the arm whose hits lost is taken
    out (and serve stops mixing it), the other goes on and wins, and its share is served with the model.
    alpha 0.4 is split between the arms (evidence 5 each), so a few dozen questions decide."""
    from daemon.trials import check_trial
    from stages.fusion import RETRIEVAL_FILE, model_bm25_weight
    from state.db import connect
    from state.trials import TrialStore

    settings, layout, db, registry, trial = _trial_state(
        make_settings, tmp_path, arms=[0.3, 0.05], trial_alpha=0.4
    )
    assert trial.arm_shares == [0.3, 0.05] and trial.active_arms == [0, 1]
    with _serving(settings) as (url, state):
        wait_for(lambda: _ready(state), message="the trial's candidate loaded")
        answers = _ask(url, 12)
        assert {a["trial"]["arm"] for a in answers} == {0, 1}
        conn = connect(layout.database, readonly=True)
        logged = dict(conn.execute("SELECT query_id, trial_arm FROM queries WHERE trial_id = ?", (trial.id,)))
        conn.close()
        assert all(logged[a["query_id"]] == a["trial"]["arm"] for a in answers)
        _cite_by_arm(url, answers, layout, {0: "served", 1: None})
        first = check_trial(settings, layout, db.conn, now=_later())
        assert first.result == "running", first.reason
        running = TrialStore(db.conn).get(trial.id)
        assert running.arms_out == (0,) and running.active_arms == [1] and "arm 0 lost" in running.reason
        wait_for(lambda: state._trial.record.arms_out == (0,), message="serve read the arm's end")
        answers = _ask(url, 3, "later")
        assert {a["trial"]["arm"] for a in answers} == {1}
        _cite_by_arm(url, answers, layout, {1: "candidate"})
        done = check_trial(settings, layout, db.conn, now=_later())
        wait_for(lambda: httpx.get(f"{url}/health").json()["model"] == trial.version, message="v1 served")
    assert done.result == "gain" and "at BM25 share 0.05 (arm 1)" in done.reason, done.reason
    assert registry.current().id == trial.model_id
    assert model_bm25_weight(Path(trial.path)) == 0.05
    written = json.loads((Path(trial.path) / RETRIEVAL_FILE).read_text())
    assert written["chosen_on"] == f"interleaved trial {trial.id}, arm 1"


def test_a_trial_loses_when_every_arm_lost(make_settings, tmp_path):
    from daemon.trials import check_trial

    settings, layout, db, registry, trial = _trial_state(
        make_settings, tmp_path, arms=[0.3, 0.05], trial_alpha=0.4
    )
    with _serving(settings) as (url, state):
        wait_for(lambda: _ready(state), message="the trial's candidate loaded")
        answers = _ask(url, 12)
        _cite_by_arm(url, answers, layout, {0: "served", 1: "served"})
    done = check_trial(settings, layout, db.conn, now=_later())
    assert done.result == "loss" and "arm 0" in done.reason and "arm 1" in done.reason, done.reason
    assert registry.current() is None and not Path(trial.path).exists()


def test_a_round_names_two_shares_only_where_the_events_chose_one_and_the_index_serves_each_models_own(
    make_settings, tmp_path
):
    from daemon.trials import trial_arms
    from stages.fusion import RETRIEVAL_FILE
    from stages.round_steps import events_trial_shares

    assert events_trial_shares(0.3, ["0.05", "0.1", "0.3"]) == [0.3, 0.05]
    assert events_trial_shares(0.3, ["0.3", "0.5"]) == [0.3]  # nothing lower is alike: one arm
    assert events_trial_shares(0.3, []) == [0.3]
    folder = tmp_path / "candidate"
    folder.mkdir()
    (folder / RETRIEVAL_FILE).write_text(json.dumps({"bm25_weight": 0.3, "trial_shares": [0.3, 0.05]}))
    assert trial_arms(make_settings(index={"bm25_weight": "auto"}), folder) == [0.3, 0.05]
    assert trial_arms(make_settings(index={"bm25_weight": 0.2}), folder) == []  # one share serves all
    (folder / RETRIEVAL_FILE).write_text(json.dumps({"bm25_weight": 0.3, "trial_shares": [0.3, "x"]}))
    assert trial_arms(make_settings(index={"bm25_weight": "auto"}), folder) == []


def test_a_candidate_whose_hits_are_passed_over_is_dropped_with_its_version(make_settings, tmp_path):
    from daemon.trials import check_trial
    from state.registry import RegistryError
    from state.trials import TrialStore

    settings, layout, db, registry, trial = _trial_state(make_settings, tmp_path)
    with _serving(settings) as (url, state):
        wait_for(lambda: _ready(state), message="the trial's candidate loaded")
        answers = _ask(url, 4)
        _cite(url, layout, answers, "served")
        done = check_trial(settings, layout, db.conn, now=_later())
        wait_for(lambda: not _ready(state), message="the trial left the server")
        plain = httpx.post(f"{url}/v1/search", json={"query": QUESTIONS[0], "k": 4}).json()
    assert done.result == "loss", done.reason
    assert registry.current() is None  # the base model still serves
    with pytest.raises(RegistryError):
        registry.get(trial.model_id)
    assert not (layout.versions / str(trial.model_id)).exists()
    assert TrialStore(db.conn).get(trial.id).result == "loss"
    assert "trial" not in plain and not _teams(layout, plain["query_id"])


def test_a_trial_ends_when_another_model_serves(make_settings, tmp_path):
    from daemon.trials import check_trial
    from tests.tiny_models import build_tiny_embedder

    settings, layout, db, registry, trial = _trial_state(make_settings, tmp_path)
    registry.promote(registry.register(build_tiny_embedder(tmp_path / "other", seed=3)).id)
    ended = check_trial(settings, layout, db.conn, now=_later())
    assert ended.result == "serving_changed" and "changed to v2" in ended.reason
    assert not (layout.versions / str(trial.model_id)).exists()


def test_a_trial_ends_undecided_when_its_questions_run_out(make_settings, tmp_path):
    from daemon.trials import check_trial

    settings, layout, db, _registry, _trial = _trial_state(make_settings, tmp_path, trial_max_questions=3)
    with _serving(settings) as (url, state):
        wait_for(lambda: _ready(state), message="the trial's candidate loaded")
        _ask(url, 1)  # six questions, no events
    spent = check_trial(settings, layout, db.conn, now=_later())
    assert spent.result == "expired" and "0 won, 0 lost, 6 tied" in spent.reason


def test_only_an_undecided_round_with_events_in_the_log_opens_a_trial_and_only_a_stale_one_is_replaced(
    make_settings, tmp_path
):
    from daemon.trials import open_trial, trial_refusal
    from state.query_log import LoggedEvent, LoggedQuery, QueryLog
    from state.registry import RegistryError
    from state.trials import TrialStore
    from tests.tiny_models import build_tiny_embedder

    assert trial_refusal("below_min_gain", (-0.01, 0.02), "candidate") == ""
    assert trial_refusal("asked_gain_not_convincing", None, "merged_0.5") == ""
    assert "below zero" in trial_refusal("below_min_gain", (-0.03, -0.001), "candidate")
    assert "guard_veto" in trial_refusal("guard_veto", (0.0, 0.02), "candidate")
    assert "no variant" in trial_refusal("below_min_gain", (-0.01, 0.01), "current")

    settings = make_settings(index={"enabled": False}, promotion={"trial_min_decided": 3})
    layout, db = _state(settings)
    from state.registry import ModelRegistry

    registry = ModelRegistry(db.conn, layout)
    folder = build_tiny_embedder(tmp_path / "cand", seed=5)
    assert open_trial(settings, db.conn, registry, None, "candidate", folder, None) is None  # no events yet
    assert registry.history() == [] and not list(layout.versions.glob("*"))
    log = QueryLog(db.conn)
    for number in range(3):
        log.record_queries(
            [LoggedQuery(f"q{number}", f"question {number}", "", "http", "hybrid", "base", "x", [1])]
        )
        assert log.record_event(LoggedEvent(f"q{number}", "click", "1", 1, "")) == ""
    rounds = [_rejected_round(db.conn) for _ in range(3)]
    first = open_trial(settings, db.conn, registry, rounds[0], "candidate", folder, None)
    assert first is not None and first.share == settings.promotion.trial_share == 0.2
    # a newer round's candidate against the same model waits: a trial replaced by every round never ends
    assert open_trial(settings, db.conn, registry, rounds[1], "merged_0.5", folder, None) is None
    store = TrialStore(db.conn)
    assert store.running().id == first.id and registry.never_served() == [first.model_id]
    # another model serves now (a promotion): the old trial compared against a model gone from service
    served = registry.promote(registry.register(build_tiny_embedder(tmp_path / "v", seed=6)).id)
    third = open_trial(settings, db.conn, registry, rounds[2], "candidate", folder, served.id)
    assert store.running().id == third.id and store.get(first.id).result == "superseded"
    with pytest.raises(RegistryError):
        registry.get(first.model_id)  # the superseded candidate's version is gone
    assert registry.get(third.model_id).path.is_dir()


def test_status_says_how_the_trial_stands(make_settings, tmp_path):
    from state.status import format_status, read_status

    settings, layout, db, _registry, trial = _trial_state(make_settings, tmp_path)
    text = format_status(read_status(layout))
    assert (
        f"trial     #{trial.id} (round {trial.round_id}) {trial.version} against base on 100% of searches"
        in text
    )
    assert "no events tallied yet" in text


def test_a_candidate_that_cannot_load_leaves_searches_as_they_were(make_settings, tmp_path):
    import shutil

    settings, layout, db, _registry, trial = _trial_state(make_settings, tmp_path)
    shutil.rmtree(trial.path)
    with _serving(settings) as (url, state):
        wait_for(lambda: state.trial_problem, message="the load failure noted")
        body = httpx.post(f"{url}/v1/search", json={"query": QUESTIONS[0], "k": 4}).json()
    assert "trial" not in body and len(body["hits"]) == 4
    assert f"trial {trial.id}'s candidate" in state.trial_problem


def test_with_milvus_lite_the_candidate_answers_from_its_own_replica_of_the_live_collection(
    make_settings, tmp_path
):
    """No request opens Milvus for the candidate either: it gets a memory replica of the live
    collection's chunks with its own vectors, which follows new chunks like the served one."""
    from daemon.indexing import IndexService
    from state.registry import ModelRegistry

    settings = make_settings(
        index={"enabled": True, "lock_timeout_s": 10.0},
        promotion={"trial_share": 1.0},
    )
    layout, db = _state(settings)
    assert IndexService(settings, layout).sync(db.conn).swapped
    trial = _open_trial(ModelRegistry(db.conn, layout), tmp_path)
    with _serving(settings) as (url, state):
        wait_for(lambda: _ready(state), message="the candidate's replica built")
        body = httpx.post(f"{url}/v1/search", json={"query": QUESTIONS[0], "k": 4}, timeout=120).json()
        served_replica, candidate_replica = state.current.replica, state._trial.candidate.replica
        assert candidate_replica.size == served_replica.size == len(TEXTS)
        new = _add_document(db.conn, "/inbox/more.md", MORE)
        wait_for(
            lambda: state._trial.candidate.replica.size == len(TEXTS) + len(new),
            timeout=90,
            message="the candidate's replica followed the new chunks",
        )
    live = db.conn.execute("SELECT name FROM index_collections WHERE state = 'live'").fetchone()[0]
    assert body["trial"]["id"] == trial.id and body["source"] == f"memory replica of {live}"
    assert candidate_replica.name == live and len(_teams(layout, body["query_id"])) == len(body["hits"]) == 4


def test_at_start_a_version_a_kill_left_unserved_is_removed_and_the_trials_candidate_kept(
    make_settings, tmp_path
):
    from daemon.trials import sweep_unserved_versions
    from tests.tiny_models import build_tiny_embedder

    settings, layout, db, registry, trial = _trial_state(make_settings, tmp_path)
    # a round killed after registering its variant and before promoting it
    orphan = registry.register(build_tiny_embedder(tmp_path / "orphan", seed=9))
    assert sweep_unserved_versions(db.conn, layout) == [orphan.id]
    assert not orphan.path.exists() and registry.never_served() == [trial.model_id]
    assert Path(trial.path).is_dir()


def _log_trial_answer(
    conn,
    trial_id: int,
    query_id: str,
    text: str,
    teams: list[str],
    client: str = "app",
    arm: int | None = None,
):
    from state.query_log import LoggedQuery, QueryLog

    hits = list(range(100, 100 + len(teams)))
    QueryLog(conn).record_queries(
        [LoggedQuery(query_id, text, client, "http", "hybrid", "base", "x", hits, trial_id, teams, arm)]
    )
    return hits


def test_each_arm_has_its_own_question_cap_and_a_stale_gain_writes_no_share(make_settings, tmp_path):
    from daemon.trials import _promote, check_trial
    from stages.fusion import model_bm25_weight
    from state.trials import SUPERSEDED, TrialStore

    settings, layout, db, registry, trial = _trial_state(
        make_settings, tmp_path, arms=[0.3, 0.05], trial_max_questions=3
    )
    teams = ["served", "candidate"]
    for number in range(4):
        _log_trial_answer(db.conn, trial.id, f"a{number}", QUESTIONS[number], teams, arm=0)
    for number in range(2):
        _log_trial_answer(db.conn, trial.id, f"b{number}", QUESTIONS[number], teams, "other", arm=1)
    running = check_trial(settings, layout, db.conn, now=_later())
    assert (
        running.result == "running"
        and "4 interleaved" in running.reason
        and "2 interleaved" in running.reason
    )
    _log_trial_answer(db.conn, trial.id, "b2", QUESTIONS[2], teams, "other", arm=1)
    spent = check_trial(settings, layout, db.conn, now=_later())
    assert spent.result == "expired", spent.reason

    store = TrialStore(db.conn)
    store.conn.execute("DELETE FROM trials")  # the same candidate again (test set-up only)
    again, _ = store.open(
        round_id=trial.round_id,
        model_id=registry.register(Path(settings.model.base)).id,
        path=str(registry.register(Path(settings.model.base)).path),
        replacing_id=None,
        variant="candidate",
        share=1.0,
        arms=[0.3, 0.05],
    )
    assert store.end(again.id, SUPERSEDED, "superseded by round 9's candidate")
    stale = _promote(settings, layout, registry, store, again, "40 won, 10 lost", arm=1)
    assert stale.result == SUPERSEDED and registry.current() is None
    assert model_bm25_weight(Path(again.path)) is None  # its share was not written


def test_the_share_a_search_is_asked_with_changes_how_it_fuses(make_settings, tmp_path):
    """An arm's share reaches the fusion: BM25 alone and dense alone rank the same chunks differently."""
    from daemon.search import search_many

    settings, _layout, _db, _registry, _trial = _trial_state(make_settings, tmp_path)
    rankings = {
        share: [
            [hit.chunk_id for hit in a.hits]
            for a in search_many(settings, QUESTIONS, k=4, mode="hybrid", bm25_weight=share)
        ]
        for share in (0.0, 1.0)
    }
    assert rankings[0.0] != rankings[1.0]


def test_the_tally_reads_events_by_chunk_or_position_settled_and_once_per_client_and_question(
    make_settings, tmp_path
):
    from datetime import UTC, datetime, timedelta

    from state.query_log import LoggedEvent, QueryLog
    from state.trials import TrialStore

    settings, layout, db, _registry, trial = _trial_state(make_settings, tmp_path)
    log = QueryLog(db.conn)
    teams = ["served", "candidate", "served", "candidate"]
    hits = _log_trial_answer(db.conn, trial.id, "a", "what carves valleys", teams)
    assert log.record_event(LoggedEvent("a", "cited", str(hits[1]), None, "app")) == ""  # by chunk id
    _log_trial_answer(db.conn, trial.id, "b", "how are islands made", teams)
    assert log.record_event(LoggedEvent("b", "click", None, 3, "app")) == ""  # by position: served's
    _log_trial_answer(db.conn, trial.id, "c", "What carves valleys?", teams)  # the same client asks again
    _log_trial_answer(db.conn, trial.id, "d", "what carves valleys", teams, client="other-user")
    assert log.record_event(LoggedEvent("d", "opened", None, 2, "other-user")) == ""  # not a label
    store = TrialStore(db.conn)
    later = datetime.now(UTC) + timedelta(hours=1)
    settled = store.settled_answers(trial.id, later, 900)
    assert [a.answer.query_id for a in settled] == ["a", "b", "d"]  # "c" is "a" asked again by its client
    from stages.interleaving import outcome, used_positions
    from stages.real_queries import used_chunks

    results = [outcome(a.teams, used_positions(a.answer.hit_ids, used_chunks(a.answer))) for a in settled]
    assert results == [1, -1, 0]
    # not yet settled: nothing counts; an event later than the window after its question: not counted
    assert store.settled_answers(trial.id, datetime.now(UTC), 900) == []
    assert all(
        not a.answer.events for a in store.settled_answers(trial.id, later + timedelta(hours=1), -7200)
    )


def test_a_trial_ends_on_its_days_or_a_missing_candidate_and_a_stale_gain_promotes_nothing(
    make_settings, tmp_path
):
    import shutil
    from datetime import UTC, datetime, timedelta

    from daemon.trials import _promote, check_trial
    from state.trials import SUPERSEDED, TrialStore

    settings, layout, db, registry, trial = _trial_state(make_settings, tmp_path)
    store = TrialStore(db.conn)
    # read as running by the check, then superseded by a round before the promotion is written
    assert store.end(trial.id, SUPERSEDED, "superseded by round 9's candidate")
    stale = _promote(settings, layout, registry, store, trial, "40 won, 10 lost")
    assert stale.result == SUPERSEDED and registry.current() is None and not serves_a_version(layout)
    assert RoundStore(db.conn).get(trial.round_id)["decision"] == "rejected"

    store.conn.execute("DELETE FROM trials")  # a fresh trial on the same candidate (test set-up only)
    again, _ = store.open(
        round_id=trial.round_id,
        model_id=trial.model_id,
        path=trial.path,
        replacing_id=None,
        variant="candidate",
        share=1.0,
    )
    weeks = datetime.now(UTC) + timedelta(days=15)
    expired = check_trial(settings, layout, db.conn, now=weeks)
    assert expired.result == "expired" and "no difference found in 15.0 days" in expired.reason

    store.conn.execute("DELETE FROM trials")
    candidate = registry.register(Path(settings.model.base))
    gone, _ = store.open(
        round_id=None,
        model_id=candidate.id,
        path=str(candidate.path),
        replacing_id=None,
        variant="x",
        share=1.0,
    )
    shutil.rmtree(candidate.path)
    stopped = check_trial(settings, layout, db.conn, now=_later())
    assert stopped.result == "stopped" and "is gone" in stopped.reason and store.running() is None


def test_a_database_from_before_trials_is_migrated_and_its_log_kept(tmp_path):
    from state.db import SCHEMA_VERSION, connect, migrate
    from state.query_log import LoggedQuery, QueryLog

    conn = connect(tmp_path / "embedtune.db")
    migrate(conn, target=16)
    QueryLog(conn).record_queries(
        [LoggedQuery("old", "what carves valleys", "", "http", "hybrid", "base", "c", [1])]
    )
    migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    row = conn.execute("SELECT trial_id, teams FROM queries WHERE query_id = 'old'").fetchone()
    assert tuple(row) == (None, None)
    [exported] = list(QueryLog(conn).export())
    assert exported["trial_id"] is None and exported["teams"] is None
    assert conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 0


def test_a_trial_running_before_arms_reads_as_one_arm_and_its_questions_as_that_arms(tmp_path):
    from datetime import UTC, datetime, timedelta

    from state.db import connect, migrate
    from state.trials import TrialStore

    conn = connect(tmp_path / "embedtune.db")
    migrate(conn, target=17)
    conn.execute(
        "INSERT INTO trials (round_id, model_id, path, replacing_id, variant, share, started) "
        "VALUES (NULL, 4, '/x', NULL, 'candidate', 0.2, '2026-12-01T00:00:00+00:00')"
    )
    conn.execute(
        "INSERT INTO queries (query_id, user_query, client_id, source, mode, model_version, collection, "
        "hit_ids, at, trial_id, teams) VALUES ('q', 'what carves valleys', 'app', 'http', 'hybrid', 'base', "
        "'c', '[1, 2]', '2026-12-01T00:00:00+00:00', 1, '[\"served\", \"candidate\"]')"
    )
    migrate(conn)
    store = TrialStore(conn)
    trial = store.running()
    assert trial.arms == () and trial.arm_shares == [None] and trial.active_arms == [0]
    [answer] = store.settled_answers(trial.id, datetime.now(UTC) + timedelta(days=30), 900)
    assert answer.arm == 0 and answer.teams == ["served", "candidate"]


def test_an_operator_stops_a_trial_and_serve_follows(make_settings, tmp_path, capsys):
    from state.trials import TrialStore
    from tests.test_served import _cli

    settings, layout, db, registry, trial = _trial_state(make_settings, tmp_path)
    with _serving(settings) as (url, state):
        wait_for(lambda: _ready(state), message="the trial's candidate loaded")
        code, out, err = _cli(capsys, settings, tmp_path, "trial", "stop")
        assert code == 0 and f"trial {trial.id} stopped" in out, err
        wait_for(lambda: not _ready(state), message="the trial left the server")
        body = httpx.post(f"{url}/v1/search", json={"query": QUESTIONS[0], "k": 4}).json()
    assert "trial" not in body and TrialStore(db.conn).get(trial.id).result == "stopped"
    assert registry.never_served() == []
    code, _out, err = _cli(capsys, settings, tmp_path, "trial", "stop")
    assert code == 1 and "no trial is running" in err
