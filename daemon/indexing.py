"""The index follows the model: every active chunk, embedded by the model in service, in a Milvus collection
behind the alias that RAG clients query.

One operation, `sync`, does everything and is safe to repeat: it finds (or creates) the collection of the
model in service, compares the chunk ids it holds with the active chunks, deletes the retired ones and
encodes and upserts only the missing ones, batch by batch. Then, if that collection is not yet live, it
swaps the alias onto it in one Milvus call and drops collections beyond `index.keep_collections`.

- New documents: the daemon enqueues a sync when the active-chunk signature moves; only new chunks are
  encoded (with the embedding cache, chunks the filter or a round already encoded are not even that).
- A promotion: the new model has no collection; the sync fills one in the background while the alias
  still points at the old one (which keeps receiving new chunks), then swaps.
- A crash or kill mid-fill: the alias was never moved; the next sync finds the half-filled collection
  and adds what is missing.
- A rollback: the previous model's collection was kept, so the alias swaps back at once; a sync then adds
  chunks that arrived since.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon.logs import get_logger
from daemon.progress import Progress
from daemon.serving import NothingServed, Served, ServedResolver
from daemon.settings import Settings
from daemon.workers import JobContext, PermanentFailure, RetryLater
from state.db import transaction
from state.index_records import (
    LIVE,
    ActiveChunk,
    CollectionRecord,
    IndexRecords,
    active_chunk_ids,
    active_chunks,
    change_seq,
    changes_since,
    chunk_signature,
    has_active_chunks,
    max_chunk_id,
)
from state.index_stats import VectorStats, drop_stats, load_stats, save_stats
from state.layout import StateLayout
from state.queue import JobQueue
from state.vector_store import IndexRefused, IndexTarget, IndexUnavailable, VectorStore, open_store

log = get_logger("embedtune.index")
JOB_KIND = "index"
UNAVAILABLE_RETRY_S = 60.0
MAX_RETRY_S = 1800.0


def retry_delay(failures: int) -> float:
    """Wait after the n-th failure in a row: 60 s, doubling, at most 30 minutes."""
    return min(MAX_RETRY_S, UNAVAILABLE_RETRY_S * 2 ** max(0, failures - 1))


MAX_PASSES = 3


@dataclass
class SyncReport:
    collection: str = ""
    version: str = ""
    added: int = 0
    removed: int = 0
    chunks: int = 0
    swapped: bool = False
    dropped: list[str] = field(default_factory=list)


def index_target(settings: Settings) -> IndexTarget:
    lite = settings.index.lite_path(settings.paths.state_dir)
    return IndexTarget(
        uri=str(lite) if lite is not None else settings.index.uri,
        token=settings.index.token(),
        index_type=settings.index.index_type,
        lock_timeout_s=settings.index.lock_timeout_s,
    )


class IndexService:
    """Keeps the vector store in line with the model in service and the active chunks."""

    def __init__(
        self, settings: Settings, layout: StateLayout, *, show_progress: bool | None = False
    ) -> None:
        self.settings = settings
        self.layout = layout
        self.target = index_target(settings)
        self.show_progress = show_progress
        # The main loop's lookups never convert a packaged base; the sync (a job) may.
        self.lookup = ServedResolver(settings, layout)
        self.resolve = ServedResolver(settings, layout, convert=True)

    # --- the job ----------------------------------------------------------------------------------
    def handle(self, ctx: JobContext) -> None:
        records = IndexRecords(ctx.conn)
        try:
            report = self.sync(ctx.conn)
        except IndexRefused as exc:
            records.set_error(f"{exc} (refused: not retried until the daemon restarts)", refused=True)
            raise PermanentFailure(f"Milvus refused: {exc}") from exc
        except IndexUnavailable as exc:
            failures = records.set_error(str(exc))
            raise RetryLater(str(exc), retry_delay(failures)) from exc
        except NothingServed as exc:  # the model's folder went away meanwhile: status says why
            raise RetryLater(str(exc), UNAVAILABLE_RETRY_S) from exc
        records.set_error(None)
        ctx.queue.complete(ctx.job)
        if report.added or report.removed or report.swapped:
            log.info("index_synced", **report.__dict__)

    def needs_sync(self, conn: sqlite3.Connection) -> bool:
        """Cheap check for the main loop: is the live collection behind the chunks or the model?"""
        records = IndexRecords(conn)
        if records.refused():
            return False  # status says why; a restart tries again
        served = self.lookup(conn)
        if served.live is None:
            return has_active_chunks(conn)
        if served.path is None:
            # a chosen base that a lookup cannot use yet (a packaged one to convert): the sync converts it
            return bool(served.base_reference) and served.model_id is None
        if not served.live_is_current() or served.live.bm25_weight != served.bm25_weight:
            return True  # another model, or a collection to rebuild (dense only, another analyzer or share)
        return served.behind > 0 or served.live.signature != served.signature

    def enqueue(self, conn: sqlite3.Connection, reason: str, *, retry: bool = False) -> bool:
        """One pending sync at a time is enough: it reads the state when it runs. Each job's key names
        what it was asked for, so a dead job (a bug) is not re-armed until something changes; `retry`
        re-arms it (a restart after a refusal: the docs promise that a restart tries again)."""
        queue = JobQueue(conn)
        if queue.has_pending(JOB_KIND):
            return False
        served = self.lookup(conn)
        # the change log's position only grows: a chunk set that returns to an earlier signature (a file
        # reverted, or put back) still gets a new key; the share is in it so a changed share is applied
        key = f"index:{served.version}:{served.analyzer}:{served.bm25_weight}:{change_seq(conn)}:{reason}"
        return queue.enqueue(
            JOB_KIND, key, {"reason": reason}, priority=150, max_attempts=5, requeue_finished=retry
        )

    def retry_refused(self, conn: sqlite3.Connection) -> bool:
        """Start-up: a refusal recorded by the last run is cleared (the configuration may have changed)
        and a sync is asked for at once, even when the refused job's key is the one a sync would get now."""
        records = IndexRecords(conn)
        if not records.refused():
            return False
        records.clear_refusal()
        return self.enqueue(conn, "restart after refusal", retry=True)

    # --- the one operation ------------------------------------------------------------------------
    def sync(self, conn: sqlite3.Connection) -> SyncReport:
        records = IndexRecords(conn)
        served = self.resolve(conn)
        serving, analyzer, weight, live = served.model, served.analyzer, served.bm25_weight, served.live
        if self._up_to_date(conn, records, served):
            return SyncReport(collection=live.name, version=serving.version, chunks=live.chunks)
        with open_store(self.target) as store:
            self._reconcile(records, store)
            existing = set(store.collections())
        target = records.for_model(serving.model_id, str(serving.path), analyzer)
        if target is not None and target.name not in existing:
            records.mark_dropped(target.name)  # removed behind our back: fill a new one
            target = None
        encoders = _Encoders(self.settings, self.layout)
        report = SyncReport(version=serving.version)
        try:
            live = records.live()
            if live is not None and (target is None or live.name != target.name):
                self._top_up_live(conn, records, live, encoders, report)
            if target is None:
                target = self._create(records, serving, encoders, analyzer, weight)
            elif target.bm25_weight != weight:
                records.set_bm25_weight(target.name, weight)
            report.collection = target.name
            report.chunks = self._catch_up(conn, records, target, encoders.get(serving.path), report)
        finally:
            encoders.release()
        if records.get(target.name).state != LIVE:
            report.swapped = self._swap(conn, records, target)
        report.dropped = self._drop_surplus(records, serving, analyzer)
        return report

    @staticmethod
    def _up_to_date(conn: sqlite3.Connection, records: IndexRecords, served: Served) -> bool:
        """Nothing to do, known from SQLite alone: the live collection is the serving model's, with the
        served analyzer and share, and has applied the whole change log. Milvus is not opened (its alias is
        reconciled by the next sync that has work)."""
        live = served.live
        if live is None or live.synced_seq is None or live.synced_seq != change_seq(conn):
            return False
        target = records.for_model(served.model_id, str(served.path), served.analyzer)
        return (
            target is not None
            and target.name == live.name
            and live.bm25_weight == served.bm25_weight
            and live.signature == served.signature
        )

    def follow_serving(self, conn: sqlite3.Connection) -> CollectionRecord | None:
        """After a rollback: point the alias at the serving model's kept collection at once, if there is
        one (a sync then adds what arrived since). None when it must be filled first."""
        served = self.resolve(conn)
        records = IndexRecords(conn)
        target = records.for_model(served.model_id, str(served.folder()), served.analyzer)
        if target is None or target.state not in ("ready", LIVE):
            return None
        with open_store(self.target) as store:
            if not store.has(target.name):
                records.mark_dropped(target.name)
                return None
            store.point_alias(self.settings.index.alias, target.name)
            records.make_live(target.name)
        log.info("index_alias_swapped", alias=self.settings.index.alias, collection=target.name)
        return records.get(target.name)

    # --- steps ------------------------------------------------------------------------------------
    def _reconcile(self, records: IndexRecords, store: VectorStore) -> None:
        """Milvus's alias is the truth (the swap is one Milvus call; the row update may have been lost)."""
        actual = store.alias_target(self.settings.index.alias)
        live = records.live()
        if actual == (live.name if live else None):
            return
        if actual is not None and records.get(actual) is not None:
            records.make_live(actual)
        elif live is not None:
            records.clear_live()

    def _create(
        self,
        records: IndexRecords,
        serving,
        encoders: _Encoders,
        analyzer: str,
        weight: float,
    ) -> CollectionRecord:
        dim = encoders.get(serving.path).dimension()
        name = f"{self.settings.index.alias}_{serving.version}_{records.next_serial()}"
        # The row first: if creating the collection fails half-way (a full disk can leave Milvus Lite a
        # folder it no longer knows), the next sync finds the row without a collection, marks it dropped
        # and uses a fresh name instead of tripping over the leftover forever.
        record = records.create(name, serving.model_id, str(serving.path), dim, analyzer, weight)
        with open_store(self.target) as store:
            store.create(name, dim, analyzer)
        log.info(
            "index_collection_created", collection=name, model=serving.version, dim=dim, analyzer=analyzer
        )
        return record

    def _top_up_live(
        self,
        conn: sqlite3.Connection,
        records: IndexRecords,
        live: CollectionRecord,
        encoders: _Encoders,
        report: SyncReport,
    ) -> None:
        """While a new model's collection fills, the live one keeps following the documents."""
        if live.signature == chunk_signature(conn) or not Path(live.model_path).is_dir():
            return
        self._catch_up(conn, records, live, encoders.get(Path(live.model_path)), SyncReport())

    def _catch_up(
        self,
        conn: sqlite3.Connection,
        records: IndexRecords,
        collection: CollectionRecord,
        encoder: _LazyEncoder,
        report: SyncReport,
    ) -> int:
        """Bring a collection to the active chunks; returns how many it holds. A collection that knows
        its position in the change log applies the changes after it (O(changes): a sync with nothing to
        do reads one row); a new one, or one from before the log, is filled by a full pass, which compares
        every active chunk with the ids the store holds and records the position it started from."""
        if collection.synced_seq is not None:
            # the changes, the signature and the count come from one snapshot: a chunk arriving meanwhile
            # is in none of them and the next sync applies it
            changes = changes_since(conn, collection.synced_seq)
            if changes.removed:
                with open_store(self.target) as store:
                    store.delete(collection.name, changes.removed)
                report.removed += len(changes.removed)
            self._upsert(records, collection, changes.added, encoder, report)
            records.mark_synced(collection.name, changes.count, changes.signature, changes.seq)
            self._refresh_stats(collection.name, changes.count, lambda: active_chunk_ids(conn))
            return changes.count
        for _ in range(MAX_PASSES):
            with transaction(conn, immediate=False):  # one snapshot: changes after `seq` are the next sync's
                signature, seq, chunks = chunk_signature(conn), change_seq(conn), active_chunks(conn)
            self._fill(records, collection, chunks, encoder, report)
            if chunk_signature(conn) == signature:
                break
        records.mark_synced(collection.name, len(chunks), signature, seq)
        self._refresh_stats(collection.name, len(chunks), lambda: [chunk.id for chunk in chunks])
        return len(chunks)

    def _fill(
        self,
        records: IndexRecords,
        collection: CollectionRecord,
        chunks: list[ActiveChunk],
        encoder: _LazyEncoder,
        report: SyncReport,
    ) -> None:
        with open_store(self.target) as store:
            present = store.ids(collection.name, max_chunk_id(records.conn))
        wanted = {chunk.id for chunk in chunks}
        extra = sorted(present - wanted)
        if extra:
            with open_store(self.target) as store:
                store.delete(collection.name, extra)
            report.removed += len(extra)
        self._upsert(
            records, collection, [chunk for chunk in chunks if chunk.id not in present], encoder, report
        )

    def _upsert(
        self,
        records: IndexRecords,
        collection: CollectionRecord,
        missing: list[ActiveChunk],
        encoder: _LazyEncoder,
        report: SyncReport,
    ) -> None:
        if not missing:
            return
        from daemon.child_process import stop_deferred, stop_requested

        batch_size = self.settings.index.batch_size
        with (
            Progress(f"index {collection.name}", len(missing), "chunks", bar=self.show_progress) as progress,
            stop_deferred(),  # a SIGTERM ends the job between two whole batches, within the stop budget
        ):
            for start in range(0, len(missing), batch_size):
                if stop_requested():  # the store keeps whole batches: the next sync adds only the rest
                    raise RetryLater("the daemon is stopping; the next sync resumes this fill", 0.0)
                batch = missing[start : start + batch_size]
                vectors = encoder.passages(batch)
                with open_store(self.target) as store:
                    store.upsert(
                        collection.name,
                        [c.id for c in batch],
                        vectors,
                        [c.path for c in batch],
                        [c.text for c in batch],
                    )
                report.added += len(batch)
                progress.update(len(batch))
                records.set_progress(collection.name, f"{start + len(batch)}/{len(missing)}")
        encoder.save_cache()

    def _refresh_stats(self, name: str, count: int, chunk_ids: Callable[[], list[int]]) -> None:
        """Redraw the collection's vector sample when there is none or the corpus changed by a tenth:
        the covariance moves slowly with the corpus, and a redraw reads up to 2,000 stored vectors."""
        from stages.fusion import stats_sample, vector_covariance

        folder = self.layout.index_stats
        known = load_stats(folder, name)
        if not count or (known is not None and abs(known.chunks - count) <= 0.1 * known.chunks):
            return
        chunk_ids = chunk_ids()
        sample = np.asarray(chunk_ids)[stats_sample(len(chunk_ids))]
        with open_store(self.target) as store:
            vectors = store.vectors_of(name, [int(i) for i in sample])
        if vectors:
            covariance = vector_covariance(np.stack(list(vectors.values())))
            save_stats(folder, name, VectorStats(covariance, len(chunk_ids)))

    def _swap(self, conn: sqlite3.Connection, records: IndexRecords, target: CollectionRecord) -> bool:
        """Swap the alias, unless the model changed meanwhile (a rollback during the fill)."""
        with open_store(self.target) as store:
            serving = self.resolve(conn)
            if (serving.model_id, str(serving.path)) != (target.model_id, target.model_path):
                log.info("index_swap_skipped", collection=target.name, serving=serving.version)
                return False
            store.point_alias(self.settings.index.alias, target.name)
            records.make_live(target.name)
        log.info("index_alias_swapped", alias=self.settings.index.alias, collection=target.name)
        return True

    def _drop_surplus(self, records: IndexRecords, serving, analyzer: str) -> list[str]:
        current = records.for_model(serving.model_id, str(serving.path), analyzer)
        surplus = records.surplus(self.settings.index.keep_collections, current.name if current else None)
        if not surplus:
            return []
        with open_store(self.target) as store:
            for record in surplus:
                store.drop(record.name)
                records.mark_dropped(record.name)
                drop_stats(self.layout.index_stats, record.name)
        names = [record.name for record in surplus]
        log.info("index_collections_dropped", collections=names)
        return names


class _LazyEncoder:
    """Loads the model on first use: a sync with nothing to encode never loads one."""

    def __init__(self, settings: Settings, layout: StateLayout, path: Path) -> None:
        self.settings = settings
        self.layout = layout
        self.path = path
        self._encoder = None

    def _get(self):
        if self._encoder is None:
            from daemon.step_params import encode_params
            from stages.encoder import Encoder

            self._encoder = Encoder(self.path, encode_params(self.settings), self.layout.cache)
            log.info(
                "index_encoder",
                model=str(self.path),
                runtime=self._encoder.runtime,
                reason=self._encoder.runtime_reason,
            )
        return self._encoder

    def dimension(self) -> int:
        model = self._get().model
        return int(
            model.get_embedding_dimension()
            if hasattr(model, "get_embedding_dimension")
            else model.get_sentence_embedding_dimension()
        )

    def passages(self, chunks: list[ActiveChunk]):
        return self._get().passages([c.text for c in chunks])  # cached by text hash, as rounds do

    def save_cache(self) -> None:
        if self._encoder is not None:
            self._encoder.save_cache()

    def release(self) -> None:
        if self._encoder is not None:
            self._encoder.release()
            self._encoder = None


class _Encoders:
    def __init__(self, settings: Settings, layout: StateLayout) -> None:
        self.settings = settings
        self.layout = layout
        self._by_path: dict[Path, _LazyEncoder] = {}

    def get(self, path: Path) -> _LazyEncoder:
        if path not in self._by_path:
            self._by_path[path] = _LazyEncoder(self.settings, self.layout, path)
        return self._by_path[path]

    def release(self) -> None:
        for encoder in self._by_path.values():
            encoder.release()
        self._by_path.clear()
