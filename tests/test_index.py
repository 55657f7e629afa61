"""The vector store follows the model in service: Milvus Lite for real, tiny real models, a real daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.test_rounds import _corpus, _round_settings


def _alias_view(settings):
    """(collection behind the alias, its chunk ids) read from Milvus Lite itself."""
    from daemon.indexing import index_target
    from state.db import connect
    from state.index_records import max_chunk_id
    from state.vector_store import open_store

    conn = connect(settings.paths.state_dir / "embedtune.db", readonly=True)
    upper = max_chunk_id(conn)
    conn.close()
    with open_store(index_target(settings)) as store:
        target = store.alias_target(settings.index.alias)
        return target, (store.ids(target, upper) if target else set())


def _active_ids(conn) -> set[int]:
    return {row[0] for row in conn.execute("SELECT id FROM chunks WHERE active = 1")}


def _records(conn):
    from state.index_records import IndexRecords

    return IndexRecords(conn)


def test_index_follows_documents_promotion_deletion_and_rollback(make_settings, start_daemon):
    from daemon.cli import cmd_rollback
    from daemon.indexing import IndexService
    from state.db import Database

    settings = _round_settings(make_settings, check_minutes=0.1)
    _corpus(settings.paths.inbox)
    running = start_daemon(settings)
    layout = running.daemon.layout

    # 1. before any promotion the base model's collection serves every active chunk
    def base_live():
        live = _records(running.conn).live()
        return live if live and live.model_id is None and live.signature else None

    base = wait_for(base_live, timeout=120, message="the base model's collection to go live")
    target, ids = _alias_view(settings)
    assert target == base.name and ids == _active_ids(running.conn) and ids

    # 2. a round promotes: a new collection is filled by the promoted model, then the alias swaps
    def promoted():
        row = running.query("SELECT * FROM rounds WHERE state != 'running' ORDER BY id DESC")
        return row[0] if row else None

    row = wait_for(promoted, timeout=240, message="a round to finish")
    assert row["decision"] == "promoted", row["reason"]
    model_id = row["model_id"]
    live = wait_for(
        lambda: (lambda r: r if r and r.model_id == model_id else None)(_records(running.conn).live()),
        timeout=120,
        message="the promoted model's collection to go live",
    )
    target, ids = _alias_view(settings)
    assert target == live.name != base.name and ids == _active_ids(running.conn)
    assert _records(running.conn).get(base.name).state == "ready"  # kept for rollback

    # 3. a deleted document's chunks leave the live collection
    before = _active_ids(running.conn)
    (settings.paths.inbox / "doc0.md").unlink()
    wait_for(lambda: _active_ids(running.conn) < before, timeout=30, message="doc0's chunks to retire")
    wait_for(lambda: _alias_view(settings)[1] == _active_ids(running.conn), timeout=60, message="the delete")
    status = running.status()
    assert status["index"]["live"]["name"] == live.name
    running.stop()

    # 4. rollback swaps the alias back to the kept base collection at once; a sync removes doc0 from it
    assert cmd_rollback(settings) == 0
    target, ids = _alias_view(settings)
    assert target == base.name and ids > _active_ids(Database(layout.database).conn)
    conn = Database(layout.database).conn
    assert conn.execute("SELECT COUNT(*) FROM jobs WHERE kind = 'index' AND state = 'pending'").fetchone()[0]
    report = IndexService(settings, layout).sync(conn)
    assert report.collection == base.name and report.removed > 0 and not report.swapped
    assert _alias_view(settings) == (base.name, _active_ids(conn))


def _ingested(make_settings, start_daemon, **index):
    """A state folder with ingested chunks (the daemon's index off), and settings with the index on."""
    settings = make_settings(index={"enabled": False})
    _corpus(settings.paths.inbox, documents=6)
    running = start_daemon(settings)
    wait_for(lambda: running.scalar("SELECT COUNT(*) FROM chunks WHERE active = 1") >= 6)
    wait_for(running.idle, timeout=60)
    # with the index off nothing follows the chunk change log: the main loop prunes it
    wait_for(lambda: running.scalar("SELECT COUNT(*) FROM chunk_changes") == 0, message="change log pruned")
    running.stop()
    data = settings.model_dump(mode="json")
    data["index"] = {"enabled": True, **index}
    return type(settings).model_validate(data), running.daemon.layout


def _promote_copy(layout, conn, model_path):
    from state.registry import ModelRegistry

    registry = ModelRegistry(conn, layout)
    record = registry.register(Path(model_path))
    return registry.promote(record.id)


def test_interrupted_fill_keeps_the_alias_and_resumes_where_it_stopped(
    make_settings, start_daemon, monkeypatch
):
    from daemon import indexing
    from daemon.indexing import IndexService
    from state.db import Database

    settings, layout = _ingested(make_settings, start_daemon, batch_size=4)
    conn = Database(layout.database).conn
    service = IndexService(settings, layout)
    first = service.sync(conn)
    assert first.swapped and first.added == len(_active_ids(conn))
    assert _alias_view(settings) == (first.collection, _active_ids(conn))

    promoted = _promote_copy(layout, conn, settings.model.base)
    calls = {"n": 0}
    original = indexing._LazyEncoder.passages

    def dies_on_second_batch(self, chunks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed mid-fill")
        return original(self, chunks)

    monkeypatch.setattr(indexing._LazyEncoder, "passages", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="killed mid-fill"):
        service.sync(conn)
    monkeypatch.setattr(indexing._LazyEncoder, "passages", original)
    filling = _records(conn).for_model(promoted.id, str(promoted.path), "standard")
    assert filling.state == "filling"
    assert _alias_view(settings)[0] == first.collection  # clients still get the old, complete collection

    resumed = service.sync(conn)
    assert resumed.collection == filling.name and resumed.swapped
    assert resumed.added == len(_active_ids(conn)) - 4  # only what the first attempt had not written
    assert _alias_view(settings) == (filling.name, _active_ids(conn))
    assert _records(conn).get(first.collection).state == "ready"


def test_collections_beyond_keep_are_dropped(make_settings, start_daemon):
    from daemon.indexing import IndexService, index_target
    from state.db import Database
    from state.vector_store import open_store

    settings, layout = _ingested(make_settings, start_daemon, keep_collections=1)
    conn = Database(layout.database).conn
    service = IndexService(settings, layout)
    names = [service.sync(conn).collection]
    for _ in range(2):
        _promote_copy(layout, conn, settings.model.base)
        names.append(service.sync(conn).collection)
    with open_store(index_target(settings)) as store:
        present = set(store.collections())
    assert present == {names[1], names[2]}  # the live one and one kept for rollback
    assert _records(conn).get(names[0]).state == "dropped"


def test_unreachable_milvus_server_is_a_clear_retried_error(make_settings, start_daemon):
    from daemon.indexing import IndexService
    from daemon.workers import JobContext, RetryLater
    from state.db import Database
    from state.queue import JobQueue
    from state.status import format_status, read_status

    settings, layout = _ingested(make_settings, start_daemon, uri="http://127.0.0.1:9")
    conn = Database(layout.database).conn
    service = IndexService(settings, layout)
    assert service.needs_sync(conn) and service.enqueue(conn, "test")
    queue = JobQueue(conn)
    job = queue.claim("test", ["index"])
    with pytest.raises(RetryLater) as caught:
        service.handle(JobContext(job, queue))
    assert "Milvus at http://127.0.0.1:9" in str(caught.value) and "index.uri" in str(caught.value)
    assert caught.value.delay == 60.0
    text = format_status(read_status(layout))
    assert "index" in text and "cannot open Milvus at http://127.0.0.1:9" in text
    queue.postpone(job, 0.0, str(caught.value))  # what the worker pool does with a RetryLater
    with pytest.raises(RetryLater) as again:
        service.handle(JobContext(queue.claim("test", ["index"]), queue))
    assert again.value.delay == 120.0  # a server that stays down is asked less and less often


def test_milvus_errors_that_retrying_cannot_fix_are_refusals():
    from pymilvus.exceptions import MilvusException, ParamError

    from state.vector_store import is_refusal

    assert is_refusal(ParamError(message="invalid dimension"))
    assert is_refusal(MilvusException(code=1800, message="auth check failure, please check username"))
    assert is_refusal(MilvusException(code=1, message="denied", compatible_code=3))  # PermissionDenied
    assert not is_refusal(MilvusException(code=2, message="Fail connecting to server on 127.0.0.1:9"))
    assert not is_refusal(OSError(28, "No space left on device"))


def test_refusal_words_inside_a_path_or_address_are_no_refusal():
    """Issue 35 (11): a refusal switches the index off until a restart, so a transient fault whose message
    names /srv/authors/… or /home/privileged/… must stay a fault; codes decide before words do."""
    import grpc
    from pymilvus.exceptions import MilvusException

    from state.vector_store import is_refusal

    class RpcError(grpc.RpcError):  # what pymilvus raises from, with the status the server sent
        def __init__(self, status: grpc.StatusCode) -> None:
            self.status = status

        def code(self) -> grpc.StatusCode:
            return self.status

    def raised_from(exc: Exception, cause: BaseException) -> Exception:
        exc.__cause__ = cause
        return exc

    transient = [
        MilvusException(message="Unexpected error, message=<database is locked: /srv/authors/milvus.db>"),
        MilvusException(code=2, message="Fail connecting to server on auth.internal:19530"),
        MilvusException(message="segment flush failed under /home/privileged/state/milvus.db, retry later"),
        MilvusException(code=2, message="timed out: https://authz.example.com/milvus, permission denied/x"),
        raised_from(
            MilvusException(message="Unexpected error, message=<[Errno 28] No space left on device>"),
            OSError(28, "No space left on device"),
        ),
        raised_from(
            MilvusException(code=2, message="Fail connecting to server on auth:19530, server unavailable"),
            RpcError(grpc.StatusCode.UNAVAILABLE),
        ),
    ]
    assert [is_refusal(exc) for exc in transient] == [False] * len(transient)
    refused = [
        MilvusException(code=1401, message="PrivilegeInsert: permission deny to alice"),
        MilvusException(code=1400, message="not authenticated"),
        MilvusException(code=1100, message="invalid parameter[expected=dim 8][actual=dim 16]"),
        MilvusException(message="Authentication failed for user root at /srv/authors/milvus.db"),
        RpcError(grpc.StatusCode.UNAUTHENTICATED),
        raised_from(  # a wrong token at connect: pymilvus says "cannot connect", gRPC says why
            MilvusException(code=2, message="Fail connecting to server on 10.0.0.5:19530"),
            RpcError(grpc.StatusCode.UNAUTHENTICATED),
        ),
    ]
    assert [is_refusal(exc) for exc in refused] == [True] * len(refused)


def test_a_refused_index_is_not_retried_until_the_daemon_restarts(make_settings, start_daemon):
    """Milvus Lite cannot refuse a request, so the sync is replaced by one that raises what open_store
    raises for a refusal; the rest (job, status, main-loop check, restart) is the product's."""
    from daemon.indexing import IndexService
    from daemon.workers import JobContext, PermanentFailure
    from state.db import Database
    from state.index_records import IndexRecords
    from state.queue import JobQueue
    from state.status import format_status, read_status
    from state.vector_store import IndexRefused

    class RefusedService(IndexService):
        def sync(self, conn):
            raise IndexRefused("Milvus at http://milvus:19530 failed: auth check failure")

    settings, layout = _ingested(make_settings, start_daemon, uri="http://127.0.0.1:9")
    conn = Database(layout.database).conn
    service = RefusedService(settings, layout)
    assert service.needs_sync(conn) and service.enqueue(conn, "test")
    queue = JobQueue(conn)
    with pytest.raises(PermanentFailure, match="Milvus refused"):
        service.handle(JobContext(queue.claim("test", ["index"]), queue))
    assert not service.needs_sync(conn)  # the main loop stops starting children for it
    assert "auth check failure (refused: not retried until the daemon restarts)" in format_status(
        read_status(layout)
    )
    IndexRecords(conn).clear_refusal()  # what a restart does
    assert service.needs_sync(conn)


def test_index_settings_are_validated_with_the_key_named():
    from daemon.settings import Settings

    with pytest.raises(ValueError, match="index.alias"):
        Settings.model_validate({"index": {"alias": "bad-name"}})
    with pytest.raises(ValueError, match="index.uri"):
        Settings.model_validate({"index": {"uri": "milvus.internal"}})


def _add_document(conn, path: str, texts: list[str]) -> list[int]:
    """One document stored as the ingest job stores it; returns its chunk ids."""
    import hashlib

    from state.documents import DocumentStore, NewChunk
    from state.queue import JobQueue

    queue = JobQueue(conn)
    store = DocumentStore(conn, queue)
    body = "\n\n".join(texts).encode()
    store.file_seen(path, len(body), 1.0)
    job = queue.claim("test", ["ingest"])
    chunks = [
        NewChunk(i, text, "", hashlib.sha256(text.encode()).hexdigest(), "en") for i, text in enumerate(texts)
    ]
    store.store_version(
        job, job.payload["document_id"], hashlib.sha256(body).hexdigest(), len(body), 1.0, "en", chunks, 0.1
    )
    return [
        row[0]
        for row in conn.execute(
            "SELECT id FROM chunks WHERE document_id = ? AND active = 1", (job.payload["document_id"],)
        )
    ]


def test_a_sync_reads_only_what_changed_since_the_last_one(make_settings, start_daemon, monkeypatch):
    """Issue 26: the index follows a change log, so a sync with nothing to do reads neither the chunks nor
    the store's ids, and one with k changes encodes and deletes exactly those k."""
    from daemon import indexing
    from daemon.indexing import IndexService
    from state.db import Database
    from state.documents import DocumentStore
    from state.index_records import change_seq

    settings, layout = _ingested(make_settings, start_daemon)
    conn = Database(layout.database).conn
    service = IndexService(settings, layout)
    first = service.sync(conn)  # a new collection: one full pass, which records its place in the log
    live = _records(conn).live()
    assert first.swapped and live.synced_seq == change_seq(conn)
    assert conn.execute("SELECT COUNT(*) FROM chunk_changes").fetchone()[0] == 0, "applied rows are pruned"

    full_reads: list[str] = []  # what a sync read in full: the corpus, or the store's ids
    for owner, name in ((indexing, "active_chunks"), (indexing.VectorStore, "ids")):
        original_read = getattr(owner, name)
        monkeypatch.setattr(
            owner,
            name,
            lambda *a, _f=original_read, _n=name, **k: full_reads.append(_n) or _f(*a, **k),
        )
    encoded: list[int] = []
    original = indexing._LazyEncoder.passages
    monkeypatch.setattr(
        indexing._LazyEncoder,
        "passages",
        lambda self, chunks: encoded.extend(c.id for c in chunks) or original(self, chunks),
    )

    opened: list[int] = []
    original_open = indexing.open_store
    monkeypatch.setattr(indexing, "open_store", lambda target: opened.append(1) or original_open(target))
    noop = service.sync(conn)
    assert (noop.added, noop.removed, noop.swapped) == (0, 0, False) and not encoded and not full_reads
    assert not opened, "a sync with nothing to do is answered from SQLite, without opening Milvus"

    new_ids = _add_document(
        conn, "/inbox/new.md", ["tidal power plants in estuaries", "kelp forests shelter fish"]
    )
    report = service.sync(conn)
    assert report.added == 2 and sorted(encoded) == sorted(new_ids) and not full_reads
    assert _alias_view(settings) == (live.name, _active_ids(conn))

    # a retired document's chunks are deleted; a chunk added and retired between two syncs is never encoded
    encoded.clear()
    gone_ids = _add_document(conn, "/inbox/brief.md", ["a note that lives for a moment"])
    store = DocumentStore(conn)
    store.file_deleted("/inbox/brief.md")
    store.file_deleted("/inbox/new.md")
    full_reads.clear()
    report = service.sync(conn)
    assert not encoded and not full_reads and report.removed == len(new_ids) + len(gone_ids)
    assert _alias_view(settings) == (live.name, _active_ids(conn))
    record = _records(conn).live()
    assert record.chunks == len(_active_ids(conn)) and record.synced_seq == change_seq(conn)
    assert not service.needs_sync(conn)


def test_the_change_log_keeps_what_a_following_collection_still_needs(tmp_path):
    """State only: rows are pruned once every collection that follows the log has applied them; a collection
    that stops being live forgets its position (its next sync is a full pass) and holds nothing back."""
    from state.db import Database
    from state.documents import DocumentStore
    from state.index_records import change_seq, changes_since

    conn = Database(tmp_path / "t.db").conn
    records = _records(conn)
    first = _add_document(conn, "/inbox/a.md", ["alpha text", "beta text"])
    assert changes_since(conn, 0).added and [c.id for c in changes_since(conn, 0).added] == first
    records.create("old", None, "/m", 8, "standard")
    records.create("new", 1, "/m1", 8, "standard")
    records.mark_synced("new", 0, "sig", 0)  # a collection whose position is before every row
    records.mark_synced("old", 2, "sig", change_seq(conn))
    records.make_live("old")
    second = _add_document(conn, "/inbox/b.md", ["gamma text"])
    assert conn.execute("SELECT COUNT(*) FROM chunk_changes").fetchone()[0] == 3, (
        "'new' still needs every row"
    )

    DocumentStore(conn).file_deleted("/inbox/a.md")
    changes = changes_since(conn, records.get("old").synced_seq)
    assert [c.id for c in changes.added] == second and changes.removed == first
    records.mark_synced("new", 1, "sig", change_seq(conn))
    records.make_live("new")
    assert records.get("old").synced_seq is None and records.get("old").state == "ready"
    records.mark_synced("new", 1, "sig", change_seq(conn))
    assert conn.execute("SELECT COUNT(*) FROM chunk_changes").fetchone()[0] == 0
    nothing = changes_since(conn, change_seq(conn))
    assert (nothing.seq, nothing.added, nothing.removed) == (change_seq(conn), [], [])

    # the index turned off: the log goes, and so does every position (a full pass if it is turned on again)
    _add_document(conn, "/inbox/c.md", ["delta text"])
    assert records.forget_changes() == 1 and records.forget_changes() == 0
    assert all(record.synced_seq is None for record in (records.get("old"), records.get("new")))
