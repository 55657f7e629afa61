"""What `embedtune serve` answers with: the model in service, loaded once, and its encoder.

The served model is resolved the one way every command resolves it (daemon/serving.resolve_served, a few
SQLite reads). A background thread repeats that every `serve.poll_s` (1 s by default); when the version
(or the runtime its checked ONNX export allows) changes, it loads the new encoder FIRST and then replaces
one reference, so a request that took the old `Loaded` finishes on the old model and the next one gets
the new model: an answer never mixes versions, and each names the version that produced it. The model
before is kept, so a rollback right after a promotion swaps back without loading.

With the index on, a loaded model whose collection is live also gets a memory replica of that collection
(daemon/serve_index.py), built before the model is swapped in (or, when its collection goes live later,
by the poller in the background) and attached to its `Loaded`: `/v1/search` answers from it without
opening Milvus. Every poll follows the chunk change log into a new replica (one reference again).

Nothing here touches HTTP (daemon/serve.py does); the health check reads only what the poller stored.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from daemon.logs import get_logger
from daemon.serve_index import ServeIndex
from daemon.serving import Served, ServedResolver
from daemon.settings import Settings
from state.layout import StateLayout

FOLLOW_FAILURES = 3  # failed follows in a row before searches leave the replica for the collection
log = get_logger("embedtune.serve")

LOAD_RETRY_S = 30.0  # a version whose load failed is tried again after this long (or once another serves)


@dataclass
class Loaded:
    """One model version, loaded: what a request takes once and uses throughout."""

    version: str  # "vN", or "base" before any promotion
    model_id: int | None
    path: Path
    encoder: object  # stages.encoder.Encoder (imported lazily: torch)
    plain: object  # the same model without the embedding cache: /v1/embeddings of arbitrary texts
    tokenizer: object | None  # counts usage tokens (None: the folder has no tokenizer.json)
    runtime: str  # "torch", "onnx int8", ...
    dimension: int
    export_mark: float | None  # the export record's mtime when loaded (a new record may change runtime)
    # One model call at a time: Hugging Face tokenizers refuse concurrent use ("Already borrowed") and
    # two requests on 2 cores gain nothing from running side by side.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # the memory replica of this model's live collection (None: not built, or its collection not live)
    replica: ServeIndex | None = None

    @property
    def key(self) -> tuple[int | None, str]:
        return self.model_id, str(self.path)

    def token_count(self, texts: list[str]) -> int:
        """Tokens the model read (after truncation), for the OpenAI `usage` field."""
        if self.tokenizer is None:
            return sum(len(text.split()) for text in texts)
        return sum(len(encoding.ids) for encoding in self.tokenizer.encode_batch(texts))


@dataclass
class Trial:
    """The running interleaved trial (state/trials.py) with its candidate loaded: a share of the searches
    also ask the candidate and show both models' hits, team-draft interleaved."""

    record: object  # state.trials.TrialRecord
    candidate: Loaded

    @property
    def id(self) -> int:
        return self.record.id

    @property
    def share(self) -> float:
        return self.record.share

    def age_days(self) -> float:
        started = datetime.fromisoformat(self.record.started)
        return (datetime.now(UTC) - started).total_seconds() / 86400


class ServeState:
    """The model in service, kept loaded and followed. `current` is None until a model is loaded;
    `problem` then says why (one sentence)."""

    def __init__(self, settings: Settings, layout: StateLayout | None = None) -> None:
        self.settings = settings
        self.layout = layout or StateLayout(settings.paths.state_dir)
        self._resolver = ServedResolver(settings, self.layout)
        self._loaded: Loaded | None = None
        self._previous: Loaded | None = None
        self._served: Served | None = None
        self._problem = "loading the model in service"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swaps = 0
        self._failed: tuple[tuple[int | None, str], float] | None = None  # (key, when) of a failed load
        self._refreshing = threading.Lock()  # one refresh at a time (the poller, or a caller's)
        self._replicas_built = 0
        self._replica_failed: tuple[str, float] | None = None  # (collection, when) of a failed build
        self._replica_problem = ""
        self.on_swap: list = []  # callables(Loaded): the metrics' version label follows swaps
        self._trial: Trial | None = None  # the running interleaved trial's candidate, loaded
        self._trial_failed: tuple[int, float] | None = None  # (trial id, when) of a failed load
        self._trial_builder: threading.Thread | None = None  # builds the candidate's first replica
        self.trial_problem = ""

    # --- what requests read -------------------------------------------------------------------
    @property
    def current(self) -> Loaded | None:
        return self._loaded  # one reference: read once per request

    @property
    def served(self) -> Served | None:
        """The latest resolution (the live collection and its lag included)."""
        return self._served

    @property
    def swaps(self) -> int:
        return self._swaps

    def trial_for(self, loaded: Loaded) -> Trial | None:
        """The running trial a request answered by `loaded` may interleave: its candidate ready beside
        that model (the one it was judged against), answering from the same kind of source (with the
        index on, both from their replicas), trials on and the trial not past its days (a server left
        without its daemon stops on its own)."""
        trial = self._trial
        if trial is None or trial.record.replacing_id != loaded.model_id:
            return None
        promotion = self.settings.promotion
        if promotion.trial_share <= 0 or trial.age_days() >= promotion.trial_max_days:
            return None
        if self.settings.index.enabled and (loaded.replica is None or trial.candidate.replica is None):
            return None
        return trial

    _follow_failures = 0

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): a model loaded and, with the index on, a live collection to answer from."""
        loaded, served = self._loaded, self._served
        if loaded is None:
            return False, self._problem
        if self.settings.index.enabled:
            if served is None or served.live is None:
                return False, "no live index collection yet (the daemon's index job fills it)"
            if not self._replicas_built and _holds(served.live, loaded) and loaded.replica is None:
                why = self._replica_problem or f"building the memory replica of {served.live.name}"
                return False, why
        return True, ""

    # --- the poller ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serve-model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # a poll that fails keeps serving what is loaded, and retries
                self._problem = f"cannot resolve the model in service: {type(exc).__name__}: {exc}"
                log.warning("serve_poll_failed", error=str(exc))
            self._stop.wait(self.settings.serve.poll_s)

    def refresh(self) -> bool:
        """One poll: resolve what is served and load it when it changed. True when a swap happened."""
        with self._refreshing:
            swapped = self._refresh()
            self._keep_replica()
            self._keep_trial()
            return swapped

    def _refresh(self) -> bool:
        served = self._resolve()
        self._served = served
        if served.path is None:
            self._problem = served.problem
            return False
        loaded = self._loaded
        key = (served.model_id, str(served.path))
        if loaded is not None and loaded.key == key and not self._runtime_changed(loaded):
            return False
        if (
            self._previous is not None
            and self._previous.key == key
            and not self._runtime_changed(self._previous)
        ):
            fresh = self._previous  # a rollback to the model served just before: no load
        elif self._trial is not None and self._trial.candidate.key == key:
            # the trial's candidate was promoted: already loaded, with its replica of the live collection
            # (its own vectors), which serves until its own collection goes live, at the share its
            # trial's winning arm wrote into its folder
            fresh = self._trial.candidate
            if fresh.replica is not None:
                fresh.replica.set_weight(self._share_of(fresh))
        else:
            started = time.monotonic()
            failed = self._failed
            if failed is not None and failed[0] == key and started - failed[1] < LOAD_RETRY_S:
                return False  # the same folder failed a moment ago: retry later, not every poll
            try:
                fresh = self._load(served)
            except Exception as exc:  # the model before keeps serving; a later poll tries again
                self._failed = (key, started)
                self._problem = f"cannot load model {served.version}: {type(exc).__name__}: {exc}"
                log.error("serve_load_failed", version=served.version, error=str(exc))
                return False
            self._failed = None
            log.info(
                "serve_model_loaded",
                version=fresh.version,
                runtime=fresh.runtime,
                seconds=round(time.monotonic() - started, 2),
            )
        self._prepare_replica(fresh, served)  # before the swap: the new version answers from its own
        if self._previous is not None and self._previous is not fresh:
            # the model two swaps back keeps no replica (memory); the one just swapped out keeps its own
            # until then, so a request that took it before the swap still answers from it
            self._previous.replica = None
        self._previous, self._loaded = loaded, fresh  # the swap: one reference
        self._swaps += 1
        self._problem = ""
        for listener in self.on_swap:
            listener(fresh)
        if loaded is not None:
            log.info("serve_model_swapped", before=loaded.version, after=fresh.version)
        return True

    # --- the memory replica ---------------------------------------------------------------------
    def _prepare_replica(self, loaded: Loaded, served: Served) -> None:
        """Build `loaded`'s replica when its collection is live and it has none of that collection."""
        live = served.live
        if not self.settings.index.enabled or live is None or not _holds(live, loaded):
            return
        if loaded.replica is not None and loaded.replica.name == live.name:
            return
        failed = self._replica_failed
        if failed is not None and failed[0] == live.name and time.monotonic() - failed[1] < LOAD_RETRY_S:
            return
        try:
            replica = self._build_replica(loaded, live, served.analyzer)
        except Exception as exc:  # searches answer from the collection meanwhile; retried later
            self._replica_failed = (live.name, time.monotonic())
            self._replica_problem = (
                f"cannot build the memory replica of {live.name}: {type(exc).__name__}: {exc}"
            )
            log.error("serve_replica_failed", collection=live.name, error=str(exc))
            return
        self._replica_failed, self._replica_problem = None, ""
        loaded.replica = replica
        self._replicas_built += 1

    def _build_replica(self, loaded: Loaded, live, analyzer: str) -> ServeIndex:
        """A memory replica of the collection `live` (its chunks, its analyzer) with `loaded`'s vectors."""
        from daemon.serve_index import build_serve_index
        from daemon.serving import ModelChoice
        from state.db import connect

        choice = ModelChoice(
            loaded.version, loaded.path, "" if loaded.model_id is not None else "nothing promoted yet"
        )
        conn = connect(self.layout.database, readonly=True)
        try:
            return build_serve_index(conn, choice, live, analyzer, self._vectors(loaded))
        finally:
            conn.close()

    def _vectors(self, loaded: Loaded):
        """Passage vectors for `loaded`'s replica: its embedding cache (the index job's), misses encoded."""
        from daemon.serve_index import CachedVectors

        cache = getattr(loaded.encoder, "cache", None)
        key = cache.model_key if cache is not None else str(loaded.path)
        return CachedVectors(self.layout.cache, key, loaded.plain.passages, loaded.lock)

    def _keep_replica(self) -> None:
        """Every poll: build the served model's replica when its collection went live (or another of its
        collections did), else follow the change log."""
        loaded, served = self._loaded, self._served
        if loaded is None or served is None or served.live is None or not self.settings.index.enabled:
            return
        replica = loaded.replica
        if replica is None or replica.name != served.live.name:
            self._prepare_replica(loaded, served)
            return
        # a replica of a collection another model filled (a promoted trial's, until its own goes live)
        # uses the share of the model it answers for
        replica.set_weight(served.live.bm25_weight if _holds(served.live, loaded) else self._share_of(loaded))
        from state.db import connect

        conn = connect(self.layout.database, readonly=True)
        try:
            replica.follow(
                conn,
                served.signature,
                self._vectors(loaded),
            )
            self._follow_failures = 0
        except Exception as exc:  # said apart from a failed resolution; after a few, searches leave it
            self._follow_failures += 1
            log.warning(
                "serve_replica_follow_failed",
                collection=replica.name,
                failures=self._follow_failures,
                error=f"{type(exc).__name__}: {exc}",
            )
            if self._follow_failures >= FOLLOW_FAILURES:
                loaded.replica = None  # searches answer from the collection; the next poll rebuilds it
                self._follow_failures = 0
        finally:
            conn.close()

    # --- the interleaved trial ------------------------------------------------------------------
    def _keep_trial(self) -> None:
        """Every poll: load the running trial's candidate (and its replica of the live collection) beside
        the model it was judged against; let it go once the trial ended or another model serves."""
        record, loaded = self._running_trial(), self._loaded
        if record is None or loaded is None or record.replacing_id != loaded.model_id:
            if self._trial is not None:
                log.info("serve_trial_left", trial_id=self._trial.id)
            self._trial, self.trial_problem = None, ""
            return
        trial = self._trial
        if trial is None or trial.id != record.id:
            failed = self._trial_failed
            if failed is not None and failed[0] == record.id and time.monotonic() - failed[1] < LOAD_RETRY_S:
                return
            try:
                candidate = self._load_folder(record.version, record.model_id, Path(record.path))
            except Exception as exc:  # searches go on without the trial; retried later
                self._trial_failed = (record.id, time.monotonic())
                self.trial_problem = (
                    f"cannot load trial {record.id}'s candidate {record.version}: {type(exc).__name__}: {exc}"
                )
                log.error("serve_trial_load_failed", trial_id=record.id, error=str(exc))
                return
            self._trial_failed, self.trial_problem = None, ""
            trial = self._trial = Trial(record, candidate)
            log.info("serve_trial_loaded", trial_id=record.id, candidate=record.version, share=record.share)
        trial.record = record  # an arm taken out since the last poll is no longer mixed
        self._keep_trial_replica(trial)

    def _keep_trial_replica(self, trial: Trial) -> None:
        """The candidate's replica of the live collection (the same chunks and analyzer, its own vectors
        and BM25 share). No index job encodes the corpus for the candidate, so the first build runs in a
        thread of its own (hours on a large corpus must not stop this poller from following a rollback);
        once built it follows the change log here, like the served one."""
        served = self._served
        if not self.settings.index.enabled or served is None or served.live is None:
            return
        candidate, live = trial.candidate, served.live
        replica = candidate.replica
        if replica is None or replica.name != live.name:
            building = self._trial_builder
            if building is not None and building.is_alive():
                return
            failed = self._trial_failed
            if failed is not None and failed[0] == trial.id and time.monotonic() - failed[1] < LOAD_RETRY_S:
                return
            self._trial_builder = threading.Thread(
                target=self._build_trial_replica,
                args=(trial, live, served.analyzer),
                name="serve-trial-replica",
                daemon=True,
            )
            self._trial_builder.start()
            return
        from state.db import connect

        conn = connect(self.layout.database, readonly=True)
        try:
            # the candidate's new chunks are encoded at once: nobody else will (a source without
            # `missing` is not waited for)
            cached = self._vectors(candidate)
            replica.follow(conn, served.signature, lambda texts: cached(texts))
        except Exception as exc:  # rebuilt at the next poll
            log.warning("serve_trial_replica_follow_failed", trial_id=trial.id, error=str(exc))
            candidate.replica = None
            return
        finally:
            conn.close()
        replica.set_weight(self._share_of(candidate))

    def _build_trial_replica(self, trial: Trial, live, analyzer: str) -> None:
        started = time.monotonic()
        try:
            replica = self._build_replica(trial.candidate, live, analyzer)
        except Exception as exc:  # the trial waits; the served model answers every search meanwhile
            self._trial_failed = (trial.id, time.monotonic())
            self.trial_problem = f"cannot build trial {trial.id}'s replica: {type(exc).__name__}: {exc}"
            log.error("serve_trial_replica_failed", trial_id=trial.id, error=str(exc))
            return
        replica.set_weight(self._share_of(trial.candidate))
        trial.candidate.replica = replica
        log.info(
            "serve_trial_ready",
            trial_id=trial.id,
            seconds=round(time.monotonic() - started, 1),
            chunks=replica.size,
        )

    def _share_of(self, loaded: Loaded) -> float | None:
        """The BM25 share `loaded` is served with: the configured one, or ("auto") its folder's choice.
        Read at every poll, not once per load: a trial's candidate held in memory is promoted at the share
        its winning arm wrote into its folder (daemon/trials.py)."""
        from daemon.serving import served_bm25_weight

        return served_bm25_weight(self.settings, loaded.path)

    def _running_trial(self):
        """The running trial (state/trials.py), or None (none, or a database from before trials)."""
        import sqlite3

        from state.db import connect
        from state.trials import TrialStore

        if not self.layout.database.exists():
            return None
        conn = connect(self.layout.database, readonly=True)
        try:
            return TrialStore(conn).running()
        # no trials table, or no arms (schema < 18): the daemon has not migrated yet
        except sqlite3.OperationalError:
            return None
        finally:
            conn.close()

    def _resolve(self) -> Served:
        database = self.layout.database
        if not database.exists():
            return self._resolver(None)
        from state.db import connect

        conn = connect(database, readonly=True)
        try:
            return self._resolver(conn)
        finally:
            conn.close()

    def _export_mark(self, path: Path) -> float | None:
        from stages.onnx_export import RECORD, export_dir

        try:
            return (export_dir(self.layout.exports, path) / RECORD).stat().st_mtime
        except OSError:
            return None

    def _runtime_changed(self, loaded: Loaded) -> bool:
        """The export record changed (an export finished, failed or was removed) and with it the runtime
        the encoder would choose: reload, so ONNX serves once its check passes."""
        if self.settings.model.backend == "torch":
            return False
        mark = self._export_mark(loaded.path)
        if mark == loaded.export_mark:
            return False
        from stages.models import pick_device
        from stages.onnx_export import runtime_choice

        model = self.settings.model
        variant, _why = runtime_choice(
            self.layout.exports, loaded.path, model.backend, model.quantize, pick_device(model.device)
        )
        wanted = f"onnx {variant}" if variant else "torch"
        if wanted == loaded.runtime or (variant is None and loaded.runtime.startswith("torch")):
            loaded.export_mark = mark  # nothing to change for this record
            return False
        return True

    def _load(self, served: Served) -> Loaded:
        return self._load_folder(served.version, served.model_id, served.folder())

    def _load_folder(self, version: str, model_id: int | None, path: Path) -> Loaded:
        from daemon.step_params import encode_params
        from stages.encoder import Encoder

        mark = self._export_mark(path)
        params = encode_params(self.settings)
        encoder = Encoder(path, params, self.layout.cache)
        plain = Encoder(path, params, None, model=encoder.model)  # same weights, no cache
        warm = encoder.queries(["warm up"])  # the first call's lazy set-up is paid here, not in a request
        return Loaded(
            version,
            model_id,
            path,
            encoder,
            plain,
            _usage_tokenizer(path),
            encoder.runtime,
            int(warm.shape[1]),
            mark,
        )


def _holds(live, loaded: Loaded) -> bool:
    """The collection was filled by this loaded model (its replica may answer for it)."""
    return (live.model_id, live.model_path) == (loaded.model_id, str(loaded.path))


def _usage_tokenizer(path: Path):
    from stages.models import load_tokenizer, max_seq_length

    try:
        tokenizer = load_tokenizer(path)
    except Exception:  # a folder without tokenizer.json: usage counts words instead
        return None
    tokenizer.enable_truncation(max_seq_length(path))
    tokenizer.no_padding()
    return tokenizer
