"""Relevance assessors: the LLM assessor against the real local test server (faults, malformed replies,
outages, bounds), and the teacher as a weak, rank-based assessor on the tiny model."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from stages.assessor import (
    GRADE_SCHEMA,
    Assessor,
    Grade,
    LlmAssessor,
    TeacherAssessor,
    parse_grade,
    rank_grades,
)
from stages.encoder import EncodeParams, Encoder
from stages.llm import BreakerState, CircuitBreaker, LlmClient, LlmConfig
from stages.teacher import BiEncoderTeacher, EnsembleTeacher, HybridTeacher
from tests.conftest import TIMEOUT_SCALE
from tests.llm_server import FakeLlm, overlap_grade

# --------------------------------------------------------------------- the test server learns to grade


def _client(server: FakeLlm, breaker: CircuitBreaker | None = None, **overrides) -> LlmClient:
    config = LlmConfig(
        url=server.url,
        model="grader",
        timeout_s=2.0,
        connect_timeout_s=1.0,
        max_retries=2,
        reask_invalid=1,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
        concurrency=4,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return LlmClient(config, breaker or CircuitBreaker(failures=100))


QUESTIONS = ["solar power grid", "river city history", "database server files", "music festival tickets"]
PASSAGE = "Solar power feeds the grid. The river city has a long history; its database server keeps files."
EXPECTED = [3.0, 3.0, 3.0, 0.0]


def _user_prompts(server: FakeLlm) -> list[str]:
    return [r["body"]["messages"][1]["content"] for r in server.requests]


# ------------------------------------------------------------------------------------------ grades


def test_parse_grade_is_strict():
    assert parse_grade({"grade": 2}) == 2
    assert parse_grade({"grade": "3"}) == 3 and parse_grade({"grade": " 0 "}) == 0
    for grade in (4, -1, 2.5, 2.0, True, "two", None):
        with pytest.raises(ValueError):
            parse_grade({"grade": grade})
    for bad in (2, [2], {"score": 2}, None):
        with pytest.raises(ValueError):
            parse_grade(bad)
    assert [int(g) for g in Grade] == [0, 1, 2, 3]


def test_grades_come_back_in_order_and_concurrently():
    pairs = [
        ("river city history", PASSAGE),  # 3
        ("river city history", "The river city."),  # 2
        ("music festival tickets", PASSAGE),  # 0
        ("river city history", "A river."),  # 1
        ("solar power grid", "Solar power."),  # 2
        ("database server files", "A file server."),  # 1
    ] * 2
    questions = [q for q, _ in pairs]
    passages = [p for _, p in pairs]
    with FakeLlm(latency=0.2) as server:
        assessor = LlmAssessor(_client(server), "grader", concurrency=4)
        grades = assessor.grade_pairs(questions, passages)
    assert grades == [float(overlap_grade(q, p)) for q, p in zip(questions, passages, strict=True)]
    assert set(grades) == {0.0, 1.0, 2.0, 3.0}
    assert assessor.judge_id == "llm:grader" and assessor.weak is False
    arrivals = sorted(r["time"] for r in server.requests)
    assert sum(t - arrivals[0] < 0.2 for t in arrivals) >= 2  # several in flight before the first answered
    body = server.requests[0]["body"]
    assert body["max_tokens"] == 32
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == GRADE_SCHEMA


def test_a_repeated_pair_is_asked_once_and_pools_keep_their_shape():
    with FakeLlm() as server:
        assessor = LlmAssessor(_client(server), "grader")
        pools = [[PASSAGE, "Music."], [], [PASSAGE, PASSAGE, "A river."]]
        graded = assessor.grade_pools(["music festival tickets", "anything", "river city history"], pools)
    assert graded == [[0.0, 1.0], [], [3.0, 3.0, 1.0]]
    assert len(server.requests) == 4  # five pairs, four distinct


def test_a_malformed_reply_is_reasked_then_used():
    for fault in ("nonjson", "empty", "length", "truncated"):
        with FakeLlm(script=[fault]) as server:
            grades = LlmAssessor(_client(server), "grader").grade_pairs(QUESTIONS[:1], [PASSAGE])
        assert grades == [3.0], fault
        assert len(server.requests) == 2
        reask = server.requests[1]["body"]["messages"]
        assert reask[-1]["role"] == "user" and "JSON" in reask[-1]["content"]


def test_always_malformed_gives_none_without_raising():
    with FakeLlm(weights={"nonjson": 1.0}) as server:
        grades = LlmAssessor(_client(server, reask_invalid=1), "grader").grade_pairs(QUESTIONS, [PASSAGE] * 4)
    assert grades == [None] * 4
    assert len(server.requests) == 8  # each pair asked, re-asked once, then given up (no early stop)


def test_a_rejected_pair_is_none_and_the_others_are_graded():
    # in `auto` mode a 400 first steps structured output down (json_object, then none): three refusals
    with FakeLlm(script=["ok", "400", "400", "400"]) as server:
        assessor = LlmAssessor(_client(server), "grader", concurrency=1)
        grades = assessor.grade_pairs(QUESTIONS, [PASSAGE] * 4)
        assert len(server.requests) == 6
    assert grades == [3.0, None, 3.0, 0.0]


def test_a_refusal_no_request_gets_past_stops_the_batch():
    with FakeLlm(script=["401"] * 10) as server:
        grades = LlmAssessor(_client(server), "grader", concurrency=1).grade_pairs(QUESTIONS, [PASSAGE] * 4)
    assert grades == [None] * 4
    assert len(server.requests) == 1


def test_rate_limited_then_answered():
    with FakeLlm(script=["429:0", "429:0", "ok"]) as server:
        grades = LlmAssessor(_client(server), "grader", concurrency=1).grade_pairs(QUESTIONS, [PASSAGE] * 4)
    assert grades == EXPECTED
    assert server.faults["429"] == 2


def test_server_errors_open_the_breaker_and_the_rest_stay_ungraded_promptly():
    breaker = CircuitBreaker(failures=3, reset_s=60)
    with FakeLlm() as server:
        server.down = True  # 503 to everything
        assessor = LlmAssessor(_client(server, breaker, max_retries=1), "grader", concurrency=4)
        started = time.monotonic()
        grades = assessor.grade_pairs(QUESTIONS * 10, [PASSAGE] * 40)
        elapsed = time.monotonic() - started
        sent = len(server.requests)
    assert grades == [None] * 40
    assert breaker.state is BreakerState.OPEN
    assert sent < 12  # the batch stopped: not 40 pairs x 2 attempts
    assert elapsed < 2.0 * TIMEOUT_SCALE  # a safety net; `sent` is what shows the early stop


def test_an_open_breaker_sends_nothing():
    breaker = CircuitBreaker(failures=1, reset_s=60)
    breaker.failure()
    with FakeLlm() as server:
        grades = LlmAssessor(_client(server, breaker), "grader").grade_pairs(QUESTIONS, [PASSAGE] * 4)
        assert grades == [None] * 4 and server.requests == []


def test_an_outage_then_recovery_grades_on_the_next_call():
    breaker = CircuitBreaker(failures=1, reset_s=0.2)
    with FakeLlm() as server:
        assessor = LlmAssessor(_client(server, breaker, max_retries=0), "grader", concurrency=1)
        server.down = True
        assert assessor.grade_pairs(QUESTIONS, [PASSAGE] * 4) == [None] * 4
        assert breaker.state is BreakerState.OPEN and len(server.requests) == 1
        server.down = False
        time.sleep(0.3)  # past reset_s: the next request is the probe
        assert assessor.grade_pairs(QUESTIONS, [PASSAGE] * 4) == EXPECTED
    assert breaker.state is BreakerState.CLOSED


def test_a_read_timeout_is_retried():
    with FakeLlm(script=["hang"]) as server:
        server.hang_seconds = 2.0
        client = _client(server, timeout_s=0.3, max_retries=1)
        grades = LlmAssessor(client, "grader", concurrency=1).grade_pairs(QUESTIONS[:2], [PASSAGE] * 2)
    assert grades == [3.0, 3.0]


def test_a_hanging_server_stops_the_batch_without_opening_the_breaker():
    breaker = CircuitBreaker(failures=2, reset_s=60)
    with FakeLlm(weights={"hang": 1.0}) as server:
        server.hang_seconds = 3.0
        client = _client(server, breaker, timeout_s=0.3, max_retries=0)
        started = time.monotonic()
        grades = LlmAssessor(client, "grader", concurrency=2).grade_pairs(QUESTIONS * 5, [PASSAGE] * 20)
        elapsed = time.monotonic() - started
        sent = len(server.requests)
    assert grades == [None] * 20
    assert sent <= 4 and elapsed < 1.0 * TIMEOUT_SCALE  # `sent` shows the stop
    assert breaker.state is BreakerState.CLOSED  # busy, not down


def test_the_prompt_is_bounded():
    head = "Solar energy. " + "x" * 1986
    passage = head + "PASSAGETAIL" + "y" * 1_000_000  # over 1 MB
    question = "solar " * 84 + "QUESTIONTAIL" + " power" * 10_000
    with FakeLlm() as server:
        assessor = LlmAssessor(_client(server), "grader")
        # 3, not 1: the server saw "solar" only; "questiontail" and "power" were cut off the question
        assert assessor.grade_pairs([question], [passage]) == [3.0]
        body = server.requests[0]["body"]
    prompt = body["messages"][1]["content"]
    assert head in prompt and "PASSAGETAIL" not in prompt
    assert ("solar " * 83).strip() in prompt and "QUESTIONTAIL" not in prompt
    assert len(json.dumps(body)) < 2000 + 500 + 3000  # the bounds plus the instructions


def test_a_smaller_bound_is_honoured():
    with FakeLlm() as server:
        assessor = LlmAssessor(_client(server), "grader", max_passage_chars=20, max_question_chars=10)
        assessor.grade_pairs(["river city history"], ["The river city has a long history."])
    prompt = _user_prompts(server)[0]
    assert prompt.endswith("PASSAGE:\nThe river city has a")
    assert "QUESTION:\nriver city\n" in prompt


# --------------------------------------------------------------------------------------- teacher


def test_rank_grades_by_rank_and_gap():
    # top 5.0; 4.9 lies within 5% of the range (5.0) below it: a near-tie; then ranks up to 3: 1
    assert rank_grades([5.0, 4.9, 3.0, 1.0, 0.5, 0.0]) == [2.0, 2.0, 1.0, 0.0, 0.0, 0.0]
    assert rank_grades([5.0, 4.0, 3.0, 1.0, 0.5, 0.0]) == [2.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # order does not matter, scale does not matter
    assert rank_grades([0.0, 3.0, 10.0, 9.8, 2.0]) == [0.0, 1.0, 2.0, 2.0, 0.0]
    assert rank_grades([0.0, 30.0, 100.0, 98.0, 20.0]) == [0.0, 1.0, 2.0, 2.0, 0.0]
    # no preference expressed: all 0
    assert rank_grades([1.5, 1.5, 1.5]) == [0.0, 0.0, 0.0]
    assert rank_grades([7.0]) == [0.0] and rank_grades([]) == []
    # a broken score is graded 0 and does not widen the range
    assert rank_grades([float("nan"), 2.0, 1.0, 0.0]) == [0.0, 2.0, 1.0, 1.0]
    assert max(rank_grades(np.random.default_rng(0).normal(size=50))) == 2.0  # never 3


CORPUS = [
    "A database server stores files in a folder.",
    "The river flows through the city and its history is long.",
    "Solar power and energy from the sun feed the grid.",
    "Music and history of the city.",
    "Neural network training data for machine learning.",
    "Water system of the city.",
    "The computer science of search queries and documents.",
    "河流 流过 城市 历史 很 长",
]


@pytest.fixture(scope="module")
def encoder(tiny_embedder):
    return Encoder(tiny_embedder, EncodeParams(device="cpu"))


@pytest.fixture(scope="module")
def hybrid(encoder):
    return HybridTeacher(CORPUS, encoder, bm25_weight=0.7)


def test_the_teacher_grades_by_rank_within_each_pool(hybrid):
    assessor: Assessor = TeacherAssessor(hybrid)
    assert assessor.weak is True and assessor.judge_id == f"teacher:{hybrid.teacher_id}"
    pools = [CORPUS[:7], CORPUS[1:4] + CORPUS[:1], []]
    graded = assessor.grade_pools(["database server files folder", "solar power energy", "x"], pools)
    first, second, empty = graded
    assert first[0] == 2.0 and first.count(2.0) == 1  # the passage that matches, and only it
    assert first.count(1.0) == 2 and first.count(0.0) == 4
    assert second[1] == 2.0 and second.count(2.0) == 1 and second.count(1.0) == 2
    assert empty == []
    # the same grades as the teacher's own ranking of the pool says
    scores = hybrid.score_pairs(["database server files folder"] * 7, CORPUS[:7])
    assert first == rank_grades(scores)


def test_a_copy_of_the_top_passage_is_a_tie(hybrid, encoder):
    """Two chunks with the same text (one document filed twice), and for a BM25-only teacher a copy
    that differs only in punctuation: the teacher cannot prefer either, so both get 2."""
    question = "database server files folder"
    pool = [CORPUS[3], CORPUS[0], CORPUS[1], CORPUS[0], CORPUS[4], CORPUS[5]]
    (grades,) = TeacherAssessor(hybrid).grade_pools([question], [pool])
    assert grades[1] == grades[3] == 2.0
    assert grades.count(2.0) == 2 and grades.count(1.0) == 1  # the copy takes rank 2: only rank 3 gets 1
    lexical = HybridTeacher(CORPUS, encoder, bm25_weight=1.0, corpus_vectors=hybrid.vectors)
    pool[1] = "A database server stores files in a folder!"  # not in the corpus: scored on its own
    (grades,) = TeacherAssessor(lexical).grade_pools([question], [pool])
    assert grades[1] == grades[3] == 2.0


def test_every_teacher_kind_names_its_judgments(encoder, hybrid):
    bi = BiEncoderTeacher(encoder)
    ensemble = EnsembleTeacher([(hybrid, 0.5), (bi, 0.5)])
    assert TeacherAssessor(bi).judge_id == f"teacher:{bi.teacher_id}"
    assert TeacherAssessor(ensemble).judge_id.startswith("teacher:ensemble:")
    (grades,) = TeacherAssessor(bi).grade_pools(["river city"], [CORPUS[:5]])
    assert grades == rank_grades(bi.score_pairs(["river city"] * 5, CORPUS[:5])) and max(grades) == 2.0

    class Unnamed:
        def score_pairs(self, queries, passages):
            return np.zeros(len(queries))

    with pytest.raises(ValueError, match="teacher_id"):
        TeacherAssessor(Unnamed())  # type: ignore[arg-type]
    assert TeacherAssessor(Unnamed(), name="zeros").judge_id == "teacher:zeros"  # type: ignore[arg-type]
