"""Synthesize and filter jobs: the daemon side of stages.synthesize, stages.pseudo and stages.filter."""

from __future__ import annotations

import threading
import time

from daemon.logs import get_logger
from daemon.workers import AttemptFailed, JobContext, PermanentFailure, RetryLater
from stages.filter import (
    Bm25Index,
    FilterInput,
    embedding_pair_scorer,
    filter_pairs,
    reranker_pair_scorer,
)
from stages.llm import (
    BreakerOpen,
    CircuitBreaker,
    InvalidReply,
    LlmClient,
    LlmConfig,
    LlmRejected,
    LlmUnavailable,
    StructuredMode,
)
from stages.pseudo import pseudo_queries
from stages.synthesize import ReplyBudget, synthesize_chunk
from state.samples import SampleIn, SampleStore

log = get_logger("embedtune.synthesis")


def make_llm_client(settings, breaker: CircuitBreaker) -> LlmClient | None:
    if not settings.llm.enabled:
        return None
    llm = settings.llm
    config = LlmConfig(
        url=llm.url,
        model=llm.model,
        api_key=settings.llm_api_key(),
        timeout_s=llm.timeout_s,
        connect_timeout_s=llm.connect_timeout_s,
        max_retries=llm.max_retries,
        max_retry_after_s=llm.max_retry_after_s,
        reask_invalid=llm.reask_invalid,
        concurrency=llm.concurrency,
        temperature=llm.temperature,
        structured=StructuredMode(llm.structured),
    )
    return LlmClient(config, breaker)


def reply_budget(settings) -> ReplyBudget:
    llm = settings.llm
    return ReplyBudget(llm.question_tokens, llm.rewrite_tokens, llm.score_tokens, llm.reply_overhead_tokens)


class SynthesisService:
    """Holds what synthesis jobs share: the LLM client (swapped on SIGHUP) and the breaker."""

    def __init__(self, settings, breaker: CircuitBreaker) -> None:
        self.settings = settings
        self.breaker = breaker
        self.client = make_llm_client(settings, breaker)

    def reload(self, settings) -> None:
        old = self.client
        self.settings = settings
        self.client = make_llm_client(settings, self.breaker)
        if old is not None:
            old.close()

    def llm_state(self) -> dict | None:
        """The client's adaptive state for `status`: requests in flight allowed now and why, and the
        structured-output mode the server accepted."""
        client = self.client
        if client is None:
            return None
        snapshot = client.concurrency.snapshot()
        return {
            "concurrency": snapshot.limit,
            "max_concurrency": snapshot.maximum,
            "in_flight": snapshot.in_flight,
            "concurrency_reason": snapshot.reason,
            "structured": client.structured.value,
        }

    def handle(self, ctx: JobContext) -> None:
        store = SampleStore(ctx.conn, ctx.queue)
        chunk = store.chunk(ctx.job.payload["chunk_id"])
        if chunk is None or not chunk["active"]:
            ctx.queue.complete(ctx.job)  # retired before its turn: nothing to make
            return
        settings = self.settings.synthesis
        client = self.client
        if client is None:
            made = pseudo_queries(
                chunk["text"],
                chunk["heading"],
                chunk["language"],
                chunk["sha256"],
                settings.pseudo_method,
                settings.pseudo_per_chunk,
                settings.seed,
            )
            candidates = [SampleIn(c.query, "pseudo", c.passage, None, None) for c in made]
        else:
            try:
                made = synthesize_chunk(
                    client,
                    chunk["text"],
                    chunk["language"],
                    settings.questions_per_chunk,
                    settings.rewrites_per_question,
                    reply_budget(self.settings),
                )
            except BreakerOpen as exc:
                raise RetryLater(str(exc), exc.retry_in) from exc
            except LlmRejected as exc:
                raise PermanentFailure(str(exc)) from exc
            except InvalidReply as exc:
                # A model that garbles JSON under load usually recovers: retry with back-off, keep the reply.
                raise AttemptFailed(str(exc), raw_reply=exc.raw[:20000]) from exc
            except LlmUnavailable as exc:
                # The endpoint is down: wait for the breaker instead of burning attempts.
                raise RetryLater(str(exc), max(5.0, self.settings.llm.breaker_reset_s)) from exc
            candidates = [
                SampleIn(c.query, c.kind, c.passage, c.judge_score, c.reason, c.parent) for c in made
            ]
        added = store.store_candidates(ctx.job, chunk, candidates, settings.judge_threshold)
        log.debug("chunk_synthesized", chunk_id=chunk["id"], added=added)


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
        from stages.encoder import EncodeParams, Encoder
        from stages.models import resolve_model_path

        if self.settings.model.reranker:
            key = f"reranker:{self.settings.model.reranker}"
            if key != self._loaded_key:
                from FlagEmbedding import FlagReranker

                path = resolve_model_path(self.settings.model.reranker)
                reranker = FlagReranker(
                    str(path), use_fp16=False, devices="cpu" if self.settings.model.device == "cpu" else None
                )
                self._scorer, self._loaded_key = reranker_pair_scorer(reranker), key
            return self._scorer
        path, cache_root = self.model_path_provider(conn)
        if str(path) != self._loaded_key:
            model = self.settings.model
            encoder = Encoder(
                path, EncodeParams(model.device, model.query_instruction, model.encode_batch_size), cache_root
            )
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
            if rows:
                corpus = store.active_chunks()
                index_of = {chunk["id"]: i for i, chunk in enumerate(corpus)}
                texts = [chunk["text"] for chunk in corpus]
                bm25 = Bm25Index(texts)
                items = [
                    FilterInput(
                        row["id"],
                        row["query"],
                        index_of[row["chunk_id"]],
                        row["passage"] or row["chunk_text"],
                    )
                    for row in rows
                ]
                results = filter_pairs(
                    items,
                    texts,
                    bm25,
                    self._scoring(ctx.conn),
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
        store.finish_filter_pass(ctx.job)
