"""Synthesis and filtering through the daemon, against the real local LLM test server."""

from __future__ import annotations

from stages.filter import Bm25Index, FilterInput, filter_pairs
from stages.pseudo import pseudo_queries
from stages.text import detect_language, tokenize_for_bm25
from tests.conftest import wait_for
from tests.docs_factory import CHINESE, ENGLISH

LLM_FAST = {
    "max_retries": 1,
    "timeout_s": 2.0,
    "breaker_failures": 2,
    "breaker_reset_s": 1.0,
    "concurrency": 4,
}


def _llm_settings(make_settings, server, **llm):
    return make_settings(
        llm={"url": server.url + "/v1", **LLM_FAST, **llm},
        synthesis={
            "questions_per_chunk": 2,
            "rewrites_per_question": 1,
            "judge_threshold": 0.5,
            "featured_percentage": 1.0,
        },
    )


def _write_corpus(inbox):
    (inbox / "en.txt").write_text(ENGLISH)
    (inbox / "zh.txt").write_text(CHINESE)
    (inbox / "more.md").write_text("# Rivers\n\nThe river flows through the city. Its history is long.\n")


def _samples(running):
    return running.query("SELECT s.*, c.language FROM samples s JOIN chunks c ON c.id=s.chunk_id")


def test_llm_pairs_questions_rewrites_judge_and_filter(make_settings, start_daemon, fake_llm):
    settings = _llm_settings(make_settings, fake_llm)
    _write_corpus(settings.paths.inbox)
    running = start_daemon(settings)
    wait_for(lambda: running.scalar("SELECT COUNT(*) FROM chunks") >= 3, message="chunks")
    wait_for(running.idle, timeout=60, message="synthesis and filter done")
    rows = _samples(running)
    kinds = {row["kind"] for row in rows}
    assert kinds == {"question", "rewrite"}
    assert all(row["judge_score"] is not None and row["kept"] is not None for row in rows)
    zh = [row["query"] for row in rows if row["language"] == "zh"]
    assert zh and all(detect_language(q) == "zh" for q in zh)
    rewrites = [row for row in rows if row["kind"] == "rewrite"]
    assert all(row["parent_id"] is not None for row in rewrites)
    chunks = running.scalar("SELECT COUNT(*) FROM chunks")
    # one synthesize job per chunk, all done; no chunk without pairs
    assert running.scalar("SELECT COUNT(*) FROM jobs WHERE kind='synthesize' AND state='done'") == chunks
    assert running.scalar("SELECT COUNT(DISTINCT chunk_id) FROM samples") == chunks
    assert running.status()["llm"]["breaker"] == "closed"


def test_synthesize_job_run_twice_adds_nothing(make_settings, fake_llm, tmp_path):
    from daemon.synthesis import SynthesisService
    from daemon.workers import JobContext
    from stages.llm import CircuitBreaker
    from state.db import Database
    from state.documents import DocumentStore, NewChunk
    from state.queue import JobQueue

    settings = _llm_settings(make_settings, fake_llm)
    db = Database(tmp_path / "t.db")
    queue = JobQueue(db.conn)
    store = DocumentStore(db.conn, queue)
    store.file_seen("/x/a.txt", 1, 1.0)
    job = queue.claim("w", ["ingest"])
    store.store_version(job, 1, "sha", 1, 1.0, "en", [NewChunk(0, ENGLISH, "", "c0", "en")], 0.1)
    service = SynthesisService(settings, CircuitBreaker())
    first = queue.claim("w", ["synthesize"])
    service.handle(JobContext(first, queue))
    count = db.conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    assert count > 0
    db.conn.execute("UPDATE jobs SET state='pending' WHERE id=?", (first.id,))  # e.g. a lease expired
    again = queue.claim("w", ["synthesize"])
    service.handle(JobContext(again, queue))
    assert db.conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == count


def test_llm_outage_pauses_synthesis_and_resumes(make_settings, start_daemon, fake_llm):
    settings = _llm_settings(make_settings, fake_llm)
    fake_llm.down = True
    _write_corpus(settings.paths.inbox)
    running = start_daemon(settings)
    wait_for(lambda: running.status()["llm"]["breaker"] in ("open", "half-open"), message="breaker opens")
    assert running.scalar("SELECT COUNT(*) FROM samples") == 0
    assert running.scalar("SELECT COUNT(*) FROM jobs WHERE kind='synthesize' AND state='dead'") == 0
    fake_llm.down = False
    wait_for(
        lambda: (
            running.scalar("SELECT COUNT(*) FROM jobs WHERE kind='synthesize' AND state='done'")
            == running.scalar("SELECT COUNT(*) FROM chunks")
        ),
        timeout=60,
        message="synthesis resumes",
    )
    wait_for(lambda: running.status()["llm"]["breaker"] == "closed", message="breaker closes")
    per_chunk = running.query("SELECT chunk_id, kind, COUNT(*) AS n FROM samples GROUP BY chunk_id, kind")
    assert all(row["n"] <= 4 for row in per_chunk)


def test_random_faults_lose_nothing(make_settings, start_daemon):
    from tests.llm_server import FakeLlm

    weights = {"ok": 6, "500": 1, "429:0.2": 1, "html": 1, "truncated": 1, "nonjson": 1, "latency:0.3": 1}
    with FakeLlm(weights=weights, seed=7) as server:
        settings = _llm_settings(make_settings, server, max_retries=4, reask_invalid=3, breaker_failures=50)
        _write_corpus(settings.paths.inbox)
        running = start_daemon(settings)
        wait_for(lambda: running.scalar("SELECT COUNT(*) FROM chunks") >= 3)
        wait_for(running.idle, timeout=90, message="all synthesized despite faults")
        assert running.scalar("SELECT COUNT(*) FROM jobs WHERE state='dead'") == 0
        assert running.scalar("SELECT COUNT(DISTINCT chunk_id) FROM samples") == running.scalar(
            "SELECT COUNT(*) FROM chunks"
        )
        assert sum(server.faults.get(name, 0) for name in ("500", "html", "truncated", "nonjson")) > 0


def test_rejected_requests_dead_letter_and_bad_replies_retry_with_reason(make_settings, start_daemon):
    from tests.llm_server import FakeLlm

    with FakeLlm(script=["401"] + ["nonjson"] * 3) as server:
        # one request at a time, so the script's replies reach the jobs in order whatever the chunk count
        settings = _llm_settings(make_settings, server, reask_invalid=2, concurrency=1)
        (settings.paths.inbox / "a.txt").write_text(ENGLISH)
        (settings.paths.inbox / "b.txt").write_text(ENGLISH + " Another sentence about music.")
        running = start_daemon(settings)
        wait_for(lambda: running.scalar("SELECT COUNT(*) FROM jobs WHERE state='dead'") == 1, message="dead")
        # The 401 is final; the garbled replies fail one attempt, keep the raw reply, and retry later.
        garbled = wait_for(
            lambda: running.scalar(
                "SELECT id FROM jobs WHERE raw_reply LIKE '%questions you might ask%' AND last_error LIKE '%expected JSON%'"
            ),
            message="failed attempt with its raw reply",
        )
        errors = running.status()["jobs"]["recent_errors"]
        assert any("401" in e["error"] and e["state"] == "dead" for e in errors)
        wait_for(
            lambda: running.scalar("SELECT state FROM jobs WHERE id=?", garbled) == "done",
            timeout=60,
            message="the garbled job succeeds on retry",
        )
        assert running.scalar("SELECT attempts FROM jobs WHERE id=?", garbled) == 2
        assert running.scalar("SELECT COUNT(*) FROM jobs WHERE state='dead'") == 1


def test_wrong_language_questions_are_kept_visible_but_not_used(make_settings, start_daemon):
    from tests.llm_server import FakeLlm

    with FakeLlm(script=["wronglang"] * 20) as server:
        settings = _llm_settings(make_settings, server)
        (settings.paths.inbox / "zh.txt").write_text(CHINESE)
        running = start_daemon(settings)
        wait_for(lambda: running.scalar("SELECT COUNT(*) FROM samples") > 0)
        wait_for(running.idle)
        rows = running.query("SELECT kept, reason FROM samples WHERE kind='question'")
        assert rows and all(r["kept"] == 0 and "language" in r["reason"] for r in rows)


def test_no_llm_default_makes_pseudo_pairs(make_settings, start_daemon):
    settings = make_settings()
    _write_corpus(settings.paths.inbox)
    running = start_daemon(settings)
    wait_for(lambda: running.scalar("SELECT COUNT(*) FROM chunks") >= 3)
    wait_for(running.idle)
    kinds = {r[0] for r in running.query("SELECT kind FROM samples")}
    assert kinds == {"pseudo"}
    assert running.scalar("SELECT COUNT(*) FROM samples WHERE kept IS NULL") == 0


def test_jieba_tokens_for_chinese_and_words_for_english():
    tokens = tokenize_for_bm25("机器学习是人工智能的一个分支")
    assert "机器" in tokens and "学习" in tokens and "人工智能" in tokens
    assert tokenize_for_bm25("Solar Power, solar!") == ["solar", "power", "solar"]


def test_filter_keeps_only_pairs_whose_chunk_stands_out():
    corpus = [
        "solar panels convert sunlight into power",
        "rivers flow through the old city",
        "music history of the city",
        "batteries store solar energy at night",
    ]
    items = [
        FilterInput(1, "solar sunlight panels", 0, corpus[0]),
        FilterInput(2, "solar sunlight panels", 1, corpus[1]),
    ]

    def lexical(queries, passages):
        import numpy as np

        return np.array(
            [len(set(q.split()) & set(p.split())) for q, p in zip(queries, passages, strict=True)],
            dtype=float,
        )

    results = filter_pairs(items, corpus, Bm25Index(corpus), lexical, featured_percentage=0.25, candidates=10)
    assert results[0].kept and results[0].rank == 1
    assert not results[1].kept and "ranked" in results[1].reason


def test_pseudo_methods():
    text = "The river flows through the city. Its history is long and old. Music is part of the culture."
    heading = pseudo_queries(text, "Guide > Rivers of the city", "en", "sha", "heading", 1)
    assert heading[0].query == "Rivers of the city" and heading[0].passage is None
    lead = pseudo_queries(text, "", "en", "sha", "heading", 1)
    assert lead[0].query == "The river flows through the city." and "history" in lead[0].passage
    ict = pseudo_queries(text, "", "en", "sha", "inverse_cloze", 1)
    assert ict[0].query not in ict[0].passage
    assert pseudo_queries(text, "", "en", "sha", "inverse_cloze", 1) == ict  # deterministic
    assert pseudo_queries(text * 3, "", "en", "sha", "span", 2)[0].query in text * 3


def test_filter_with_a_cross_encoder_reranker(make_settings, start_daemon, tiny_reranker):
    from sentence_transformers import CrossEncoder

    assert CrossEncoder(str(tiny_reranker), device="cpu").predict([("river", "the river flows")]).shape == (
        1,
    )
    settings = make_settings(model={"reranker": str(tiny_reranker)}, synthesis={"featured_percentage": 0.5})
    _write_corpus(settings.paths.inbox)
    running = start_daemon(settings)
    wait_for(lambda: running.scalar("SELECT COUNT(*) FROM chunks") >= 3)
    wait_for(running.idle, timeout=90)
    rows = running.query("SELECT kept, rerank_score, rank FROM samples")
    assert rows and all(r["rerank_score"] is not None and r["rank"] >= 1 for r in rows)


def test_one_slot_rambling_server_finishes_with_nothing_dead(make_settings, start_daemon):
    """The stall seen against a real llama.cpp server: one slot, a model that rambles unless capped, and
    more workers than slots. Every chunk is synthesized, nothing is dead, the breaker never opens, and
    `status` shows the lowered concurrency and why."""
    from tests.llm_server import FakeLlm

    with FakeLlm(slots=1, latency=0.1, ramble_tokens=3000, token_s=0.001) as server:
        settings = _llm_settings(
            make_settings, server, concurrency=6, timeout_s=0.8, max_retries=8, breaker_failures=3
        )
        _write_corpus(settings.paths.inbox)
        running = start_daemon(settings)
        wait_for(lambda: running.scalar("SELECT COUNT(*) FROM chunks") >= 3)
        wait_for(running.idle, timeout=120, message="synthesis done behind a one-slot server")
        assert running.scalar("SELECT COUNT(*) FROM jobs WHERE state='dead'") == 0
        assert running.scalar("SELECT COUNT(DISTINCT chunk_id) FROM samples") == running.scalar(
            "SELECT COUNT(*) FROM chunks"
        )
        assert all(r["body"].get("max_tokens") for r in server.requests)
        llm = running.status()["llm"]
        assert llm["breaker"] == "closed" and llm["max_concurrency"] == 6
        assert llm["structured"] == "json_schema" and llm["concurrency_reason"]


def test_builtin_synthesis_in_batches_stores_what_single_jobs_store(make_settings, tmp_path):
    """Without an LLM the pool takes synthesize jobs in batches (one transaction for many): the pairs are
    the ones job-by-job synthesis makes, a chunk retired before its turn gets none, every job is done and
    one filter job is armed."""
    from daemon.synthesis import SynthesisService
    from daemon.workers import JobContext
    from stages.llm import CircuitBreaker
    from state.db import Database
    from state.documents import DocumentStore, NewChunk
    from state.queue import JobQueue

    settings = make_settings()
    texts = [f"{ENGLISH} Sentence number {n} closes chunk {n}. It has one more line {n}." for n in range(6)]
    results = []
    for mode in ("single", "batch"):
        db = Database(tmp_path / f"{mode}.db")
        queue = JobQueue(db.conn)
        store = DocumentStore(db.conn, queue)
        store.file_seen("/x/a.txt", 1, 1.0)
        chunks = [NewChunk(n, text, "", f"c{n}", "en") for n, text in enumerate(texts)]
        store.store_version(queue.claim("w", ["ingest"]), 1, "sha", 1, 1.0, "en", chunks, 0.1)
        db.conn.execute("UPDATE chunks SET active=0 WHERE ordinal=4")  # retired before synthesis
        service = SynthesisService(settings, CircuitBreaker())
        assert service.batch_size() > len(texts)
        if mode == "single":
            while (job := queue.claim("w", ["synthesize"])) is not None:
                service.handle(JobContext(job, queue))
        else:
            first = queue.claim("w", ["synthesize"])
            service.handle_batch(
                queue, [first, *queue.claim_more("w", "synthesize", service.batch_size() - 1)]
            )
        results.append(
            db.conn.execute("SELECT chunk_id, query, passage, kind FROM samples ORDER BY id").fetchall()
        )
        assert (
            db.conn.execute("SELECT COUNT(*) FROM jobs WHERE kind='synthesize' AND state!='done'").fetchone()[
                0
            ]
            == 0
        )
        assert db.conn.execute("SELECT COUNT(*) FROM jobs WHERE kind='filter'").fetchone()[0] == 1
        assert 5 not in {row[0] for row in results[-1]}  # chunk ids start at 1: ordinal 4 is id 5
    assert [tuple(r) for r in results[0]] == [tuple(r) for r in results[1]] and results[0]
