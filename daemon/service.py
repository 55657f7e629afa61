"""The daemon: composes watcher, worker pools, scheduler and round manager; owns signals and systemd.

Signal handlers only set flags; the main loop acts on them.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

from daemon.ingest_process import IngestProcesses, ingest_process_count
from daemon.lock import AlreadyRunning, InstanceLock
from daemon.logs import configure_logging, get_logger
from daemon.notify import Notifier
from daemon.onnx_jobs import JOB_KIND as EXPORT_KIND
from daemon.onnx_jobs import enqueue_export, prune_exports
from daemon.serving import base_model_path_or_none, converted_models_root
from daemon.settings import (
    AUTO_BASE,
    ConfigError,
    Settings,
    apply_live,
    load_settings,
    missing_files,
    restart_keys,
)
from daemon.watcher import InboxCallbacks, InboxWatcher
from daemon.workers import WorkerPool
from state.base_model import set_base
from state.db import Database
from state.documents import DocumentStore
from state.heartbeat import mark_started, mark_stopped, write_heartbeat
from state.index_records import IndexRecords
from state.layout import StateLayout
from state.queue import JobQueue
from state.registry import ModelRegistry
from state.samples import SampleStore

log = get_logger("embedtune.daemon")
# SIGTERM to exit: systemd SIGKILLs the group after TimeoutStopSec (10 s, systemd/embedtune.service). Jobs
# and children get this long, then are killed; their jobs go back to the queue (tests/test_stop_during_fill.py)
STOP_BUDGET_S = 7.0
INDEX_CHECK_S = 5.0


class DbCallbacks(InboxCallbacks):
    """Watcher events become rows and jobs (on the watcher's own connection)."""

    def __init__(self, db: Database, settings: Settings, wake) -> None:
        self.db = db
        self.settings = settings
        self.wake = wake

    def _store(self) -> DocumentStore:
        return DocumentStore(self.db.conn)

    def settled(self, path: str, size: int, mtime: float) -> None:
        if self._store().file_seen(path, size, mtime):
            self.wake()

    def deleted(self, path: str) -> None:
        if self._store().file_deleted(path, self.settings.ingest.retire_samples):
            log.info("document_deleted", path=path)

    def deleted_tree(self, folder: str) -> None:
        store = self._store()
        for path in store.paths_under(folder):
            store.file_deleted(path, self.settings.ingest.retire_samples)

    def moved(self, src: str, dest: str) -> None:
        if self._store().file_moved(src, dest, self.settings.ingest.retire_samples):
            log.info("document_moved", src=src, dest=dest)

    def moved_tree(self, src: str, dest: str) -> None:
        store = self._store()
        for path in store.paths_under(src):
            store.file_moved(path, dest + path[len(src) :], self.settings.ingest.retire_samples)

    def rejected(self, path: str, reason: str) -> None:
        self._store().reject_path(path, reason)


class Daemon:
    def __init__(self, settings: Settings, config_file: str | None = None) -> None:
        self.settings = settings
        self.config_file = config_file
        self.layout = StateLayout(settings.paths.state_dir).ensure()
        self.notifier = Notifier()
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.lock = InstanceLock(self.layout.lock_file)
        self.db: Database | None = None
        self.pools: list[WorkerPool] = []
        self.ingest_processes: IngestProcesses | None = None
        self.activity = "starting"
        self.restart_needed: list[str] = []  # keys changed in the file that only a restart applies

    # --- start-up -------------------------------------------------------------------------------
    def start(self) -> None:
        from daemon.ingest import chunker_for, make_ingest_handler
        from daemon.job_process import ChildJobs
        from daemon.round_scheduler import RoundScheduler
        from daemon.synthesis import SynthesisService
        from stages.llm import CircuitBreaker

        self.lock.acquire()
        self.db = Database(self.layout.database)
        conn = self.db.conn
        queue = JobQueue(conn)
        released = queue.release_owner("")  # we hold the lock: every running job is an orphan
        note = ModelRegistry(conn, self.layout).reconcile(base_model_path_or_none(self.settings, conn))
        from daemon.trials import sweep_unserved_versions

        # versions a kill left between registering and promoting (or opening a trial), before exports
        sweep_unserved_versions(conn, self.layout)
        swept = prune_exports(conn, self.layout)  # exports of versions that are gone
        SampleStore(conn, queue).arm_filter()  # pairs a migration re-opened, or left with no job
        if self.settings.model.base != AUTO_BASE:  # a later "auto" keeps the base this folder is built on
            set_base(conn, self.settings.model.base, "model.base")
        self.rounds = RoundScheduler(self.settings, self.layout, self.config_file)
        aborted = self.rounds.abort_orphans()
        mark_started(conn, os.getpid(), socket.gethostname())
        for problem in missing_files(self.settings):  # rounds would fail on it: say so at start
            log.error("config_file_missing", problem=problem)
        log.info(
            "daemon_starting",
            pid=os.getpid(),
            state_dir=str(self.layout.root),
            inbox=str(self.settings.paths.inbox),
            released_jobs=released,
            registry=note,
            aborted_rounds=aborted,
            exports_removed=swept,
        )

        self.breaker = CircuitBreaker(self.settings.llm.breaker_failures, self.settings.llm.breaker_reset_s)
        self.synthesis = SynthesisService(self.settings, self.breaker)
        # The filter pass and the index sync load models: each runs in a child process (daemon/job_process.py)
        self.model_jobs = ChildJobs(self.settings, self.layout)
        processes = ingest_process_count(self.settings)
        if processes:  # chunking on every core (daemon/ingest_process.py); the daemon only supervises
            self.ingest_processes = IngestProcesses(self.settings, processes)
            wake_ingest = self.ingest_processes.wake
        else:
            chunker = chunker_for(self.settings, converted_models_root(self.settings))
            ingest_pool = WorkerPool(
                "ingest",
                self.layout.database,
                {"ingest": make_ingest_handler(self.settings, chunker)},
                self.settings.ingest.workers,
            )
            self.pools.append(ingest_pool)
            wake_ingest = ingest_pool.wake.set
        synth_threads = self.settings.llm.concurrency if self.settings.llm.enabled else 1
        self.synth_pool = WorkerPool(
            "synthesize",
            self.layout.database,
            {"synthesize": self.synthesis.handle},
            synth_threads,
            batches={"synthesize": self.synthesis},
        )
        self.filter_pool = WorkerPool(
            "filter", self.layout.database, {"filter": self.model_jobs.handle}, 1, lease_seconds=1800
        )
        self.pools += [self.synth_pool, self.filter_pool]
        self.index = None
        # ONNX exports share a model pool with the index sync (priority first) or, without an index, the filter
        self.export_pool = self.filter_pool
        if self.settings.index.enabled:
            from daemon.indexing import JOB_KIND, IndexService

            self.index = IndexService(self.settings, self.layout)
            # a refusal is retried once per start (the configuration may have changed since Milvus refused)
            self.index.retry_refused(conn)
            self.index_pool = WorkerPool(
                "index",
                self.layout.database,
                {JOB_KIND: self.model_jobs.handle, EXPORT_KIND: self.model_jobs.handle},
                1,
                lease_seconds=1800,
            )
            self.export_pool = self.index_pool
            self.pools.append(self.index_pool)
        else:
            IndexRecords(conn).clear_refusal()
            self.filter_pool.handlers[EXPORT_KIND] = self.model_jobs.handle
        for pool in self.pools:
            pool.start()

        self.callbacks = DbCallbacks(Database(self.layout.database), self.settings, wake_ingest)
        self.watcher = InboxWatcher(
            self.settings.paths.inbox, self.callbacks, self.settings.ingest.settle_seconds
        )
        self.watcher.start()
        self.reconcile_inbox()
        self._start_scheduler()
        self.activity = "watching"
        self.notifier.ready(self.describe())
        log.info("daemon_ready")

    def reconcile_inbox(self) -> None:
        """Start-up scan and periodic rescan: offer every file, retire what vanished while we were away."""
        store = DocumentStore(self.callbacks.db.conn)
        seen = self.watcher.scan()
        for path in store.live_paths():
            if path not in seen and not os.path.lexists(path):
                store.file_deleted(path, self.settings.ingest.retire_samples)

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(daemon=True)
        # First check soon after start-up (work may have accrued while the daemon was down), then every
        # check_minutes. next_run_time=None would add the job paused: it must be a time.
        first_check = datetime.now(UTC) + timedelta(
            seconds=min(30.0, self.settings.training.check_minutes * 60)
        )
        self.scheduler.add_job(
            self._check_round,
            "interval",
            seconds=self.settings.training.check_minutes * 60,
            id="round-check",
            max_instances=1,
            coalesce=True,
            next_run_time=first_check,
        )
        if self.settings.ingest.rescan_minutes > 0:
            self.scheduler.add_job(
                self.reconcile_inbox,
                "interval",
                minutes=self.settings.ingest.rescan_minutes,
                id="rescan",
                max_instances=1,
                coalesce=True,
            )
        self.scheduler.add_job(self._recover_leases, "interval", seconds=30, id="recover", max_instances=1)
        # the query log's retention: once at start, then daily
        self.scheduler.add_job(
            self._prune_query_log,
            "interval",
            hours=24,
            id="query-log-prune",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        # a running interleaved trial: tallied every minute, ended once decided (daemon/trials.py)
        self.scheduler.add_job(
            self._check_trial, "interval", seconds=60, id="trial-check", max_instances=1, coalesce=True
        )
        self._schedule_window()
        self.scheduler.start()

    def _write_metrics(self, up: bool = True) -> None:
        path = self.settings.metrics.path(self.settings.paths.state_dir)
        if path is None:
            return
        from daemon.metrics import write_metrics

        try:
            write_metrics(self.db.conn, path, up)
        except Exception:  # a full disk or a bad folder must not stop the daemon; the log says why
            log.exception("metrics_write_failed", path=str(path))

    def _check_index(self) -> None:
        """New or retired chunks, or another model in service: queue a sync of the vector store."""
        try:
            if self.index.needs_sync(self.db.conn) and self.index.enqueue(self.db.conn, "changed"):
                self.index_pool.wake.set()
        except Exception:
            log.exception("index_check_failed")

    def _check_export(self) -> None:
        """The model in service has no ONNX export yet (and the settings want one): queue it, once."""
        try:
            if enqueue_export(self.db.conn, self.settings, self.layout):
                self.export_pool.wake.set()
        except Exception:
            log.exception("export_check_failed")

    def _forget_index_changes(self) -> None:
        """With the index off, the chunk change log (written by triggers) is pruned here, not by syncs."""
        try:
            IndexRecords(self.db.conn).forget_changes()
        except Exception:
            log.exception("index_changes_prune_failed")

    def _prune_query_log(self) -> None:
        """Queries older than query_log.retention_days go, with their events (0 keeps them for ever)."""
        from state.query_log import QueryLog

        try:
            days = self.settings.query_log.retention_days
            removed = QueryLog(self.db.conn).prune(days)
            if removed:
                log.info("query_log_pruned", queries=removed, retention_days=days)
        except Exception:
            log.exception("query_log_prune_failed")

    def _check_trial(self) -> None:
        """On a connection of its own: a promotion's transaction must not share one with another job's."""
        from daemon.trials import check_trial
        from state.db import connect

        try:
            conn = connect(self.layout.database)
            try:
                check_trial(self.settings, self.layout, conn)
            finally:
                conn.close()
        except Exception:
            log.exception("trial_check_failed")

    def _recover_leases(self) -> None:
        count = JobQueue(self.callbacks.db.conn).recover_expired()
        if count:
            log.warning("leases_recovered", jobs=count)

    def _check_round(self, window_open: bool | None = None) -> None:
        try:
            self.rounds.maybe_start(self.callbacks.db.conn, window_open)
        except Exception:
            log.exception("round_check_failed")

    def _schedule_window(self) -> None:
        """With a cron `training.window`, each fire time is a round check with the window open."""
        from daemon.round_scheduler import window_trigger

        if self.scheduler.get_job("round-window") is not None:
            self.scheduler.remove_job("round-window")
        trigger = window_trigger(self.settings.training.window)
        if trigger is not None:
            self.scheduler.add_job(
                self._check_round,
                trigger,
                kwargs={"window_open": True},
                id="round-window",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=300,
            )

    # --- main loop ------------------------------------------------------------------------------
    def describe(self) -> str:
        busy = {pool.name: pool.busy for pool in self.pools if pool.busy}
        if self.ingest_processes is not None and self.ingest_processes.alive:
            busy = {"ingest": self.ingest_processes.alive, **busy}
        parts = [self.activity]
        if busy:
            parts.append(" ".join(f"{name}:{n}" for name, n in busy.items()))
        round_text = self.rounds.describe() if hasattr(self, "rounds") else ""
        if round_text:
            parts.append(round_text)
        if hasattr(self, "breaker") and self.breaker.state != "closed":
            parts.append(f"llm breaker {self.breaker.state}")
        return "; ".join(parts)

    def heartbeat(self) -> None:
        text = self.describe()
        write_heartbeat(
            self.db.conn, text, self.breaker.state.value, self.synthesis.llm_state(), self.restart_needed
        )
        self.notifier.status(text)

    def run_forever(self, tick: float = 1.0) -> None:
        last_watchdog = 0.0
        last_round_check = 0.0
        last_index_check = 0.0
        last_metrics = 0.0
        while not self.stop_requested.is_set():
            try:
                self.heartbeat()
                if self.ingest_processes is not None:
                    self.ingest_processes.check(self.db.conn)
                if time.monotonic() - last_metrics >= self.settings.metrics.interval_s:
                    last_metrics = time.monotonic()
                    self._write_metrics()
                if time.monotonic() - last_index_check > INDEX_CHECK_S:
                    last_index_check = time.monotonic()
                    self._check_export()  # first: with both pending, the export runs before the sync
                    if self.index is not None:
                        self._check_index()
                    else:
                        self._forget_index_changes()
                self.rounds.poll(self.db.conn)
                if self.rounds.request_pending(self.db.conn) or time.monotonic() - last_round_check > 5.0:
                    last_round_check = time.monotonic()
                    if (
                        self.rounds.request_pending(self.db.conn)
                        or self.settings.training.check_minutes * 60 <= 5
                    ):
                        self._check_round()
            except Exception:
                log.exception("main_loop_error")
            if (
                self.notifier.watchdog_interval
                and time.monotonic() - last_watchdog >= self.notifier.watchdog_interval
            ):
                self.notifier.watchdog()
                last_watchdog = time.monotonic()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            self.stop_requested.wait(tick)

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_settings(self.config_file)
            changes = apply_live(self.settings, new)  # all live keys or none
        except ConfigError as exc:
            log.error("reload_rejected", error=str(exc))
            self.notifier.ready(self.describe())
            return
        self.restart_needed = restart_keys(self.settings, new)
        self.breaker.threshold = self.settings.llm.breaker_failures
        self.breaker.reset_s = self.settings.llm.breaker_reset_s
        if any(key.startswith("llm.") for key in changes):
            self.synthesis.reload(self.settings)
            if self.settings.llm.enabled:
                self.synth_pool.resize(self.settings.llm.concurrency)
        if "training.check_minutes" in changes and hasattr(self, "scheduler"):
            self.scheduler.reschedule_job(
                "round-check", trigger="interval", seconds=self.settings.training.check_minutes * 60
            )
        if "training.window" in changes and hasattr(self, "scheduler"):
            self._schedule_window()
        if "logging.level" in changes:
            configure_logging(self.settings.logging.level, self.settings.logging.format)
        self.rounds.settings = self.settings
        log.info(
            "settings_reloaded",
            changed={k: [str(a), str(b)] for k, (a, b) in changes.items()},
            restart_needed=self.restart_needed,
        )
        self.notifier.ready(self.describe())

    # --- shutdown -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.activity = "stopping"
        self.notifier.stopping()
        log.info("daemon_stopping")
        if hasattr(self, "watcher"):
            self.watcher.stop()
        if hasattr(self, "scheduler"):
            self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + STOP_BUDGET_S

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        for pool in self.pools:  # first: a job given back by a stopped child must not start another
            pool.stop_claiming()
        if hasattr(self, "model_jobs"):  # every child hears SIGTERM now; each then gets what is left
            self.model_jobs.interrupt()
        if self.ingest_processes is not None:
            self.ingest_processes.interrupt()
        if hasattr(self, "rounds"):
            self.rounds.stop(self.db.conn, grace=left())
        if hasattr(self, "model_jobs"):
            self.model_jobs.stop(left())
        if self.ingest_processes is not None:
            self.ingest_processes.stop(left())
        for pool in self.pools:
            pool.stop(left())
        if self.db is not None:
            released = JobQueue(self.db.conn).release_owner("")
            mark_stopped(self.db.conn)
            self._write_metrics(up=False)
            log.info("daemon_stopped", released_jobs=released)
        self.lock.release()


def run_daemon(settings: Settings, config_file: str | None = None) -> int:
    daemon = Daemon(settings, config_file)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop_requested.set())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop_requested.set())
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())
    try:
        daemon.start()
    except AlreadyRunning as exc:
        log.error("already_running", holder=exc.holder)
        print(f"embedtune: {exc}", flush=True)
        return 1
    except Exception:
        log.exception("start_failed")
        daemon.shutdown()
        return 1
    try:
        daemon.run_forever()
    finally:
        daemon.shutdown()
    return 0
