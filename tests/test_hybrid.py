"""Hybrid retrieval served from the index: real Milvus Lite collections with a BM25 function beside the
vectors, the tiny real embedder, the real daemon ingesting."""

from __future__ import annotations

import json

import pytest

from stages.fusion import Scored, lexical_only, zmix
from tests.conftest import wait_for

ENGLISH = {
    "rivers.md": "# Rivers\n\nThe river floods the valley every spring. Levees hold the water back.\n",
    "servers.md": "# Servers\n\nA database server stores files for the network. Backups run nightly.\n",
    "music.md": "# Music\n\nAn orchestra plays music in the hall. The violin section tunes first.\n",
    "solar.md": "# Solar\n\nSolar panels turn sunlight into energy. Batteries keep the energy for the night.\n",
    "history.md": "# History\n\nThe history of the city begins with a market by the harbour.\n",
}
CHINESE = {
    "shujuku.md": "# 数据库\n\n数据库服务器把文件存储在文件夹中，每天晚上备份。\n",
    "heliu.md": "# 河流\n\n每年春天河流都会淹没山谷，堤坝挡住了洪水。\n",
    "yinyue.md": "# 音乐\n\n管弦乐队在大厅里演奏音乐，小提琴组先调音。\n",
    "taiyang.md": "# 太阳能\n\n太阳能电池板把阳光变成电能，电池在夜里储存能量。\n",
}


def _indexed(make_settings, start_daemon, documents: dict[str, str], **index):
    """Documents ingested by the real daemon (index off while it runs), then one sync with the index on."""
    from daemon.indexing import IndexService
    from state.db import Database

    settings = make_settings(index={"enabled": False})
    for name, text in documents.items():
        (settings.paths.inbox / name).write_text(text, encoding="utf-8")
    running = start_daemon(settings)
    wait_for(
        lambda: running.scalar("SELECT COUNT(*) FROM documents WHERE status = 'ingested'") == len(documents),
        message="documents ingested",
    )
    wait_for(running.idle, timeout=60)
    running.stop()
    data = settings.model_dump(mode="json")
    data["index"] = {"enabled": True, **index}
    settings = type(settings).model_validate(data)
    layout = running.daemon.layout
    conn = Database(layout.database).conn
    report = IndexService(settings, layout).sync(conn)
    return settings, layout, conn, report


def _ids(answer) -> list[int]:
    return [hit.chunk_id for hit in answer.hits]


def test_zmix_scores_bm25_only_candidates_with_their_exact_cosine():
    dense = [Scored(1, 0.9), Scored(2, 0.5), Scored(3, 0.4)]
    lexical = [Scored(4, 12.0), Scored(1, 3.0)]
    assert lexical_only(dense, lexical) == [4]
    spreads = (0.1, 10.0)
    # chunk 4 is BM25's best; its true cosine (0.85) puts it first, the dense floor (0.4) would not
    assert [hit.chunk_id for hit in zmix(dense, lexical, 0.5, 4, {4: 0.85}, spreads)][0] == 4
    assert [hit.chunk_id for hit in zmix(dense, lexical, 0.5, 4, None, spreads)][0] == 1
    assert [hit.chunk_id for hit in zmix(dense, lexical, 0.5, 4, {4: 0.0}, spreads)][0] == 1
    assert [hit.chunk_id for hit in zmix(dense, lexical, 0.0, 3)] == [1, 2, 3]
    assert [hit.chunk_id for hit in zmix(dense, lexical, 1.0, 2)] == [4, 1]
    with pytest.raises(ValueError):
        zmix(dense, lexical, 1.5, 3)


def test_auto_shares_follow_the_query_language_and_the_analyzer_any_chinese():
    from stages.fusion import choose_analyzer, query_bm25_weight

    assert query_bm25_weight("数据库怎么备份") > query_bm25_weight("how are database backups made")
    assert choose_analyzer("auto", {"en": 818, "zh": 4}) == "jieba"  # the bundled samples: one Chinese guide
    assert choose_analyzer("auto", {"en": 818, "zh": 1}) == "standard"
    assert choose_analyzer("standard", {"zh": 500}) == "standard"


def test_spreads_are_the_corpus_standard_deviations():
    import numpy as np

    from stages.fusion import dense_spread, lexical_spread, vector_covariance

    rng = np.random.default_rng(1)
    corpus = rng.normal(size=(500, 8))
    query = rng.normal(size=8)
    cosines = corpus @ query
    assert dense_spread(query, vector_covariance(corpus), []) == pytest.approx(cosines.std())
    bm25 = np.zeros(500)
    bm25[:7] = [9.0, 7.5, 3.0, 2.0, 1.0, 0.5, 0.25]  # the rest of the corpus has no query word
    listed = [Scored(i, float(bm25[i])) for i in range(7)]
    assert lexical_spread(listed, 500) == pytest.approx(bm25.std())
    assert lexical_spread([], 500) == 1.0


def test_a_collection_holds_both_halves_and_hybrid_fuses_them(make_settings, start_daemon):
    from daemon.indexing import IndexService
    from daemon.search import search
    from state.index_records import IndexRecords

    settings, layout, conn, report = _indexed(make_settings, start_daemon, ENGLISH)
    live = IndexRecords(conn).live()
    assert report.swapped and live.analyzer == "standard" and live.hybrid
    assert live.bm25_weight is None  # "auto" and no round chose one: each query's language decides
    query = "which server stores the database backups"
    lexical = search(settings, query, k=5, mode="lexical")
    dense = search(settings, query, k=5, mode="dense")
    hybrid = search(settings, query, k=5, mode="hybrid")
    assert lexical.source == dense.source == hybrid.source == f"collection {live.name}"
    assert lexical.hits[0].path.endswith("servers.md")  # BM25 matches the words
    assert all(hit.score > 0 for hit in lexical.hits)
    # the halves disagree here (the tiny model knows no meaning): the fusion answers from both
    assert _ids(dense) != _ids(lexical)
    assert set(_ids(hybrid)) <= set(_ids(dense)) | set(_ids(lexical))
    assert hybrid.mode == "hybrid" and settings.index.mode == "hybrid"
    # the BM25 share is part of what the collection serves: a changed setting reaches it by a sync
    # (no refill), and the two extremes give each half's own ranking
    for weight, expected in ((1.0, _ids(lexical)[:3]), (0.0, _ids(dense)[:3])):
        data = settings.model_dump(mode="json")
        data["index"]["bm25_weight"] = weight
        changed = type(settings).model_validate(data)
        service = IndexService(changed, layout)
        assert service.needs_sync(conn)
        assert service.sync(conn).added == 0 and IndexRecords(conn).live().bm25_weight == weight
        assert _ids(search(changed, query, k=3, mode="hybrid")) == expected


def test_exact_search_fuses_the_same_way_as_the_collection(make_settings, start_daemon):
    """A model with no collection of its own (index off) answers by exact search with the same fusion:
    the same chunks in the same order, with the collection's fused scores (same BM25 share, same spreads)."""
    from daemon.search import search

    settings, _layout, _conn, _report = _indexed(make_settings, start_daemon, ENGLISH)
    query = "solar energy for the night"
    served = {mode: search(settings, query, k=4, mode=mode) for mode in ("dense", "lexical", "hybrid")}
    assert all(answer.source.startswith("collection ") for answer in served.values())
    data = settings.model_dump(mode="json")
    data["index"]["enabled"] = False
    offline = type(settings).model_validate(data)
    exact = {mode: search(offline, query, k=4, mode=mode) for mode in ("dense", "lexical", "hybrid")}
    assert all(answer.source.startswith("exact search") for answer in exact.values())
    assert _ids(exact["dense"]) == _ids(served["dense"])
    # rank_bm25 and Milvus' BM25 agree on the best, not on every score (their IDF differs)
    assert _ids(exact["lexical"])[0] == _ids(served["lexical"])[0]
    fused, collection = exact["hybrid"], served["hybrid"]
    assert len(fused.hits) == 4 and _ids(fused) == _ids(collection)
    # The fused scores differ only by the BM25 share of the two BM25s' gap: <0.1% here, where another
    # share (0.3) or a BM25 spread over another corpus size moves them by 2-12%.
    assert [hit.score for hit in fused.hits] == pytest.approx(
        [hit.score for hit in collection.hits], rel=2e-3
    )


def test_a_chinese_corpus_gets_the_jieba_analyzer_and_chinese_queries_match_words(
    make_settings, start_daemon
):
    from daemon.search import search
    from state.index_records import IndexRecords

    settings, _layout, conn, _report = _indexed(
        make_settings, start_daemon, {**CHINESE, "rivers.md": ENGLISH["rivers.md"]}
    )
    assert IndexRecords(conn).live().analyzer == "jieba"
    answer = search(settings, "数据库备份", k=3, mode="lexical")
    assert answer.hits and answer.hits[0].path.endswith("shujuku.md")
    english = search(settings, "river valley", k=3, mode="lexical")  # jieba splits English words too
    assert english.hits[0].path.endswith("rivers.md")
    assert search(settings, "太阳能电池", k=3, mode="hybrid").hits


def test_a_collection_from_before_hybrid_search_is_rebuilt_blue_green(make_settings, start_daemon):
    from daemon.indexing import IndexService
    from daemon.search import search
    from state.index_records import IndexRecords

    settings, layout, conn, _report = _indexed(make_settings, start_daemon, ENGLISH)
    records = IndexRecords(conn)
    service = IndexService(settings, layout)
    # Make the live collection look as a pre-hybrid one did: the record without an analyzer
    live = records.live()
    conn.execute(
        "UPDATE index_collections SET analyzer = NULL, bm25_weight = NULL WHERE name = ?", (live.name,)
    )
    conn.commit()
    assert service.needs_sync(conn)
    assert "serves dense" in _status_text(settings, layout) and "built before hybrid" in _status_text(
        settings, layout
    )
    old = search(settings, "database server", k=3, mode="hybrid")
    assert old.source.startswith("exact search") and "before hybrid search" in old.note
    assert search(settings, "database server", k=3, mode="dense").source == f"collection {live.name}"
    report = service.sync(conn)
    assert report.swapped and report.collection != live.name
    assert records.live().hybrid and records.get(live.name).state == "ready"
    assert not service.needs_sync(conn)
    assert search(settings, "database server", k=3).source == f"collection {report.collection}"
    text = _status_text(settings, layout)
    assert "serves hybrid" in text and "hybrid: BM25 (standard) + dense" in text


def _status_text(settings, layout) -> str:
    from state.status import format_status, read_status, set_served_mode

    status = read_status(layout)
    set_served_mode(status, settings.index.mode)
    return format_status(status)


def test_bad_queries_get_reasons_and_long_ones_a_note(make_settings, start_daemon, tmp_path, capsys):
    from daemon.search import SearchError, cmd_search, search

    settings, _layout, _conn, _report = _indexed(make_settings, start_daemon, ENGLISH)
    for query, reason in (("", "empty"), ("   ", "empty"), ("?!… —", "no words")):
        with pytest.raises(SearchError, match=reason):
            search(settings, query)
    long = search(settings, "river " * 600, k=2)
    assert "query cut to the model's" in long.note and long.hits
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        json.dumps({"id": "q-river", "query": "river floods"})
        + "\n"
        + json.dumps({"id": "q-bad", "query": "??"})
        + "\n",
        encoding="utf-8",
    )
    capsys.readouterr()  # the daemon's log lines so far
    assert cmd_search(settings, None, "current", 2, True, "hybrid", str(queries)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["id"] for row in rows] == ["q-river", "q-bad"]
    assert rows[0]["hits"] and {"path", "chunk_id", "score"} <= set(rows[0]["hits"][0])
    assert rows[1]["error"] and rows[1]["hits"] == []
    plain = tmp_path / "queries.txt"
    plain.write_text("solar energy\n\nmusic hall\n", encoding="utf-8")
    assert cmd_search(settings, None, "current", 1, False, None, str(plain)) == 0
    assert "solar" in capsys.readouterr().out
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"query": "ok"}\n{"no": "query"}\n', encoding="utf-8")
    assert cmd_search(settings, None, "current", 1, True, None, str(broken)) == 2
    assert "broken.jsonl:2" in capsys.readouterr().err


def test_eval_scores_what_search_serves(make_settings, start_daemon, tmp_path, capsys):
    """A BEIR folder whose corpus was fed as <id>.md: each mode's score is computed from search's hits."""
    from daemon.served_eval import cmd_eval_served

    documents = {f"d{i}.md": text for i, text in enumerate(ENGLISH.values())}
    settings, _layout, _conn, _report = _indexed(make_settings, start_daemon, documents)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    with open(beir / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for i, text in enumerate(ENGLISH.values()):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    questions = {
        "q1": ("river floods the valley", "d0"),
        "q2": ("database server backups", "d1"),
        "q3": ("violin orchestra", "d2"),
    }
    with open(beir / "queries.jsonl", "w", encoding="utf-8") as handle:
        for qid, (text, _doc) in questions.items():
            handle.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, (_t, d) in questions.items())
    )
    capsys.readouterr()  # the daemon's log lines so far
    assert cmd_eval_served(settings, str(beir), "current", "base", "ndcg@10", "all", True) == 0
    report = json.loads(capsys.readouterr().out)
    results = report["results"]
    assert set(results) == {"base hybrid", "base dense", "base lexical"}
    assert results["base lexical"]["ndcg@10"] == pytest.approx(1.0)  # every question names its document
    assert {g["row"] for g in report["gains"]} == {"base hybrid", "base lexical"}
    assert all(g["over"] == "base dense" for g in report["gains"])


def test_a_variant_encodes_each_set_once_for_its_dense_and_served_evaluation(tiny_embedder):
    """The dense and the served (hybrid) evaluators of the held-out set share one encoding of its
    corpus, queries and stand-ins; the results are those of evaluating each on its own."""
    from stages.encoder import EncodeParams, Encoder
    from stages.evalsets import EvalSet
    from stages.round_steps import HELDOUT, EvalPlan, build_evaluators, evaluate_variant

    corpus = [
        "river water flows to the sea",
        "solar energy power system",
        "城市 历史 音乐",
        "database server file",
    ]
    eval_set = EvalSet(
        HELDOUT,
        ["how do rivers form", "solar power", "城市历史"],
        corpus,
        [{0: 1.0}, {1: 1.0}, {2: 1.0}],
        stand_ins=[{}, {1: "energy system"}, {}],
    )
    evaluators = build_evaluators([eval_set], EvalPlan(served_mode="hybrid", bm25_weight=0.3))
    assert len(evaluators) == 2

    class Counting(Encoder):
        calls: list[tuple[str, int]] = []

        def passages(self, texts, keys=None):
            self.calls.append(("passages", len(texts)))
            return super().passages(texts, keys)

        def queries(self, texts):
            self.calls.append(("queries", len(texts)))
            return super().queries(texts)

    encoder = Counting(tiny_embedder, EncodeParams(device="cpu"))
    shared = evaluate_variant(encoder, evaluators)
    assert sorted(Counting.calls) == [("passages", 1), ("passages", 4), ("queries", 3)]
    alone = {e.name: e(Encoder(tiny_embedder, EncodeParams(device="cpu"))) for e in evaluators}
    for name, result in alone.items():
        assert shared[name].metrics == pytest.approx(result.metrics)
