"""The held-out set judges the model in service against a candidate, so it must not be chosen by the model
in service, and a query copied from the corpus must not be a verbatim lookup (docs/promotion.md)."""

from __future__ import annotations

import numpy as np

from stages.evalsets import EvalSet, without_copied_query
from stages.evaluate import evaluate_retrieval
from tests.conftest import settings_for


def _samples_db(tmp_path):
    """A real database with one document of two chunks and unfiltered pairs on both splits."""
    from state.db import Database
    from state.documents import DocumentStore, NewChunk
    from state.queue import JobQueue

    db = Database(tmp_path / "t.db")
    queue = JobQueue(db.conn)
    store = DocumentStore(db.conn, queue)
    store.file_seen("/inbox/a.txt", 1, 1.0)
    job = queue.claim("w", ["ingest"])
    texts = ["rivers flow through the old city", "solar panels convert sunlight into power"]
    chunks = [NewChunk(i, text, "", f"sha{i}", "en") for i, text in enumerate(texts)]
    store.store_version(job, 1, "sha", 1, 1.0, "en", chunks, 0.1)
    ids = [row[0] for row in db.conn.execute("SELECT id FROM chunks ORDER BY id")]
    rows = [
        (ids[0], "where do rivers flow", "train"),
        (ids[1], "how do solar panels work", "train"),
        (ids[0], "an old city river", "heldout"),
        (ids[1], "sunlight power conversion", "heldout"),
    ]
    db.conn.executemany(
        "INSERT INTO samples (chunk_id, query, kind, split, created) VALUES (?, ?, 'question', ?, 'now')",
        rows,
    )
    return db, queue


def test_without_a_reranker_the_model_in_service_does_not_choose_the_held_out_queries(
    tmp_path, tiny_embedder
):
    from daemon.filtering import FilterService
    from daemon.workers import JobContext
    from state.samples import FILTER_KEY

    settings = settings_for(tmp_path, tiny_embedder, synthesis={"featured_percentage": 0.01})
    db, queue = _samples_db(tmp_path)
    queue.enqueue("filter", FILTER_KEY, {})
    service = FilterService(settings, lambda conn: (tiny_embedder, None))
    service.handle(JobContext(queue.claim("w", ["filter"]), queue))
    rows = db.conn.execute("SELECT split, kept, rank, reason FROM samples ORDER BY id").fetchall()
    train = [row for row in rows if row["split"] == "train"]
    heldout = [row for row in rows if row["split"] == "heldout"]
    assert all(row["rank"] is not None for row in train)  # the training pairs are ranked as before
    assert all(row["kept"] == 1 and row["rank"] is None and row["reason"] is None for row in heldout)


def test_held_out_pairs_a_former_filter_ranked_are_filtered_again_after_the_upgrade(tmp_path):
    from state.db import connect, migrate
    from state.samples import SampleStore

    conn = connect(tmp_path / "old.db")
    migrate(conn, target=9)  # the schema an install before this change has
    conn.execute(
        "INSERT INTO documents (id, path, status, split, first_seen, updated) "
        "VALUES (1, '/inbox/a.txt', 'ingested', 'heldout', 'now', 'now')"
    )
    conn.execute(
        "INSERT INTO chunks (id, document_id, version, ordinal, text, heading, sha256, language, split, created) "
        "VALUES (1, 1, 1, 0, 'rivers flow through the old city', '', 's', 'en', 'heldout', 'now')"
    )
    conn.executemany(
        "INSERT INTO samples (chunk_id, query, kind, split, kept, rank, reason, created) "
        "VALUES (1, ?, 'question', ?, 0, 9, 'positive ranked 9 of 10 (top 2 kept)', 'now')",
        [("an old city river", "heldout"), ("where do rivers flow", "train")],
    )
    migrate(conn)
    rows = conn.execute("SELECT split, kept, rank FROM samples").fetchall()
    assert all(row["kept"] is None and row["rank"] is None for row in rows if row["split"] == "heldout")
    assert all(row["kept"] == 0 for row in rows if row["split"] == "train")
    SampleStore(conn).arm_filter()  # what the daemon does at start
    assert (
        conn.execute("SELECT COUNT(*) FROM jobs WHERE kind='filter' AND state='pending'").fetchone()[0] == 1
    )


def test_a_copied_query_is_judged_on_every_chunk_that_holds_it_with_the_query_taken_out():
    sentence = "The bridge opened in 1932."
    texts = [
        f"Rivers cross the city. {sentence} Ferries stopped soon after.",
        f"{sentence} Ferries stopped soon after. Trams came next.",  # the overlap neighbour
        "Trams came next and ran until 1970.",
        f"Another document also says: {sentence}",  # not in the query's document
    ]
    relevant, stand_ins = without_copied_query(sentence, 0, texts, same_document=[0, 1, 2])
    assert relevant == {0: 1.0, 1: 1.0}
    assert stand_ins == {
        0: "Rivers cross the city. Ferries stopped soon after.",
        1: "Ferries stopped soon after. Trams came next.",
    }
    # A question written by an LLM is not in the text: its own chunk only, nothing replaced.
    assert without_copied_query("When did the bridge open?", 0, texts, [0, 1, 2]) == ({0: 1.0}, {})


def test_stand_in_vectors_replace_a_chunk_for_its_own_query_only():
    corpus = np.eye(4, dtype=np.float32)
    queries = np.array([[1, 0, 0.5, 0], [1, 0, 0.5, 0]], dtype=np.float32)
    relevant = [{0: 1.0}, {0: 1.0}]
    lookup = evaluate_retrieval(queries, corpus, relevant)
    assert lookup.per_query["recall@1"] == [1.0, 1.0]
    taken_out = np.array([0.2, 0.0, 0.0, 0.98], dtype=np.float32)  # chunk 0 without the copied sentence
    judged = evaluate_retrieval(queries, corpus, relevant, [{0: taken_out}, {}])
    assert judged.per_query["recall@1"] == [0.0, 1.0]  # first query: chunk 0 (0.2) now below chunk 2 (0.5)
    assert judged.per_query["recall@5"] == [1.0, 1.0]


def test_the_served_hybrid_scores_bm25_on_the_stand_in_too():
    """BM25 would find a copied sentence by its rare words; judged as served, the chunk without the
    sentence has none of them, so the lexical half no longer returns it for that query."""
    from stages.hybrid_eval import HybridEvaluator

    sentence = "Zebras and quokkas share the enclosure."
    texts = [
        f"{sentence} Keepers feed them twice a day.",
        "Keepers clean the paths.",
        "Tickets cost ten euros.",
    ]
    relevant, stand_ins = without_copied_query(sentence, 0, texts, [0, 1])
    lookup = HybridEvaluator(EvalSet("heldout", [sentence], texts, [{0: 1.0}]), 1.0)
    fair = HybridEvaluator(EvalSet("heldout", [sentence], texts, [relevant], stand_ins=[stand_ins]), 1.0)
    assert lookup._lexical_lists()[0][0].chunk_id == 0
    assert 0 not in {hit.chunk_id for hit in fair._lexical_lists()[0]}
