"""Which collections hold the chunk change log back: real SQLite with the project's schema, and for the
whole sync Milvus Lite and a tiny real model."""

from __future__ import annotations

from pathlib import Path

from tests.test_index import _active_ids, _add_document, _alias_view, _ingested, _promote_copy


def _log_rows(conn) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM chunk_changes").fetchone()[0])


def test_a_collection_filled_but_never_swapped_live_does_not_stop_the_pruning(tmp_path):
    """Issue 35 (9): a promoted model's collection is filled, then a rollback leaves the base model serving,
    so it is never swapped live. Kept for a rollback, it stops following the log once a sync has decided
    what to keep; only the live collection (and the serving model's fill) hold rows back."""
    from state.db import Database
    from state.index_records import IndexRecords, change_seq

    conn = Database(tmp_path / "t.db").conn
    records = IndexRecords(conn)
    _add_document(conn, "/inbox/a.md", ["alpha text", "beta text"])
    records.create("base", None, "/base", 8, "standard")
    records.mark_synced("base", 2, "sig", change_seq(conn))
    records.make_live("base")
    records.create("promoted", 1, "/m1", 8, "standard")
    records.mark_synced("promoted", 2, "sig", change_seq(conn))
    filled_at = change_seq(conn)

    # while the promoted model serves, its filled collection keeps its place: the swap comes next
    assert records.surplus(2, "promoted") == [] and records.get("promoted").synced_seq == filled_at

    # rolled back before the swap: the base model's collection is the serving one again
    assert records.surplus(2, "base") == []  # still kept for a later rollback ...
    promoted = records.get("promoted")
    assert promoted.state == "ready" and promoted.synced_seq is None  # ... but no longer following the log
    for path in ("/inbox/b.md", "/inbox/c.md"):
        _add_document(conn, path, [f"text of {path}"])
    assert _log_rows(conn) == 2
    records.mark_synced("base", 4, "sig2", change_seq(conn))
    assert _log_rows(conn) == 0, "rows the live collection applied are pruned"
    assert records.get("base").synced_seq == change_seq(conn)


def test_a_fill_abandoned_by_a_rollback_is_kept_and_the_log_still_pruned(make_settings, start_daemon):
    """The same through the real sync: the model is rolled back while its collection fills (the swap is
    skipped), the abandoned collection is kept, and a later change is pruned once the live collection
    applied it."""
    from daemon.indexing import IndexService
    from state.db import Database
    from state.index_records import IndexRecords
    from state.registry import ModelRegistry

    settings, layout = _ingested(make_settings, start_daemon)
    conn = Database(layout.database).conn
    registry = ModelRegistry(conn, layout)

    class RolledBackDuringFill(IndexService):
        def _swap(self, conn, records, target):
            registry.rollback(Path(settings.model.base))  # what `embedtune rollback` does meanwhile
            return super()._swap(conn, records, target)

    base = IndexService(settings, layout).sync(conn)
    assert base.swapped
    _promote_copy(layout, conn, settings.model.base)
    abandoned = RolledBackDuringFill(settings, layout).sync(conn)
    assert not abandoned.swapped and abandoned.collection != base.collection
    records = IndexRecords(conn)
    assert records.get(abandoned.collection).state == "ready"  # kept for a rollback
    assert records.live().name == base.collection

    _add_document(conn, "/inbox/late.md", ["a late note about tides", "and one about kelp"])
    assert _log_rows(conn) > 0
    report = IndexService(settings, layout).sync(conn)
    assert report.collection == base.collection and report.added == 2
    assert _log_rows(conn) == 0, "the abandoned fill's position no longer holds the log back"
    assert _alias_view(settings) == (base.collection, _active_ids(conn))
