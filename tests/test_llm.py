"""The LLM client against a real local HTTP server injecting faults."""

from __future__ import annotations

import time

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

MESSAGES = [{"role": "user", "content": "TASK:questions\nWrite 2 questions.\n\nPASSAGE:\nSolar panels make power."}]


def _client(server: FakeLlm, **overrides) -> LlmClient:
    config = LlmConfig(url=server.url, model="m", api_key="secret-key", timeout_s=1.0, connect_timeout_s=1.0,
                       max_retries=3, reask_invalid=1, backoff_base_s=0.01, backoff_cap_s=0.05)
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


def test_retry_after_is_honoured():
    with FakeLlm(script=["429:1", "ok"]) as server:
        client = _client(server)
        started = time.monotonic()
        client.ask_json(MESSAGES, _questions)
        gap = server.requests[1]["time"] - server.requests[0]["time"]
        assert gap >= 0.95, gap
        assert time.monotonic() - started < 5


def test_retry_after_is_capped():
    with FakeLlm(script=["429:3600", "ok"]) as server:
        client = _client(server, max_retry_after_s=0.2)
        started = time.monotonic()
        client.ask_json(MESSAGES, _questions)
        assert time.monotonic() - started < 2


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
    client = LlmClient(LlmConfig(url=url, model="m", max_retries=1, backoff_base_s=0.01, backoff_cap_s=0.02),
                       CircuitBreaker(failures=100))
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
