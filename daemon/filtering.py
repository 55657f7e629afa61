"""The filter job: the daemon side of stages.filter. Every unfiltered pair is ranked against the corpus
(BM25 candidates, then the reranker or the model in service) and kept or dropped with a reason."""

from __future__ import annotations

import threading
import time

from daemon.logs import get_logger
from daemon.workers import JobContext
from stages.filter import Bm25Index, FilterInput, embedding_pair_scorer, filter_pairs, reranker_pair_scorer
from state.samples import SampleStore

log = get_logger("embedtune.filter")


class FilterService:
    """The batch filter pass. Loads the scoring model on first use and keeps it while this object lives:
    in the daemon that is one job (a child process per pass, daemon/job_process.py); a caller that
    runs several passes in one process reuses it until the model in service changes."""

    def __init__(self, settings, model_path_provider) -> None:
        self.settings = settings
        self.model_path_provider = model_path_provider
        self._lock = threading.Lock()
        self._loaded_key: str | None = None
        self._scorer = None
        self._encoder = None  # keeps the embedding cache of the model in service

    def _scoring(self, conn):
        from daemon.serving import converted_models_root
        from daemon.step_params import encode_params
        from stages.encoder import Encoder
        from stages.models import resolve_model_path

        if self.settings.model.reranker:
            key = f"reranker:{self.settings.model.reranker}"
            if key != self._loaded_key:
                from FlagEmbedding import FlagReranker

                path = resolve_model_path(self.settings.model.reranker, converted_models_root(self.settings))
                reranker = FlagReranker(
                    str(path), use_fp16=False, devices="cpu" if self.settings.model.device == "cpu" else None
                )
                self._scorer, self._loaded_key = reranker_pair_scorer(reranker), key
            return self._scorer
        path, cache_root = self.model_path_provider(conn)
        if str(path) != self._loaded_key:
            encoder = Encoder(path, encode_params(self.settings), cache_root)
            self._scorer = embedding_pair_scorer(encoder.queries, encoder.passages)
            self._loaded_key, self._encoder = str(path), encoder
        return self._scorer

    def handle(self, ctx: JobContext) -> None:
        store = SampleStore(ctx.conn, ctx.queue)
        started = time.monotonic()
        with self._lock:
            rows = store.unfiltered(self.settings.synthesis.filter_batch)
            inactive = [row["id"] for row in rows if not row["active"]]
            if inactive:
                store.drop_inactive(inactive)
            rows = [row for row in rows if row["active"]]
            if not self.settings.model.reranker:
                # Without a reranker the scorer is the model in service, the model the held-out set
                # judges: it must not choose the set's queries (docs/promotion.md, "The held-out set").
                unranked = [row["id"] for row in rows if row["split"] == "heldout"]
                store.keep_unranked(unranked)
                rows = [row for row in rows if row["split"] != "heldout"]
            if rows:
                self._rank(ctx.conn, store, rows, started)
        store.finish_filter_pass(ctx.job)

    def _rank(self, conn, store: SampleStore, rows, started: float) -> None:
        corpus = store.active_chunks()
        index_of = {chunk["id"]: i for i, chunk in enumerate(corpus)}
        texts = [chunk["text"] for chunk in corpus]
        items = [
            FilterInput(
                row["id"], row["query"], index_of[row["chunk_id"]], row["passage"] or row["chunk_text"]
            )
            for row in rows
        ]
        results = filter_pairs(
            items,
            texts,
            Bm25Index(texts),
            self._scoring(conn),
            self.settings.synthesis.featured_percentage,
            self.settings.synthesis.filter_candidates,
        )
        store.record_filter(results)
        if self._encoder is not None:
            self._encoder.save_cache()
        log.info(
            "filter_pass",
            samples=len(rows),
            kept=sum(r.kept for r in results),
            corpus=len(corpus),
            duration_s=round(time.monotonic() - started, 2),
        )
