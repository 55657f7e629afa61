"""The memory replica `embedtune serve` answers from (stages/memory_index.py, daemon/serve_index.py):
BM25 as Milvus Lite scores it, dense as exact search, changes equal to a rebuild, and the server's answers
equal to the collection's. Real Milvus Lite, real SQLite, a real server on 127.0.0.1; tests wait on
state, never on time."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from tests.conftest import wait_for
from tests.test_index import _add_document
from tests.test_served import _state


@dataclass(frozen=True)
class _Chunk:
    id: int
    path: str
    text: str


ENGLISH = [
    "Rivers carve valleys over millions of years, and the valley floor widens.",
    "Glaciers move slowly; a glacier's ice carves U-shaped valleys.",
    "Lava builds islands: volcanic islands rise from the sea floor.",
    "Tides rise twice a day along the coast, pulled by the moon's gravity and the sun.",
    "stop_me now: don't let the river_bank erode, e.g. with 3.14 naive cafe fixes",
    "Wind erodes rock in deserts, carving arches and the odd valley or two valleys valleys.",
    "The sea floor spreads where plates part; magma rises and cools into new crust.",
    "Rain falls, rivers flow, lakes fill: the water cycle runs on the sun's heat.",
]
CHINESE = [
    "河流在数百万年间侵蚀山谷，形成了峡谷。",
    "冰川缓慢移动，冰川的冰雕刻出U形山谷。",
    "熔岩形成岛屿：火山岛从海底升起。",
    "潮汐每天涨落两次，受月球引力影响。什么是BM25?",
    "风在沙漠中侵蚀岩石，形成拱门和山谷。",
    "雨水落下，河流流动，湖泊充满：水循环依靠太阳的热量。",
]
QUERIES = {
    "standard": [
        "what carves valleys",
        "river_bank",
        "sea floor magma",
        "valleys valleys sun",
        "don t",
        "3 14",
    ],
    "jieba": ["什么侵蚀山谷", "冰川 移动", "火山岛", "BM25 是什么", "河流 河流 太阳", "rivers carve"],
}


def _vectors(count: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    matrix = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def _corpus(analyzer: str) -> list[_Chunk]:
    texts = ENGLISH if analyzer == "standard" else CHINESE + ENGLISH[:3]
    return [_Chunk(10 + 3 * i, f"/d/{i}.md", text) for i, text in enumerate(texts)]


def _ranked(hits) -> list[tuple[int, float]]:
    return [(hit.chunk_id, hit.score) for hit in hits]


@pytest.mark.parametrize("analyzer", ["standard", "jieba"])
def test_bm25_ranks_as_milvus_lite_and_dense_as_exact_search(analyzer, tmp_path):
    from stages.memory_index import MemoryIndex
    from state.vector_store import IndexTarget, open_store

    chunks = _corpus(analyzer)
    vectors = _vectors(len(chunks))
    replica = MemoryIndex.build(chunks[::-1], vectors[::-1], analyzer)  # any order in, id order kept
    assert replica.ids.tolist() == [c.id for c in chunks]
    queries = _vectors(3, seed=1)
    with open_store(IndexTarget(str(tmp_path / "milvus.db"), "")) as store:
        store.create("c", vectors.shape[1], analyzer)
        store.upsert("c", [c.id for c in chunks], vectors, [c.path for c in chunks], [c.text for c in chunks])
        for query in QUERIES[analyzer]:
            theirs = store.search_text("c", [query], 20)[0]
            ours = replica.lexical([query], 20)[0]
            assert [i for i, _ in _ranked(ours)] == [i for i, _ in _ranked(theirs)], query
            # the same formula; Milvus' document lengths differ by a few percent (measured: at most 5%)
            assert [s for _, s in _ranked(ours)] == pytest.approx([s for _, s in _ranked(theirs)], rel=0.08)
        milvus_dense = store.search("c", queries, 4)
    exact = queries @ vectors.T
    for row, hits in enumerate(replica.dense(queries, 4)):
        order = np.argsort(-exact[row], kind="stable")[:4]
        assert [h.chunk_id for h in hits] == [chunks[i].id for i in order]
        assert [h.score for h in hits] == pytest.approx(exact[row][order].tolist(), abs=1e-6)
        assert [h.chunk_id for h in hits] == [h.chunk_id for h in milvus_dense[row]]
    assert replica.lexical(["zzzz unknownword"], 5) == [[]]  # no query term in any chunk: nothing
    found = replica.vectors_of([chunks[2].id, 999])
    assert list(found) == [chunks[2].id] and np.allclose(found[chunks[2].id], vectors[2])


@pytest.mark.parametrize("analyzer", ["standard", "jieba"])
def test_with_changes_equals_a_full_rebuild(analyzer):
    from stages.memory_index import MemoryIndex

    chunks = _corpus(analyzer)
    vectors = _vectors(len(chunks) + 3, seed=2)
    extra = [
        _Chunk(100, "/d/new.md", "a brand new chunk about valleys and rivers 河流"),
        _Chunk(5, "/d/old.md", "an early id arriving late: lava and sea"),
        _Chunk(chunks[1].id, "/d/again.md", "a replaced chunk: glaciers carve 冰川"),
    ]
    before = MemoryIndex.build(chunks, vectors[: len(chunks)], analyzer)
    removed = [chunks[0].id, chunks[3].id, 12345]  # an id never held is ignored
    changed = before.with_changes(extra, vectors[len(chunks) :], removed)
    kept = [(c, v) for c, v in zip(chunks, vectors, strict=False) if c.id not in {*removed, chunks[1].id}]
    rows = kept + list(zip(extra, vectors[len(chunks) :], strict=True))
    rebuilt = MemoryIndex.build([c for c, _ in rows], np.stack([v for _, v in rows]), analyzer)
    assert changed.ids.tolist() == rebuilt.ids.tolist() and changed.signature == rebuilt.signature
    assert changed.texts == rebuilt.texts and changed.paths == rebuilt.paths
    assert np.array_equal(changed.vectors, rebuilt.vectors)
    queries = QUERIES[analyzer] + ["valleys rivers lava", "brand new", "冰川 河流"]
    for ours, theirs in zip(changed.lexical(queries, 10), rebuilt.lexical(queries, 10), strict=True):
        assert [h.chunk_id for h in ours] == [h.chunk_id for h in theirs]
        assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], rel=1e-5)
    probe = _vectors(2, seed=3)
    assert _ranked(changed.dense(probe, 5)[0]) == _ranked(rebuilt.dense(probe, 5)[0])
    assert np.allclose(changed.covariance, rebuilt.covariance)
    assert before.size == len(chunks)  # the replica it was made from is unchanged
    # in id order only (the common case, ids only grow): the same as a rebuild too
    grown = before.with_changes(extra[:1], vectors[len(chunks) : len(chunks) + 1], [])
    assert grown.ids.tolist() == sorted(grown.ids.tolist()) and grown.size == len(chunks) + 1


def test_a_replica_built_before_any_chunk_takes_the_first_ones():
    """A replica of an empty collection (0 x 0 vectors) grows with the first chunks (it raised on every
    poll before, leaving /v1/search without hits while /health said ready)."""
    from stages.memory_index import MemoryIndex

    empty = MemoryIndex.build([], np.zeros((0, 0), np.float32), "standard")
    grown = empty.with_changes([_Chunk(7, "/d/a.md", "rivers carve valleys")], _vectors(1, seed=4), [])
    assert grown.size == 1 and grown.vectors.shape == (1, _vectors(1, seed=4).shape[1])
    assert [h.chunk_id for h in grown.lexical(["valleys"], 3)[0]] == [7]


def test_the_server_answers_from_the_replica_as_the_collection_does_and_follows_new_chunks(make_settings):
    from daemon.indexing import IndexService
    from daemon.search import search_many
    from daemon.serve import serve_in_thread

    settings = make_settings(index={"enabled": True, "lock_timeout_s": 10.0})
    layout, db = _state(settings)
    _add_document(db.conn, "/inbox/coast.md", ["tides rise twice a day along the coast of valleys"])
    assert IndexService(settings, layout).sync(db.conn).swapped
    live = db.conn.execute("SELECT name FROM index_collections WHERE state = 'live'").fetchone()[0]
    server, state, thread, url = serve_in_thread(settings)
    try:
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, message="ready with its replica")
        assert state.current.replica is not None and state.current.replica.name == live
        questions = ["what carves valleys", "mountains and rain", "lava islands"]
        answers = {
            mode: httpx.post(
                f"{url}/v1/search", json={"queries": questions, "k": 3, "mode": mode}, timeout=120
            ).json()["answers"]
            for mode in ("hybrid", "dense", "lexical")
        }
        # the CLI's path over the same chunks: the Milvus collection
        expected = {mode: search_many(settings, questions, k=3, mode=mode) for mode in answers}
        # a chunk added after the replica was built: the server waits for the index job to encode it (it
        # does not encode the same chunks a second time on the same cores), then follows the change log
        replica = state.current.replica
        before = replica.size
        new_ids = _add_document(db.conn, "/inbox/new.md", ["quasars outshine whole galaxies"])
        wait_for(lambda: replica._waiting_since is not None, message="a poll that saw the uncached chunk")
        assert replica.size == before  # not applied yet: its vector is not in the cache
        IndexService(settings, layout).sync(db.conn)  # the daemon's index job: encodes and caches it

        def found_new():
            body = httpx.post(
                f"{url}/v1/search", json={"query": "quasars", "mode": "lexical"}, timeout=60
            ).json()
            return [h["chunk_id"] for h in body["hits"]] == new_ids

        wait_for(found_new, message="the new chunk in the replica")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        state.stop()
    for mode, got in answers.items():
        for answer, theirs in zip(got, expected[mode], strict=True):
            assert answer["source"] == f"memory replica of {live}" and theirs.source == f"collection {live}"
            assert answer["model"] == theirs.model
            assert [h["chunk_id"] for h in answer["hits"]] == [h.chunk_id for h in theirs.hits], (
                mode,
                answer,
            )
