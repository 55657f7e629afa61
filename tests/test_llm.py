"""The LLM client against a real local HTTP server injecting faults."""

from __future__ import annotations

import pytest

from stages.llm import (
    BreakerOpen,
    BreakerState,
    CircuitBreaker,
    InvalidReply,
    LlmClient,
    LlmConfig,
    LlmRejected,
    LlmUnavailable,
    chat_completions_url,
    extract_json,
)
from tests.llm_server import FakeLlm

MESSAGES = [
    {"role": "user", "content": "TASK:questions\nWrite 2 questions.\n\nPASSAGE:\nSolar panels make power."}
]


def _client(server: FakeLlm, **overrides) -> LlmClient:
    config = LlmConfig(
        url=server.url,
        model="m",
        api_key="secret-key",
        timeout_s=1.0,
        connect_timeout_s=1.0,
        max_retries=3,
        reask_invalid=1,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return LlmClient(config, CircuitBreaker(failures=100))


def _questions(value):
    if not isinstance(value, dict) or not value.get("questions"):
        raise ValueError("no questions")
    return value["questions"]


def test_url_forms():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_extract_json_tolerates_fences_and_prose():
    assert extract_json('Here:\n```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('noise {"a": [1, 2]} trailing') == {"a": [1, 2]}
    with pytest.raises(ValueError):
        extract_json("no json here")


def test_happy_path_sends_model_and_bearer_key():
    with FakeLlm() as server:
        client = _client(server)
        assert len(client.ask_json(MESSAGES, _questions)) == 2
        request = server.requests[0]
        assert request["auth"] == "Bearer secret-key" and request["body"]["model"] == "m"


def _recording_client(server: FakeLlm, **overrides) -> tuple[LlmClient, list[float]]:
    """A client whose back-off waits are recorded instead of slept: assertions on the waits it chose,
    not on the wall clock."""
    waits: list[float] = []
    client = _client(server, **overrides)
    client.sleep = waits.append
    return client, waits


def test_retry_after_is_honoured():
    with FakeLlm(script=["429:7", "ok"]) as server:
        client, waits = _recording_client(server)
        client.ask_json(MESSAGES, _questions)
        assert waits == [7.0] and len(server.requests) == 2


def test_retry_after_is_capped():
    with FakeLlm(script=["429:3600", "ok"]) as server:
        client, waits = _recording_client(server, max_retry_after_s=0.2)
        client.ask_json(MESSAGES, _questions)
        assert waits == [0.2]


def test_without_retry_after_back_off_grows_with_jitter():
    with FakeLlm(script=["500", "500", "500", "ok"]) as server:
        client, waits = _recording_client(server, backoff_base_s=1.0, backoff_cap_s=60.0)
        client.ask_json(MESSAGES, _questions)
    assert len(waits) == 3
    for attempt, wait in enumerate(waits):
        assert 2**attempt / 2 <= wait <= 2**attempt  # half to full of base * 2^attempt


@pytest.mark.parametrize("fault", ["500", "html", "latency:1", "hang"])
def test_transient_faults_are_retried(fault):
    with FakeLlm(script=[fault, "ok"]) as server:
        server.hang_seconds = 3
        client = _client(server, timeout_s=0.5)
        assert client.ask_json(MESSAGES, _questions)
        assert len(server.requests) == 2


def test_client_errors_are_not_retried():
    for status in ("400", "401"):
        with FakeLlm(script=[status, "ok"]) as server:
            with pytest.raises(LlmRejected, match=f"{status}.*fake {status} error"):
                _client(server).chat(MESSAGES)
            assert len(server.requests) == 1


def test_gives_up_after_max_retries():
    with FakeLlm(script=["500"] * 10) as server:
        with pytest.raises(LlmUnavailable, match="HTTP 500"):
            _client(server, max_retries=2).chat(MESSAGES)
        assert len(server.requests) == 3


def test_connection_refused_is_unavailable():
    server = FakeLlm()
    url = server.url
    server.server.server_close()
    client = LlmClient(
        LlmConfig(url=url, model="m", max_retries=1, backoff_base_s=0.01, backoff_cap_s=0.02),
        CircuitBreaker(failures=100),
    )
    with pytest.raises(LlmUnavailable, match="connection"):
        client.chat(MESSAGES)


@pytest.mark.parametrize("fault", ["nonjson", "truncated", "empty"])
def test_malformed_replies_are_reasked_then_fail_with_raw(fault):
    with FakeLlm(script=[fault, "ok"]) as server:
        assert _client(server).ask_json(MESSAGES, _questions)
        assert len(server.requests) == 2
        assert server.requests[1]["body"]["messages"][-1]["role"] == "user"  # the re-ask
    with FakeLlm(script=[fault] * 5) as server:
        with pytest.raises(InvalidReply) as error:
            _client(server, reask_invalid=1).ask_json(MESSAGES, _questions)
        assert error.value.raw


def test_breaker_opens_blocks_and_closes_after_a_good_probe():
    clock = [0.0]
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=lambda: clock[0])
    with FakeLlm(script=["500", "500"]) as server:
        config = LlmConfig(url=server.url, model="m", max_retries=0)
        client = LlmClient(config, breaker)
        for _ in range(2):
            with pytest.raises(LlmUnavailable):
                client.chat(MESSAGES)
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(BreakerOpen):
            client.chat(MESSAGES)
        assert len(server.requests) == 2  # nothing sent while open
        clock[0] = 11
        assert breaker.state is BreakerState.HALF_OPEN
        assert client.chat(MESSAGES)
        assert breaker.state is BreakerState.CLOSED


def test_failed_probe_reopens_the_breaker():
    clock = [0.0]
    breaker = CircuitBreaker(failures=1, reset_s=5, clock=lambda: clock[0])
    breaker.failure()
    clock[0] = 6
    breaker.acquire()
    with pytest.raises(BreakerOpen):
        breaker.acquire()  # only one probe at a time
    breaker.failure()
    assert breaker.state is BreakerState.OPEN


# --- real servers: bounded replies, structured output, slow is not down ----------------------------------

PASSAGE = "Solar panels on the roof feed the city grid. Batteries store the energy for the night."


def test_every_request_carries_max_tokens_sized_to_what_it_asks():
    from stages.synthesize import ReplyBudget, synthesize_chunk

    budget = ReplyBudget(question_tokens=50, rewrite_tokens=30, score_tokens=5, overhead_tokens=20)
    with FakeLlm() as server:
        synthesize_chunk(_client(server), PASSAGE, "en", 3, 2, budget)
        sent = {
            r["body"]["messages"][-1]["content"].split("\n")[0]: r["body"]["max_tokens"]
            for r in server.requests
        }
    assert sent["TASK:questions"] == 20 + 3 * 50
    assert sent["TASK:rewrites"] == 20 + 3 * (50 + 2 * 30)
    assert sent["TASK:judge"] == 20 + 6 * 5  # 3 questions + 3 rewrites (the test server writes one each)


def test_a_rambling_model_is_stopped_by_max_tokens():
    """The model writes 4,000 words after its JSON unless max_tokens stops it (4 s, over the 1.5 s read
    timeout): with the cap every request answers at once and the JSON before the cut is used."""
    from stages.synthesize import synthesize_chunk

    with FakeLlm(ramble_tokens=4000, token_s=0.001) as server:
        client = _client(server, timeout_s=1.5, max_retries=1)
        candidates = synthesize_chunk(client, PASSAGE, "en", 2, 1)
        assert {c.kind for c in candidates} == {"question", "rewrite"}
        assert all(c.judge_score is not None for c in candidates)
        assert len(server.requests) == 3 and max(server.completion_tokens) <= 400
    assert client.breaker.state is BreakerState.CLOSED


def test_reply_cut_by_the_length_limit_is_malformed_not_an_outage():
    with FakeLlm(script=["length"] * 3) as server:
        client = _client(server, reask_invalid=2)
        with pytest.raises(InvalidReply, match="length limit") as error:
            client.ask_json(MESSAGES, _questions)
        assert error.value.raw and len(server.requests) == 3
        assert client.breaker.state is BreakerState.CLOSED
        assert client.concurrency.limit == client.config.concurrency


def test_structured_output_sends_the_schema():
    from stages.llm import JsonRequest
    from stages.prompts import SCHEMAS

    with FakeLlm() as server:
        _client(server).ask_json(MESSAGES, _questions, JsonRequest("questions", SCHEMAS["questions"], 100))
        fmt = server.requests[0]["body"]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == SCHEMAS["questions"]


@pytest.mark.parametrize(
    ("accepts", "refusal", "settles_on"),
    [((), 400, "off"), (("json_object",), 422, "json_object"), (("json_object",), 500, "json_object")],
)
def test_auto_structured_mode_falls_back_once_and_remembers(accepts, refusal, settles_on):
    """500 is how llama-cpp-python's server refuses json_schema (a validation error naming the field)."""
    from stages.llm import JsonRequest, StructuredMode
    from stages.prompts import SCHEMAS

    request = JsonRequest("questions", SCHEMAS["questions"], 100)
    with FakeLlm(accepts=accepts, refusal_status=refusal) as server:
        client = _client(server)
        assert client.ask_json(MESSAGES, _questions, request)
        assert client.structured is StructuredMode(settles_on)
        refused = len(server.requests) - 1
        assert refused == (2 if settles_on == "off" else 1)
        client.ask_json(MESSAGES, _questions, request)  # remembered: one request, accepted at once
        assert len(server.requests) == refused + 2
        last = server.requests[-1]["body"].get("response_format")
        assert (last or {}).get("type") == (None if settles_on == "off" else settles_on)
        assert client.breaker.state is BreakerState.CLOSED


def test_a_wrong_model_name_does_not_turn_structured_output_off():
    """A 404 for the model is not a refusal of response_format: the request fails with the server's
    reason and the client keeps json_schema for when the name is fixed."""
    from stages.llm import JsonRequest, StructuredMode
    from stages.prompts import SCHEMAS

    request = JsonRequest("questions", SCHEMAS["questions"], 100)
    with FakeLlm(models=("served-model",)) as server:
        client = _client(server)
        before = client.structured
        with pytest.raises(LlmRejected, match="does not exist"):
            client.ask_json(MESSAGES, _questions, request)
        assert client.structured is before is StructuredMode.JSON_SCHEMA
        assert client.breaker.state is BreakerState.CLOSED


def test_an_explicit_structured_mode_is_not_second_guessed():
    from stages.llm import JsonRequest, StructuredMode
    from stages.prompts import SCHEMAS

    with FakeLlm(accepts=()) as server:
        client = _client(server, structured=StructuredMode.JSON_SCHEMA)
        client.structured = StructuredMode.JSON_SCHEMA
        with pytest.raises(LlmRejected, match="response_format"):
            client.ask_json(MESSAGES, _questions, JsonRequest("questions", SCHEMAS["questions"], 100))
        assert len(server.requests) == 1


def test_a_one_slot_server_is_slow_not_down():
    """Eight requests at once into a server that serves one at a time (0.25 s each) with a 0.8 s read
    timeout: the queued ones time out. That must lower the requests in flight, not open the breaker."""
    import threading

    opened: list[BreakerState] = []
    breaker = CircuitBreaker(failures=3, reset_s=30)
    breaker.on_change = opened.append
    with FakeLlm(slots=1, latency=0.25) as server:
        config = LlmConfig(
            url=server.url,
            model="m",
            timeout_s=0.8,
            max_retries=8,
            concurrency=8,
            backoff_base_s=0.05,
            backoff_cap_s=0.2,
        )
        client = LlmClient(config, breaker)
        results: list[object] = []

        def worker() -> None:
            for _ in range(3):
                try:
                    results.append(client.ask_json(MESSAGES, _questions))
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    results.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) == 24 and not errors, errors[:3]
    assert BreakerState.OPEN not in opened
    snapshot = client.concurrency.snapshot()
    assert snapshot.limit < 8 and "timeout" in snapshot.reason


def test_adaptive_concurrency_halves_once_per_window_and_grows_back():
    from stages.llm_concurrency import AdaptiveConcurrency

    clock = [0.0]
    limiter = AdaptiveConcurrency(8, clock=lambda: clock[0])
    tokens = [limiter.acquire() for _ in range(8)]
    for _ in range(8):
        limiter.release()
    clock[0] = 1.0
    assert limiter.congestion(tokens[0], "a read timeout")
    assert not limiter.congestion(tokens[1], "a read timeout")  # in flight before the cut: no second cut
    assert limiter.limit == 4
    clock[0] = 2.0
    assert limiter.congestion(limiter.acquire(), "HTTP 429")
    limiter.release()
    assert limiter.limit == 2 and "HTTP 429" in limiter.snapshot().reason
    for _ in range(6):  # a window of successes per slot gained: 2 to reach 3, 4 more to reach 4
        limiter.success()
    assert limiter.limit == 4
    for _ in range(100):
        limiter.success()
    assert limiter.limit == 8 and limiter.snapshot().reason.startswith("configured maximum")


def test_a_judge_that_miscounts_is_asked_one_question_at_a_time():
    from stages.synthesize import synthesize_chunk

    with FakeLlm(script=["ok", "ok", "miscount", "miscount", "miscount"]) as server:
        candidates = synthesize_chunk(_client(server, reask_invalid=2), PASSAGE, "en", 2, 1)
        judge_requests = [r for r in server.requests if "TASK:judge" in r["body"]["messages"][1]["content"]]
    assert len(candidates) == 4 and all(c.judge_score is not None and c.reason is None for c in candidates)
    assert len(judge_requests) == 3 + 4  # the batch and its two re-asks, then one request per candidate
    schema = judge_requests[-1]["body"]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["scores"]["minItems"] == schema["properties"]["scores"]["maxItems"] == 1


def test_a_half_open_probe_that_times_out_or_is_rate_limited_never_wedges_the_breaker():
    """Busy signals do not count towards opening, but they must end a probe: a probe left out forever
    refuses every later call (found by the fault campaign: 111 jobs waiting on a breaker stuck half-open)."""
    clock = [0.0]
    breaker = CircuitBreaker(failures=1, reset_s=5, clock=lambda: clock[0])
    breaker.failure()
    clock[0] = 6
    breaker.acquire()  # the probe goes out ...
    breaker.busy()  # ... and times out
    assert breaker.state is BreakerState.OPEN
    clock[0] = 12
    breaker.acquire()  # a new probe after reset_s
    breaker.success()  # e.g. a 429: the server answered
    assert breaker.state is BreakerState.CLOSED
    breaker.busy()  # a timeout while closed counts for nothing
    assert breaker.state is BreakerState.CLOSED


def test_probe_through_the_client_after_an_outage_with_a_hanging_server():
    with FakeLlm(script=["500", "hang", "429:0", "ok"]) as server:
        server.hang_seconds = 2
        clock = [0.0]
        breaker = CircuitBreaker(failures=1, reset_s=5, clock=lambda: clock[0])
        client = LlmClient(LlmConfig(url=server.url, model="m", timeout_s=0.5, max_retries=0), breaker)
        with pytest.raises(LlmUnavailable):
            client.chat(MESSAGES)  # 500: opens
        clock[0] = 6
        with pytest.raises(LlmUnavailable, match="timeout"):
            client.chat(MESSAGES)  # the probe hangs
        clock[0] = 12
        with pytest.raises(LlmUnavailable, match="429"):
            client.chat(MESSAGES)  # a probe again, not BreakerOpen forever
        assert breaker.state is BreakerState.CLOSED
        assert client.chat(MESSAGES).text
