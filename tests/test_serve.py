"""Issue 36: `embedtune serve`. A real uvicorn server on 127.0.0.1 (a free port, on a thread), real SQLite,
tiny real models, the real `openai` client; Milvus Lite in one test. Tests wait on the server's state
(its /health answer, a held model lock), never on time."""

from __future__ import annotations

import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import wait_for
from tests.test_index import _add_document
from tests.test_served import _cli, _state

QUERY = "what carves valleys"


@contextmanager
def _serving(settings):
    """A server on a free loopback port; yields (base url, ServeState) once /health is ready."""
    from daemon.serve import serve_in_thread

    server, state, thread, url = serve_in_thread(settings)
    try:
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, message="a ready /health")
        yield url, state
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        state.stop()


def _prompted_model(tiny_embedder: Path, folder: Path) -> Path:
    """The tiny model declaring E5-style prompts, so queries and passages encode differently."""
    shutil.copytree(tiny_embedder, folder)
    config = folder / "config_sentence_transformers.json"
    data = json.loads(config.read_text()) if config.exists() else {}
    data["prompts"] = {"query": "query: ", "passage": "passage: "}
    config.write_text(json.dumps(data))
    return folder


def _encoder(settings, path: Path):
    from daemon.step_params import encode_params
    from stages.encoder import Encoder

    return Encoder(path, encode_params(settings))


def _samples(text: str, name: str) -> list:
    """The samples named `name` in a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_openai_client_gets_the_models_own_query_and_passage_vectors(
    make_settings, tiny_embedder, tmp_path
):
    import openai

    model = _prompted_model(tiny_embedder, tmp_path / "prompted")
    settings = make_settings(index={"enabled": False}, model={"base": str(model)})
    _state(settings)
    texts = ["rivers carve valleys", "how do glaciers move?", "lava builds islands"]
    encoder = _encoder(settings, model)
    with _serving(settings) as (url, _state_):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        default = client.embeddings.create(model="anything", input=texts)  # the client asks for base64
        as_float = client.embeddings.create(
            model="text-embedding-3-small", input=texts, encoding_format="float"
        )
        passages = client.embeddings.create(model="x", input=texts, extra_body={"input_type": "passage"})
        one = client.embeddings.create(model="x", input=texts[0])
    queries, passage_vectors = encoder.queries(texts), encoder.passages(texts)
    assert not np.allclose(queries, passage_vectors)  # the prompts make a difference to check
    for answer, expected in ((default, queries), (as_float, queries), (passages, passage_vectors)):
        got = [item.embedding for item in sorted(answer.data, key=lambda item: item.index)]
        assert _cosines(got, expected).min() > 0.9999
        assert answer.model == "base" and answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    assert len(one.data) == 1 and _cosines([one.data[0].embedding], queries[:1]).min() > 0.9999
    # usage counts the tokens the model read, its prompt included
    from stages.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    for answer, prompt in ((default, "query: "), (passages, "passage: ")):
        read = sum(len(tokenizer.encode(prompt + text).ids) for text in texts)
        assert answer.usage.prompt_tokens == read > sum(len(tokenizer.encode(text).ids) for text in texts)


def test_search_over_http_is_search_json_and_every_answer_is_logged_once(make_settings):
    from daemon.search import search_many
    from state.db import connect

    settings = make_settings(index={"enabled": False})
    layout, db = _state(settings)
    _add_document(db.conn, "/inbox/other/tides.md", ["tides rise twice a day along the coast of valleys"])
    with _serving(settings) as (url, _state_):
        one = httpx.post(f"{url}/v1/search", json={"query": QUERY, "k": 3}, headers={"X-Client-Id": "app-1"})
        many = httpx.post(
            f"{url}/v1/search",
            json={
                "queries": [QUERY, "how are islands made", "!!"],
                "k": 2,
                "mode": "dense",
                "client_id": "app-2",
            },
        )
        only = httpx.post(f"{url}/v1/search", json={"query": QUERY, "k": 5, "path_prefix": "/inbox/other/"})
    expected = search_many(settings, [QUERY], k=3)[0].to_json()
    assert one.status_code == 200, one.text
    body = one.json()
    assert [h["chunk_id"] for h in body["hits"]] == [h["chunk_id"] for h in expected["hits"]]
    assert set(expected) <= set(body) and body["model"] == "base" and body["mode"] == "hybrid"
    assert len(body["query_id"]) == 32 and body["hits"][0]["metadata"]["path"] == body["hits"][0]["path"]
    answers = many.json()["answers"]
    assert [a["model"] for a in answers] == ["base"] * 3 and all(a["mode"] == "dense" for a in answers)
    assert "error" in answers[2] and not answers[2]["hits"] and all(len(a["hits"]) == 2 for a in answers[:2])
    dense = search_many(settings, [QUERY], k=2, mode="dense")[0]
    assert [h["chunk_id"] for h in answers[0]["hits"]] == [h.chunk_id for h in dense.hits]
    assert [h["path"] for h in only.json()["hits"]] == ["/inbox/other/tides.md"]
    conn = connect(layout.database, readonly=True)
    rows = conn.execute("SELECT query_id, client_id, source, hit_ids FROM queries ORDER BY rowid").fetchall()
    conn.close()
    # one row per answered query (the "!!" query showed nothing), with the hits the client was shown
    logged = {row["query_id"]: row for row in rows}
    assert len(rows) == len(logged) == 4
    assert logged[body["query_id"]]["client_id"] == "app-1" and logged[body["query_id"]]["source"] == "http"
    assert json.loads(logged[body["query_id"]]["hit_ids"]) == [h["chunk_id"] for h in body["hits"]]
    assert logged[answers[0]["query_id"]]["client_id"] == "app-2"
    assert json.loads(logged[only.json()["query_id"]]["hit_ids"]) == [
        h["chunk_id"] for h in only.json()["hits"]
    ]


def test_events_name_a_logged_answer_or_are_refused_with_the_reason(make_settings):
    from state.db import connect

    settings = make_settings(index={"enabled": False})
    layout, _db = _state(settings)
    with _serving(settings) as (url, _state_):
        answer = httpx.post(f"{url}/v1/search", json={"query": QUERY, "k": 3}).json()
        hit = answer["hits"][1]
        event = {
            "action_name": "click",
            "query_id": answer["query_id"],
            "client_id": "app-1",
            "event_attributes": {"object": {"object_id": str(hit["chunk_id"])}, "position": {"ordinal": 2}},
        }
        stored = httpx.post(f"{url}/v1/events", json=event)
        unknown = httpx.post(f"{url}/v1/events", json=dict(event, query_id="f" * 32))
        bad = httpx.post(f"{url}/v1/events", json=dict(event, event_attributes={"position": {"ordinal": 0}}))
        nameless = httpx.post(f"{url}/v1/events", json=dict(event, action_name=""))
    assert stored.status_code == 200, stored.text
    assert unknown.status_code == 404 and "unknown query_id" in unknown.json()["error"]["message"]
    assert bad.status_code == 422 and "position" in bad.json()["error"]["message"]
    assert nameless.status_code == 422 and "action_name" in nameless.json()["error"]["message"]
    conn = connect(layout.database, readonly=True)
    rows = conn.execute(
        "SELECT query_id, action_name, object_id, position, client_id FROM query_events"
    ).fetchall()
    conn.close()
    assert [tuple(row) for row in rows] == [(answer["query_id"], "click", str(hit["chunk_id"]), 2, "app-1")]


def test_an_event_names_its_hit_at_the_top_level_or_as_ubi_and_a_click_of_nothing_is_refused(make_settings):
    from stages.real_queries import event_labels
    from state.db import connect
    from state.real_queries import RealQueryStore

    settings = make_settings(index={"enabled": False})
    layout, _db = _state(settings)
    with _serving(settings) as (url, _state_):
        answer = httpx.post(f"{url}/v1/search", json={"query": QUERY, "k": 3}).json()
        query_id, hits = answer["query_id"], [h["chunk_id"] for h in answer["hits"]]

        def post(**event):
            return httpx.post(f"{url}/v1/events", json={"query_id": query_id, **event})

        simple = post(action_name="click", object_id=str(hits[0]))  # the README's form
        by_rank = post(action_name="cited", position=2)
        ubi = post(action_name="click", event_attributes={"object": {"object_id": str(hits[2])}})
        both = post(
            action_name="click", object_id=hits[2], event_attributes={"object": {"object_id": f"{hits[2]}"}}
        )
        clash = post(
            action_name="click", object_id=str(hits[0]), event_attributes={"object": {"object_id": "999"}}
        )
        ranks = post(action_name="click", position=1, event_attributes={"position": {"ordinal": 3}})
        nothing = post(action_name="click")
        blank = post(action_name=" Cited ", object_id=" ", event_attributes={"object": {}})
        other = post(action_name="impression")  # not a label: it need not name a hit
    for response in (simple, by_rank, ubi, both, other):
        assert response.status_code == 200, response.text
    for response, words in (
        (clash, ("object_id", "disagree")),
        (ranks, ("position", "ordinal", "disagree")),
        (nothing, ("'click'", "object_id", "position")),
        (blank, ("'Cited'", "object_id", "position")),
    ):
        error = response.json()["error"]
        assert response.status_code == 422 and error["code"] == "bad_event", response.text
        assert error["type"] == "invalid_request_error" and all(w in error["message"] for w in words)
    conn = connect(layout.database)
    rows = conn.execute("SELECT action_name, object_id, position FROM query_events ORDER BY id").fetchall()
    assert [tuple(row) for row in rows] == [
        ("click", str(hits[0]), None),
        ("cited", None, 2),
        ("click", str(hits[2]), None),
        ("click", str(hits[2]), None),
        ("impression", None, None),
    ]
    # every accepted form labels its hit for the rounds
    [question] = RealQueryStore(conn).questions(10, judge_share=0.0)
    conn.close()
    assert event_labels(question).relevant == {hits[0]: 2.0, hits[1]: 3.0, hits[2]: 2.0}


def test_a_promotion_and_a_rollback_are_followed_without_a_restart(make_settings, tmp_path):
    from state.registry import ModelRegistry
    from tests.tiny_models import build_tiny_embedder

    settings = make_settings(index={"enabled": False})
    layout, db = _state(settings)
    other = build_tiny_embedder(tmp_path / "other", seed=1)  # other weights: vectors tell versions apart
    texts = ["rivers carve valleys"]
    with _serving(settings) as (url, state):
        before = httpx.post(f"{url}/v1/embeddings", json={"input": texts}).json()
        assert before["model"] == "base"
        registry = ModelRegistry(db.conn, layout)
        record = registry.promote(registry.register(other).id)
        wait_for(lambda: httpx.get(f"{url}/health").json()["model"] == "v1", message="v1 in service")
        after = httpx.post(f"{url}/v1/embeddings", json={"input": texts}).json()
        searched = httpx.post(f"{url}/v1/search", json={"query": QUERY, "k": 2}).json()
        registry.rollback(Path(settings.model.base))
        wait_for(lambda: httpx.get(f"{url}/health").json()["model"] == "base", message="base back in service")
        back = httpx.post(f"{url}/v1/embeddings", json={"input": texts}).json()
        metrics = httpx.get(f"{url}/metrics").text
    assert after["model"] == "v1" and searched["model"] == "v1"
    new = _encoder(settings, record.path).queries(texts)
    assert _cosines([after["data"][0]["embedding"]], new).min() > 0.9999
    assert _cosines([before["data"][0]["embedding"]], new).min() < 0.99  # the new version really answered
    assert back["model"] == "base" and back["data"][0]["embedding"] == before["data"][0]["embedding"]
    served = [(s.labels, s.value) for s in _samples(metrics, "embedtune_serve_model_info")]
    assert served == [({"version": "base", "runtime": "torch"}, 1.0)]
    assert state.swaps == 3  # loaded base, swapped to v1, swapped back (from memory)


def test_health_answers_while_a_slow_query_holds_the_model_and_a_timeout_is_a_504(make_settings):
    settings = make_settings(index={"enabled": False}, serve={"request_timeout_s": 60})
    _state(settings)
    with _serving(settings) as (url, state):
        lock = state.current.lock
        lock.acquire()  # a slow query: the model is busy
        result = {}
        worker = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/v1/search", json={"query": QUERY}, timeout=120))
        )
        worker.start()
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            metrics = httpx.get(f"{url}/metrics", timeout=5)
            assert health.status_code == 200 and health.json()["model"] == "base"
            assert metrics.status_code == 200 and worker.is_alive()
        finally:
            lock.release()
        worker.join(timeout=120)
        assert result["r"].status_code == 200 and result["r"].json()["hits"]
        settings.serve.request_timeout_s = 0.2  # read per request
        lock.acquire()
        try:
            late = httpx.post(f"{url}/v1/embeddings", json={"input": "rivers"}, timeout=30)
        finally:
            lock.release()
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"


def test_every_bad_input_gets_a_4xx_with_the_reason(make_settings):
    settings = make_settings(
        index={"enabled": False}, serve={"max_inputs": 4, "max_queries": 2, "max_body_bytes": 2048}
    )
    _state(settings)
    cases = [
        ("/v1/embeddings", b"{not json", 400, "bad_json"),
        ("/v1/embeddings", b"", 400, "bad_json"),
        ("/v1/embeddings", b"[1, 2]", 400, "bad_json"),
        ("/v1/embeddings", {"model": "x"}, 400, "empty_input"),
        ("/v1/embeddings", {"input": []}, 400, "empty_input"),
        ("/v1/embeddings", {"input": ["ok", "  "]}, 400, "empty_input"),
        ("/v1/embeddings", {"input": ["a"] * 5}, 400, "too_many_inputs"),
        ("/v1/embeddings", {"input": [[101, 2023]]}, 400, "bad_input"),
        ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 400, "bad_encoding_format"),
        ("/v1/embeddings", {"input": "a", "input_type": "document"}, 400, "bad_input_type"),
        ("/v1/embeddings", {"input": "a", "dimensions": 3}, 400, "bad_dimensions"),
        ("/v1/embeddings", {"input": "x" * 4000}, 413, "body_too_large"),
        ("/v1/search", {"query": ""}, 400, "empty_input"),
        ("/v1/search", {}, 400, "empty_input"),
        ("/v1/search", {"queries": []}, 400, "empty_input"),
        ("/v1/search", {"queries": ["a", "b", "c"]}, 400, "too_many_inputs"),
        ("/v1/search", {"query": "rivers", "mode": "semantic"}, 400, "unknown_mode"),
        ("/v1/search", {"query": "rivers", "k": 0}, 400, "k_out_of_range"),
        ("/v1/search", {"query": "rivers", "k": 101}, 400, "k_out_of_range"),
        ("/v1/search", {"query": "rivers", "k": "3"}, 400, "k_out_of_range"),
        ("/v1/search", {"query": "?!"}, 400, "bad_query"),
        ("/v1/events", {"query_id": "abc"}, 422, "bad_event"),
        ("/v1/nothing", {}, 404, "not_found"),
        # what json.loads takes but a tokenizer, SQLite or the response's encoding would fail on (500s before)
        ("/v1/embeddings", b"[" * 1010 + b"]" * 1010, 400, "bad_json"),  # nesting past the recursion limit
        ("/v1/search", b'{"query": "rivers \\ud800"}', 400, "bad_json"),
        ("/v1/search", b'{"query": "rivers", "client_id": "\\udfff"}', 400, "bad_json"),
    ]
    with _serving(settings) as (url, _state_):
        for path, body, status, code in cases:
            if isinstance(body, bytes):
                response = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
            else:
                response = httpx.post(url + path, json=body)
            error = response.json()["error"]
            assert (response.status_code, error["code"]) == (status, code), (path, body, response.text)
            assert error["message"] and error["type"] and "Traceback" not in response.text
        wrong_method = httpx.get(f"{url}/v1/search")
        metrics = httpx.get(f"{url}/metrics").text
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    errors = {s.labels["cause"]: s.value for s in _samples(metrics, "embedtune_serve_errors_total")}
    assert errors["unknown_mode"] == 1 and errors["too_many_inputs"] == 2 and errors["not_found"] == 1
    requests = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in _samples(metrics, "embedtune_serve_requests_total")
    }
    assert requests[("/v1/search", "400")] == 11 and requests[("/v1/embeddings", "413")] == 1
    assert any(
        s.labels.get("endpoint") == "/v1/embeddings"
        for s in _samples(metrics, "embedtune_serve_request_seconds_bucket")
    )


def test_a_token_is_required_when_set_and_a_public_address_without_one_is_refused(
    make_settings, tmp_path, capsys, monkeypatch
):
    import openai

    settings = make_settings(index={"enabled": False})
    _state(settings)
    monkeypatch.delenv("EMBEDTUNE_SERVE_TOKEN", raising=False)
    for host in ("0.0.0.0", "192.0.2.7", "::"):
        code, _out, err = _cli(capsys, settings, tmp_path, "serve", "--host", host, "--port", "1")
        assert code == 2 and "refusing to listen" in err and "EMBEDTUNE_SERVE_TOKEN" in err, err
    secret = "s3cret-" + "x" * 24
    monkeypatch.setenv("EMBEDTUNE_SERVE_TOKEN", secret)
    with _serving(settings) as (url, _state_):
        missing = httpx.post(f"{url}/v1/embeddings", json={"input": "rivers"})
        wrong = httpx.post(
            f"{url}/v1/search", json={"query": QUERY}, headers={"Authorization": "Bearer nope"}
        )
        scraped = httpx.get(f"{url}/metrics")
        health = httpx.get(f"{url}/health")  # probes carry no secret
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
        answer = client.embeddings.create(model="x", input="rivers")
        bad_client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad_client.embeddings.create(model="x", input="rivers")
    assert missing.status_code == wrong.status_code == scraped.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error" and secret not in missing.text
    assert health.status_code == 200 and len(answer.data[0].embedding) > 0
    assert secret not in capsys.readouterr().err  # never logged


def test_with_milvus_lite_health_waits_for_the_live_collection_and_search_answers_from_it(make_settings):
    from daemon.indexing import IndexService
    from daemon.search import search_many
    from daemon.serve import serve_in_thread

    settings = make_settings(index={"enabled": True, "lock_timeout_s": 10.0})
    layout, db = _state(settings)
    server, state, thread, url = serve_in_thread(settings)
    try:
        wait_for(
            lambda: "live index collection" in httpx.get(f"{url}/health").json().get("reason", ""),
            message="the model loaded, the collection not yet there",
        )
        assert httpx.get(f"{url}/health").status_code == 503 and state.current is not None
        assert IndexService(settings, layout).sync(db.conn).swapped
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, message="ready with the collection")
        live = db.conn.execute("SELECT name FROM index_collections WHERE state = 'live'").fetchone()[0]
        assert httpx.get(f"{url}/health").json()["collection"] == live
        body = httpx.post(f"{url}/v1/search", json={"query": QUERY, "k": 3}, timeout=120).json()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        state.stop()
    expected = search_many(settings, [QUERY], k=3)[0]
    # served from the collection's memory replica (daemon/serve_index.py): the collection's own answer
    assert body["source"] == f"memory replica of {live}" and expected.source == f"collection {live}"
    assert [h["chunk_id"] for h in body["hits"]] == [h.chunk_id for h in expected.hits]
