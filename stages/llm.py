"""OpenAI-compatible chat client for flaky endpoints: retries with back-off and jitter, Retry-After,
a circuit breaker, and bounded re-asking when a reply is not the JSON we asked for.

The API key is sent as a bearer token and never logged.
"""

from __future__ import annotations

import email.utils
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import httpx
import structlog

from stages.llm_concurrency import AdaptiveConcurrency

T = TypeVar("T")
log = structlog.get_logger("embedtune.llm")
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class LlmError(Exception):
    """Root of the client's errors."""


class LlmUnavailable(LlmError):
    """The endpoint did not answer usefully after the retries (timeouts, 5xx, 429, connection errors)."""


class LlmRejected(LlmError):
    """The endpoint refused the request (400/401/403/404/422): retrying cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"LLM endpoint answered {status}: {message}")
        self.status = status


class FormatRefused(LlmRejected):
    """The server refused the `response_format` field. Some answer 400 or 422; llama-cpp-python's server
    answers 500 with a validation error naming the field, so the message decides, not only the status."""


class InvalidReply(LlmError):
    """The reply was not the JSON asked for, even after re-asking; `raw` keeps it for inspection."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


class BreakerOpen(LlmError):
    def __init__(self, retry_in: float) -> None:
        super().__init__(f"LLM circuit breaker open; next probe in {retry_in:.0f}s")
        self.retry_in = retry_in


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Opens after `failures` consecutive failed calls; after `reset_s` lets one probe through."""

    def __init__(self, failures: int = 5, reset_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.threshold = failures
        self.reset_s = reset_s
        self.clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._state = BreakerState.CLOSED
        self._probe_out = False
        self._lock = threading.Lock()
        self.on_change: Callable[[BreakerState], None] | None = None

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.reset_s:
                return BreakerState.HALF_OPEN
            return self._state

    def acquire(self) -> None:
        """Raise BreakerOpen unless a call may go out now."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return
            elapsed = self.clock() - self._opened_at
            if self._state is BreakerState.OPEN and elapsed < self.reset_s:
                raise BreakerOpen(self.reset_s - elapsed)
            if self._probe_out:
                raise BreakerOpen(max(1.0, self.reset_s / 4))
            self._state = BreakerState.HALF_OPEN
            self._probe_out = True
        self._notify(BreakerState.HALF_OPEN)

    def success(self) -> None:
        with self._lock:
            changed = self._state is not BreakerState.CLOSED
            self._failures = 0
            self._state = BreakerState.CLOSED
            self._probe_out = False
        if changed:
            self._notify(BreakerState.CLOSED)

    def busy(self) -> None:
        """A read timeout: the server may be busy, which is no failure towards opening. But a half-open
        probe that timed out proves nothing either: re-open, so another probe follows after reset_s
        (without this the probe stays out forever and every call is refused)."""
        with self._lock:
            reopening = self._state is BreakerState.HALF_OPEN
            if reopening:
                self._state = BreakerState.OPEN
                self._opened_at = self.clock()
                self._probe_out = False
        if reopening:
            self._notify(BreakerState.OPEN)

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            opening = self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.threshold
            )
            if opening:
                self._state = BreakerState.OPEN
                self._opened_at = self.clock()
                self._probe_out = False
        if opening:
            self._notify(BreakerState.OPEN)

    def _notify(self, state: BreakerState) -> None:
        if self.on_change is not None:
            self.on_change(state)


def chat_completions_url(url: str) -> str:
    """Accept a base url, a /v1 url, or the full /v1/chat/completions url."""
    base = url.strip().rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, `Retry-After` seconds or an HTTP date."""
    if "retry-after-ms" in headers:
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def extract_json(text: str) -> Any:
    """Parse the first JSON value in a reply, tolerating code fences and prose around it."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
    raise ValueError("no JSON value in the reply")


class StructuredMode(StrEnum):
    """How a reply's JSON shape is asked for: `response_format` with the schema, plain JSON mode, or only
    in the prompt (the tolerant parser then does the work)."""

    AUTO = "auto"
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    OFF = "off"


# What `auto` tries, strongest first; a server that refuses one with a 4xx gets the next, remembered.
FALLBACK = {
    StructuredMode.JSON_SCHEMA: StructuredMode.JSON_OBJECT,
    StructuredMode.JSON_OBJECT: StructuredMode.OFF,
}


def response_format(mode: StructuredMode, name: str, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `response_format` body field for a mode (OpenAI, vLLM, llama.cpp and Ollama spell it alike)."""
    if mode is StructuredMode.JSON_SCHEMA and schema is not None:
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    if mode in (StructuredMode.JSON_SCHEMA, StructuredMode.JSON_OBJECT):
        # llama.cpp and llama-cpp-python constrain JSON mode to a schema given here; others ignore it.
        return {"type": "json_object", "schema": schema} if schema is not None else {"type": "json_object"}
    return None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None = None

    @property
    def cut_by_length(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class JsonRequest:
    """What a JSON question needs besides its messages: a name and schema for structured output, and a
    reply budget in tokens (`max_tokens`) sized to what the prompt asks for."""

    name: str
    schema: dict[str, Any] | None = None
    max_tokens: int | None = None


@dataclass
class LlmConfig:
    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    max_retries: int = 5
    max_retry_after_s: float = 120.0
    reask_invalid: int = 2
    concurrency: int = 8
    temperature: float = 0.7
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    structured: StructuredMode = StructuredMode.AUTO


class LlmClient:
    """Sends chat requests. Two different signals come back from a struggling server and get different
    answers: *down* (connection refused, 5xx) feeds the circuit breaker, which pauses synthesis; *busy*
    (read timeout while queued, 429) halves the requests in flight (`AdaptiveConcurrency`) and never opens
    the breaker: a one-slot server is slow, not down."""

    def __init__(
        self,
        config: LlmConfig,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.endpoint = chat_completions_url(config.url)
        self.breaker = breaker or CircuitBreaker()
        self.sleep = sleep
        self.concurrency = AdaptiveConcurrency(config.concurrency)
        mode = StructuredMode(config.structured)
        self._fallback_allowed = mode is StructuredMode.AUTO
        self.structured = StructuredMode.JSON_SCHEMA if mode is StructuredMode.AUTO else mode
        self._mode_lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=config.concurrency, max_keepalive_connections=config.concurrency
            ),
        )

    def close(self) -> None:
        self._http.close()

    def chat(self, messages: list[dict[str, str]], request: JsonRequest | None = None) -> Completion:
        """One completion, retried on transient failures. With a JsonRequest, `max_tokens` and (per the
        structured mode) `response_format` are sent. In `auto` mode a 4xx refusal steps down one mode and
        the request is sent again at once; the weaker mode is remembered only once a request in it is
        answered, so a refusal that had nothing to do with the format (a wrong model name: 404) fails
        the request and leaves structured output on.
        Raises LlmUnavailable, LlmRejected or BreakerOpen."""
        asked = mode = self.structured
        while True:
            body: dict[str, Any] = {
                "model": self.config.model,
                "messages": messages,
                "temperature": self.config.temperature,
            }
            if request is not None:
                if request.max_tokens:
                    body["max_tokens"] = request.max_tokens
                fmt = response_format(mode, request.name, request.schema)
                if fmt is not None:
                    body["response_format"] = fmt
            try:
                completion = self._send(body)
            except LlmRejected as exc:
                if "response_format" not in body or not self._may_step_down(exc):
                    raise
                mode = FALLBACK.get(mode, StructuredMode.OFF)
                continue
            if mode is not asked:
                self._remember(asked, mode)
            return completion

    def _may_step_down(self, error: LlmRejected) -> bool:
        refusal = isinstance(error, FormatRefused) or error.status in (400, 404, 415, 422, 501)
        return self._fallback_allowed and refusal

    def _remember(self, refused: StructuredMode, works: StructuredMode) -> None:
        """The server answered in `works` after refusing `refused`: use it from now on."""
        with self._mode_lock:
            if self.structured is refused:
                self.structured = works
                log.warning("llm_structured_fallback", refused=refused.value, now=works.value)

    def _send(self, body: dict[str, Any]) -> Completion:
        last_error = "no attempt made"
        for attempt in range(self.config.max_retries + 1):
            self.breaker.acquire()
            wait: float | None = None
            started = self.concurrency.acquire()
            try:
                response = self._http.post(self.endpoint, json=body)
            except httpx.ConnectTimeout as exc:
                last_error = f"connect timeout ({type(exc).__name__})"
                self.breaker.failure()
            except httpx.TimeoutException as exc:
                # Queued behind other requests in a busy server: slow, not down.
                last_error = f"timeout after {self.config.timeout_s:g}s ({type(exc).__name__})"
                self.concurrency.congestion(started, "a read timeout")
                self.breaker.busy()
            except httpx.TransportError as exc:
                last_error = f"connection error ({type(exc).__name__}: {exc})"
                self.breaker.failure()
            else:
                if response.status_code == 200:
                    self.breaker.success()
                    self.concurrency.success()
                    return _completion(response)
                if response.status_code not in RETRY_STATUS:
                    self.breaker.success()  # the endpoint is alive; the request is what is wrong
                    raise LlmRejected(response.status_code, _error_message(response))
                message = _error_message(response)
                if "response_format" in body and "response_format" in message:
                    self.breaker.success()  # up, but refuses the field: retrying the same body cannot help
                    raise FormatRefused(response.status_code, message)
                last_error = f"HTTP {response.status_code}: {message}"
                if response.status_code in (408, 409, 425, 429):
                    self.breaker.success()  # it answered: up, only asking us to slow down
                    self.concurrency.congestion(started, f"HTTP {response.status_code}")
                else:
                    self.breaker.failure()
                wait = parse_retry_after(response.headers)
                if wait is not None:
                    wait = min(wait, self.config.max_retry_after_s)
            finally:
                self.concurrency.release()
            if attempt == self.config.max_retries:
                break
            if wait is None:
                cap = min(self.config.backoff_cap_s, self.config.backoff_base_s * 2**attempt)
                wait = random.uniform(cap / 2, cap)
            self.sleep(wait)
        raise LlmUnavailable(f"LLM unavailable after {self.config.max_retries + 1} attempts: {last_error}")

    def ask_json(
        self,
        messages: list[dict[str, str]],
        validate: Callable[[Any], T],
        request: JsonRequest | None = None,
        reminder: str = "Reply with valid JSON only, exactly in the requested format.",
    ) -> T:
        """Ask, parse and validate; re-ask a bounded number of times with the bad reply shown back.

        A reply cut by the length limit whose JSON is still complete is used; one whose JSON is broken is
        a malformed reply like any other (never an outage)."""
        conversation = list(messages)
        raw = ""
        problem = ""
        for _ in range(self.config.reask_invalid + 1):
            completion = self.chat(conversation, request)
            raw = completion.text
            try:
                return validate(extract_json(raw))
            except (ValueError, TypeError, KeyError) as exc:
                problem = str(exc) or type(exc).__name__
                if completion.cut_by_length:
                    limit = request.max_tokens if request is not None else None
                    problem = f"reply cut at the length limit (max_tokens={limit}): {problem}"
                conversation = [
                    *messages,
                    {"role": "assistant", "content": raw[:4000]},
                    {"role": "user", "content": f"{reminder} Be brief. ({problem})"},
                ]
        raise InvalidReply(
            f"reply was not the expected JSON after {self.config.reask_invalid + 1} tries: {problem}", raw
        )


def _completion(response: httpx.Response) -> Completion:
    """The first choice's text and finish reason; a 200 with a broken envelope comes back as its raw text
    so that re-asking can handle it (the server is up)."""
    try:
        choice = response.json()["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return Completion(response.text, None)
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    text = content if isinstance(content, str) else json.dumps(content)
    return Completion(text, finish if isinstance(finish, str) else None)


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        if isinstance(data, dict):
            error = data.get("error", data)
            if isinstance(error, dict):
                return str(error.get("message") or error)[:300]
            return str(error)[:300]
    except ValueError:
        pass
    text = response.text.strip()
    if text.lower().startswith(("<!doctype", "<html")):
        return "HTML error page"
    return text[:300] or response.reason_phrase
