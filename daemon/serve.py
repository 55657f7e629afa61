"""`embedtune serve`: the model in service over HTTP, for RAG applications.

- `POST /v1/embeddings`: the OpenAI shape (`input` a string or a list, `encoding_format` float|base64,
  `usage`), plus `input_type` "query" (default) or "passage", which applies the model's own prompts (E5's
  `query: ` / `passage: `, a BGE query instruction). `model` may name anything: the answer names the
  version that produced the vectors.
- `POST /v1/search`: `daemon.search.search_many`, the code path of `embedtune search --json`, with the
  served model's encoder already loaded; each answer is logged in the query log (source "http").
- `POST /v1/events`: a User Behavior Insights event about a logged answer (state/query_log.py); the hit
  it is about is named by a top-level `object_id` / `position` or by UBI's `event_attributes`.
- `GET /health`: 200 once a model is loaded and (with the index on) a live collection exists, else 503
  with the reason; it does no model work, so it answers while a slow query runs.
- `GET /metrics`: Prometheus text (requests, latency, errors by cause, the version served).

The model is followed by daemon/serve_state.py (a promotion or rollback is served within about
`serve.poll_s`). Model work runs in worker threads, one model call at a time. Errors have the OpenAI shape
`{"error": {"message", "type", "code"}}`, never a traceback; request bodies, query texts and the token are
never logged.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from daemon.logs import get_logger
from daemon.serve_state import Loaded, ServeState
from daemon.settings import Settings
from state.layout import StateLayout

log = get_logger("embedtune.serve")

ENDPOINTS = ("/v1/embeddings", "/v1/search", "/v1/events", "/health", "/metrics")
INPUT_TYPES = ("query", "passage")
ENCODINGS = ("float", "base64")
MAX_CLIENT_ID = 200


class ApiError(Exception):
    """A request answered with a 4xx/5xx: `cause` labels the errors metric, `kind` is OpenAI's `type`."""

    def __init__(self, status: int, message: str, cause: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.cause = cause
        self.kind = kind


# --- binding -------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Only this machine can reach the address (a host name other than localhost counts as not)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def bind_problem(host: str, token: str, token_env: str) -> str:
    """Why listening on `host` is refused ("" when it is not): beyond loopback a token is required."""
    if is_loopback(host) or token:
        return ""
    return (
        f"refusing to listen on {host}: it is reachable from other machines and no token is set; "
        f"export {token_env}=<a long random secret> (clients send 'Authorization: Bearer <it>'), "
        "or listen on 127.0.0.1"
    )


# --- metrics -------------------------------------------------------------------------------------
class ServeMetrics:
    """A registry of its own (not the process default), so each server and test counts apart."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embedtune_serve_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "embedtune_serve_request_seconds",
            "Time to answer a request, by endpoint",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.errors = Counter(
            "embedtune_serve_errors",
            "Requests refused or failed, by cause",
            ["cause"],
            registry=self.registry,
        )
        self.model = Gauge(
            "embedtune_serve_model_info",
            "1 for the model version (and runtime) being served",
            ["version", "runtime"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "embedtune_serve_model_swaps", "Models loaded and swapped in", registry=self.registry
        )
        self.ready = Gauge("embedtune_serve_ready", "1 when /health answers ready", registry=self.registry)
        self.trial_searches = Counter(
            "embedtune_serve_trial_searches",
            "Questions answered with a running trial's candidate interleaved",
            registry=self.registry,
        )

    def model_swapped(self, loaded: Loaded) -> None:
        self.model.clear()
        self.model.labels(loaded.version, loaded.runtime).set(1)
        self.swaps.inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --- the application -----------------------------------------------------------------------------
def create_app(settings: Settings, state: ServeState, metrics: ServeMetrics | None = None):
    """The Starlette application over a started (or starting) ServeState."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    metrics = metrics or ServeMetrics()
    state.on_swap.append(metrics.model_swapped)
    if state.current is not None:
        metrics.model_swapped(state.current)
    limits = settings.serve
    token = limits.token()  # read once at start: a changed variable needs a restart, like every key
    layout = StateLayout(settings.paths.state_dir)

    def error_response(exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(
            {"error": {"message": exc.message, "type": exc.kind, "code": exc.cause}},
            status_code=exc.status,
            headers=headers,
        )

    def endpoint(name: str, *, auth: bool = True):
        """Counting, timing, the token check and the one place an exception becomes a JSON error."""

        def wrap(handler: Callable[[Request], Awaitable[Response]]):
            async def run(request: Request) -> Response:
                started = time.perf_counter()
                try:
                    if auth and token:
                        _check_token(request, token)
                    response = await handler(request)
                except ApiError as exc:
                    metrics.errors.labels(exc.cause).inc()
                    response = error_response(exc)
                    log.info("serve_refused", endpoint=name, status=exc.status, cause=exc.cause)
                except ClientDisconnect:  # the client went away mid-body: nobody reads an answer
                    metrics.errors.labels("client_disconnected").inc()
                    response = error_response(ApiError(400, "the client disconnected", "client_disconnected"))
                except Exception as exc:  # never a traceback to the client; the server log keeps it
                    metrics.errors.labels("internal").inc()
                    log.error("serve_failed", endpoint=name, error=type(exc).__name__, exc_info=True)
                    response = error_response(
                        ApiError(
                            500,
                            "internal error (the server's log has the details)",
                            "internal",
                            "server_error",
                        )
                    )
                metrics.requests.labels(name, str(response.status_code)).inc()
                metrics.latency.labels(name).observe(time.perf_counter() - started)
                return response

            return run

        return wrap

    @endpoint("/health", auth=False)
    async def health(request: Request) -> Response:
        ready, why = state.readiness()
        loaded, served = state.current, state.served
        metrics.ready.set(1 if ready else 0)
        body: dict[str, Any] = {
            "status": "ready" if ready else "unavailable",
            "model": loaded.version if loaded else None,
        }
        if loaded is not None:
            body["runtime"] = loaded.runtime
        if settings.index.enabled and served is not None:
            body["collection"] = served.live.name if served.live is not None else None
            body["behind"] = served.behind
        if not ready:  # unauthenticated: the details (paths) only where no token guards the other endpoints
            body["reason"] = why if not token else "not ready: `embedtune status` on the server says why"
        return JSONResponse(body, status_code=200 if ready else 503)

    @endpoint("/metrics")
    async def prometheus(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        metrics.ready.set(1 if state.readiness()[0] else 0)
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @endpoint("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await _json_body(request, limits.max_body_bytes)
        texts = _embedding_inputs(body.get("input"), limits.max_inputs)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ENCODINGS:
            raise ApiError(400, f"encoding_format {encoding!r}: use float or base64", "bad_encoding_format")
        input_type = body.get("input_type") or "query"
        if input_type not in INPUT_TYPES:
            raise ApiError(400, f"input_type {input_type!r}: use query or passage", "bad_input_type")
        loaded = _loaded(state)
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != loaded.dimension:
            raise ApiError(
                400,
                f"dimensions {dimensions!r}: model {loaded.version} gives {loaded.dimension}-dimensional "
                "vectors (omit dimensions)",
                "bad_dimensions",
            )

        def work():
            with _model_lock(loaded, limits.request_timeout_s):
                encoder = loaded.plain
                if input_type == "query":
                    vectors, prefix = encoder.queries(texts), encoder.query_prefix
                else:
                    vectors, prefix = encoder.passages(texts), encoder.passage_prompt
                return vectors, loaded.token_count([prefix + text for text in texts])

        vectors, tokens = await _in_thread(work, limits.request_timeout_s)
        data = [
            {"object": "embedding", "index": i, "embedding": _vector_out(vector, encoding)}
            for i, vector in enumerate(vectors)
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": loaded.version,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @endpoint("/v1/search")
    async def search(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        from daemon.query_logging import log_answers
        from daemon.search import SearchError, search_many
        from stages.fusion import MODES
        from state.vector_store import IndexUnavailable

        body = await _json_body(request, limits.max_body_bytes)
        single, queries = _search_queries(body, limits.max_queries)
        k = body.get("k", 10)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limits.max_k:
            raise ApiError(400, f"k {k!r}: use an integer from 1 to {limits.max_k}", "k_out_of_range")
        mode = body.get("mode") or settings.index.mode
        if mode not in MODES:
            raise ApiError(400, f"mode {mode!r}: use {', '.join(MODES)}", "unknown_mode")
        prefix = body.get("path_prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise ApiError(
                400, "path_prefix must be a string (the start of a document path)", "bad_path_prefix"
            )
        client_id = _client_id(request, body)
        loaded = _loaded(state)
        # the path filter applies to the hits: search deeper, then keep the first k under the prefix
        depth = max(k, settings.index.candidates) if prefix else k

        replica = loaded.replica  # read once, with the version: the two agree throughout
        prepared = replica.prepared() if replica is not None else None
        trial = state.trial_for(loaded)  # the running interleaved trial, when its candidate is ready
        deadline = time.monotonic() + limits.request_timeout_s  # the client's clock starts here

        def keep(answer) -> None:
            if prefix:
                answer.hits = [hit for hit in answer.hits if hit.path.startswith(prefix)]
            answer.hits = answer.hits[:k]

        def work():
            with _model_lock(loaded, deadline - time.monotonic()):
                try:
                    answers = search_many(
                        settings, queries, "current", depth, mode, encoder=loaded.encoder, replica=prepared
                    )
                except (SearchError, IndexUnavailable) as exc:
                    raise ApiError(503, str(exc), "search_unavailable", "service_unavailable") from None
            for answer in answers:
                keep(answer)
            left = deadline - time.monotonic()

            def time_left() -> bool:
                return deadline - time.monotonic() > limits.request_timeout_s / 2

            # BM25 alone is the same for both models; the candidate searches only while half of the
            # request's time is left, and a busy candidate is not waited for past a second, so the
            # served answer is not lost
            if trial is not None and mode != "lexical" and time_left():
                from daemon.serve_trial import interleave

                mixed = interleave(
                    settings,
                    answers,
                    trial,
                    depth=depth,
                    mode=mode,
                    k=k,
                    keep=keep,
                    hold=lambda candidate: _model_lock(candidate, min(1.0, left / 2)),
                    time_left=time_left,
                )
                metrics.trial_searches.inc(mixed)
            return answers

        answers = await _in_thread(work, limits.request_timeout_s)
        if single and answers[0].error:
            raise ApiError(400, answers[0].error, "bad_query")
        await run_in_threadpool(log_answers, settings, answers, "http", client_id)
        out = [_answer_json(answer) for answer in answers]
        return JSONResponse(out[0] if single else {"object": "list", "answers": out})

    @endpoint("/v1/events")
    async def events(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        from daemon.query_logging import LogUnavailable
        from stages.real_queries import EVENT_GRADES
        from state.query_log import LoggedEvent

        if not settings.query_log.enabled:
            raise ApiError(
                409, "the query log is off (query_log.enabled = false): events are not kept", "log_off"
            )
        body = await _json_body(request, limits.max_body_bytes)
        attributes = body.get("event_attributes") or {}
        if not isinstance(attributes, dict):
            raise ApiError(422, "event_attributes must be a JSON object", "bad_event")
        object_id, position = _event_hit(body, attributes)
        action = body.get("action_name")
        labels = isinstance(action, str) and action.strip().lower() in EVENT_GRADES
        if labels and object_id is None and position is None:
            # a click or citation of no hit labels nothing: refused, so the application hears of it
            raise ApiError(
                422,
                f"a {action.strip()!r} event must name the hit it is about: object_id (its chunk_id) or "
                "position (its 1-based rank), at the top level or as event_attributes.object.object_id / "
                "event_attributes.position.ordinal",
                "bad_event",
            )
        event = LoggedEvent(
            query_id=body.get("query_id"),
            action_name=action,
            object_id=object_id,
            position=position,
            client_id=_client_id(request, body),
            attributes=attributes,
        )

        def record() -> str:
            if not layout.database.exists():
                return f"unknown query_id {event.query_id!r}: nothing has been searched yet"
            from daemon.query_logging import open_log
            from state.query_log import QueryLog

            conn = open_log(layout)
            try:
                return QueryLog(conn).record_event(event)
            finally:
                conn.close()

        try:
            reason = await run_in_threadpool(record)
        except LogUnavailable as exc:
            raise ApiError(503, str(exc), "log_unavailable", "service_unavailable") from None
        if reason:
            if reason.startswith("unknown query_id"):
                raise ApiError(404, reason, "unknown_query_id", "not_found_error")
            raise ApiError(422, reason, "bad_event")
        return JSONResponse({"status": "recorded", "query_id": event.query_id})

    async def not_found(request: Request, exc: HTTPException) -> Response:
        cause = "not_found" if exc.status_code == 404 else "method_not_allowed"
        metrics.errors.labels(cause).inc()
        metrics.requests.labels("other", str(exc.status_code)).inc()
        message = (
            f"no endpoint {request.url.path}: use {', '.join(ENDPOINTS)}"
            if exc.status_code == 404
            else f"{request.method} is not allowed on {request.url.path}"
        )
        return error_response(ApiError(exc.status_code, message, cause))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/search", search, methods=["POST"]),
        Route("/v1/events", events, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


# --- request parts -------------------------------------------------------------------------------
def _check_token(request, token: str) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ApiError(
            401,
            "a bearer token is required (Authorization: Bearer <token>)",
            "unauthorized",
            "authentication_error",
        )


def _event_hit(body: dict, attributes: dict) -> tuple[Any, Any]:
    """(object_id, position) of the hit an event is about: the top-level `object_id` / `position`, or
    UBI's `event_attributes.object.object_id` / `.position.ordinal`. When both forms are sent they must
    agree: picking one would silently label a hit the other form contradicts."""
    found = attributes.get("object") or {}
    placed = attributes.get("position") or {}
    if not isinstance(found, dict) or not isinstance(placed, dict):
        raise ApiError(422, "event_attributes.object and .position must be JSON objects (UBI)", "bad_event")
    object_id = _one_value(
        body.get("object_id"), found.get("object_id"), "object_id", "event_attributes.object.object_id"
    )
    position = _one_value(
        body.get("position"), placed.get("ordinal"), "position", "event_attributes.position.ordinal"
    )
    return object_id, position


def _one_value(top: Any, nested: Any, top_name: str, nested_name: str) -> Any:
    """The value given in either place (None when neither; a blank string counts as not given)."""
    top, nested = _given(top), _given(nested)
    if top is not None and nested is not None and _comparable(top) != _comparable(nested):
        raise ApiError(
            422,
            f"{top_name} ({top!r}) and {nested_name} ({nested!r}) disagree: send one, or the same in both",
            "bad_event",
        )
    return top if top is not None else nested


def _given(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _comparable(value: Any) -> Any:
    """A chunk id sent as 42, "42" or " 42 " names the same hit."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value.strip() if isinstance(value, str) else value


async def _json_body(request, limit: int) -> dict:
    """The body as a JSON object, read up to `limit` bytes (413 beyond, before reading when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is larger than serve.max_body_bytes ({limit} bytes)", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, f"the body is larger than serve.max_body_bytes ({limit} bytes)", "body_too_large"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the body is empty: send a JSON object", "bad_json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, nesting too deep, a number too long
        message = exc if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ApiError(400, f"the body is not valid JSON: {message}", "bad_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "bad_json")
    _check_text(body)
    return body


def _check_text(value) -> None:
    """Every string of the body encodes as UTF-8: JSON admits lone surrogates ("\\ud800"), which a tokenizer,
    SQLite and the response's own encoding all fail on later, as a 500."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the body holds a string that is not valid Unicode", "bad_json") from None
        elif isinstance(item, dict):
            todo += list(item.keys()) + list(item.values())
        elif isinstance(item, list):
            todo += item


def _embedding_inputs(value, limit: int) -> list[str]:
    if value is None:
        raise ApiError(400, "input is missing: a string or a list of strings", "empty_input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        if isinstance(texts, list) and texts and all(isinstance(t, (int, list)) for t in texts):
            raise ApiError(400, "token arrays are not accepted: send the text itself", "bad_input")
        raise ApiError(400, "input must be a string or a list of strings", "bad_input")
    if not texts:
        raise ApiError(400, "input is an empty list", "empty_input")
    if len(texts) > limit:
        raise ApiError(
            400, f"{len(texts)} inputs: at most {limit} per request (serve.max_inputs)", "too_many_inputs"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise ApiError(400, f"input[{i}] is empty", "empty_input")
    return texts


def _search_queries(body: dict, limit: int) -> tuple[bool, list[str]]:
    """(one query?, the queries) from `query` or `queries` (exactly one of them)."""
    if ("query" in body) == ("queries" in body):
        raise ApiError(400, "send either query (a string) or queries (a list of strings)", "empty_input")
    if "query" in body:
        query = body["query"]
        if not isinstance(query, str):
            raise ApiError(400, "query must be a string", "bad_input")
        if not query.strip():
            raise ApiError(400, "the query is empty", "empty_input")
        return True, [query]
    queries = body["queries"]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ApiError(400, "queries must be a list of strings", "bad_input")
    if not queries:
        raise ApiError(400, "queries is an empty list", "empty_input")
    if len(queries) > limit:
        raise ApiError(
            400, f"{len(queries)} queries: at most {limit} per request (serve.max_queries)", "too_many_inputs"
        )
    return False, queries


def _client_id(request, body: dict) -> str:
    value = request.headers.get("x-client-id") or body.get("client_id") or ""
    if not isinstance(value, str) or len(value) > MAX_CLIENT_ID:
        raise ApiError(
            400, f"client_id must be a string of at most {MAX_CLIENT_ID} characters", "bad_client_id"
        )
    return value


def _loaded(state: ServeState) -> Loaded:
    loaded = state.current  # read once: this request is answered by this version throughout
    if loaded is None:
        ready, why = state.readiness()
        raise ApiError(503, f"not ready: {why}", "not_ready", "service_unavailable")
    return loaded


class _model_lock:
    """Hold the model (one call at a time); waiting longer than the request may take gives 504. The
    deadline is set when the request's work is handed to its thread: a thread still waiting when the
    client was given its 504 does not run the work afterwards for nobody."""

    def __init__(self, loaded: Loaded, timeout: float) -> None:
        self.lock = loaded.lock
        self.deadline = time.monotonic() + timeout

    def __enter__(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0 or not self.lock.acquire(timeout=left):
            raise ApiError(
                504, "the model was busy for longer than serve.request_timeout_s", "timeout", "timeout"
            )
        if time.monotonic() >= self.deadline:  # got it just as the request timed out: nobody waits now
            self.lock.release()
            raise ApiError(504, "the request timed out before the model was free", "timeout", "timeout")

    def __exit__(self, *exc) -> None:
        self.lock.release()


async def _in_thread(work: Callable[[], Any], timeout: float) -> Any:
    """Model work in a worker thread, so /health and /metrics answer meanwhile; past `timeout` the client
    gets 504 and the thread finishes on its own (nothing it does is logged as answered)."""
    import anyio

    try:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
    except TimeoutError:
        raise ApiError(
            504, f"the request took longer than serve.request_timeout_s ({timeout:g} s)", "timeout", "timeout"
        ) from None


def _vector_out(vector, encoding: str):
    import numpy as np

    if encoding == "base64":  # what the OpenAI clients decode: little-endian float32
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def _answer_json(answer) -> dict:
    """`search --json`'s object; each hit also carries a `metadata` object (chunk_id, path, score), the
    field generic retrievers (LangChain's RemoteLangChainRetriever) turn into a Document's metadata."""
    body = answer.to_json()
    for hit in body["hits"]:
        hit["metadata"] = {"chunk_id": hit["chunk_id"], "path": hit["path"], "score": hit["score"]}
    return body


# --- the process ---------------------------------------------------------------------------------
def build_server(settings: Settings, host: str, port: int, state: ServeState | None = None):
    """(uvicorn.Server, ServeState), the state's poller started; `server.run()` serves until
    `server.should_exit` is set (tests run it on a thread and pass port 0)."""
    import uvicorn

    state = state or ServeState(settings)
    app = create_app(settings, state)
    state.start()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # our structlog set-up; uvicorn's own lines go through logging at warning
        access_log=False,  # a request's log line is ours (no query text, no token)
        server_header=False,
        timeout_graceful_shutdown=5,
        lifespan="off",
    )
    return uvicorn.Server(config), state


def cmd_serve(settings: Settings, host: str | None, port: int | None) -> int:
    """Serve until SIGTERM/SIGINT. A non-loopback address without a token is refused before anything
    loads."""
    host = host or settings.serve.host
    port = settings.serve.port if port is None else port
    if not 1 <= port <= 65535:
        print(f"embedtune: --port {port}: use 1 to 65535", file=sys.stderr)
        return 2
    problem = bind_problem(host, settings.serve.token(), settings.serve.token_env)
    if problem:
        print(f"embedtune: {problem}", file=sys.stderr)
        return 2
    server, state = build_server(settings, host, port)
    log.info(
        "serve_listening",
        host=host,
        port=port,
        token=bool(settings.serve.token()),  # whether one is required, never its value
        state_dir=str(settings.paths.state_dir),
    )
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind (the port is taken)
        print(f"embedtune: cannot listen on {host}:{port} (see the log line above)", file=sys.stderr)
        return int(exc.code or 1)
    finally:
        state.stop()
    return 0 if server.started else 1


def serve_in_thread(settings: Settings, host: str = "127.0.0.1", port: int = 0):
    """Start a server on a thread; returns (server, state, thread, base_url) once it listens (tests and
    benchmarks)."""
    server, state = build_server(settings, host, port)
    thread = threading.Thread(target=server.run, name="serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            state.stop()
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    return server, state, thread, f"http://{host}:{bound[1]}"
