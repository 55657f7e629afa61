"""Synthesize jobs: the daemon side of stages.synthesize and stages.pseudo (the filter pass: daemon/filtering.py)."""

from __future__ import annotations

from daemon.logs import get_logger
from daemon.workers import AttemptFailed, JobContext, PermanentFailure, RetryLater
from stages.llm import (
    BreakerOpen,
    CircuitBreaker,
    InvalidReply,
    LlmClient,
    LlmRejected,
    LlmUnavailable,
)
from stages.pseudo import pseudo_queries
from stages.synthesize import ReplyBudget, synthesize_chunk
from state.queue import Job, JobQueue
from state.samples import SampleIn, SampleStore

log = get_logger("embedtune.synthesis")

# Built-in (no LLM) synthesis takes a fraction of a millisecond per chunk, less than the transactions
# around it: jobs are taken and finished this many at a time (docs/benchmarks.md, "Ingestion").
BUILTIN_BATCH = 64


def make_llm_client(settings, breaker: CircuitBreaker) -> LlmClient | None:
    if not settings.llm.enabled:
        return None
    from daemon.step_params import llm_config

    config = llm_config(settings)
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
            candidates = self._pseudo(chunk)
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

    def batch_size(self) -> int:
        """Built-in synthesis goes in batches; LLM requests one job at a time (threads give concurrency)."""
        return BUILTIN_BATCH if self.client is None else 1

    def handle_batch(self, queue: JobQueue, jobs: list[Job]) -> None:
        """Built-in pseudo-queries for many chunks, stored and completed in one transaction."""
        store = SampleStore(queue.conn, queue)
        chunks = store.chunks([job.payload["chunk_id"] for job in jobs])
        made = []
        for job in jobs:
            chunk = chunks.get(job.payload["chunk_id"])
            if chunk is None or not chunk["active"]:
                made.append((job, None, []))  # retired before its turn: nothing to make
            else:
                made.append((job, chunk, self._pseudo(chunk)))
        added = store.store_many(made, self.settings.synthesis.judge_threshold)
        log.debug("chunks_synthesized", jobs=len(jobs), added=added)

    def _pseudo(self, chunk) -> list[SampleIn]:
        settings = self.settings.synthesis
        made = pseudo_queries(
            chunk["text"],
            chunk["heading"],
            chunk["language"],
            chunk["sha256"],
            settings.pseudo_method,
            settings.pseudo_per_chunk,
            settings.seed,
        )
        return [SampleIn(c.query, "pseudo", c.passage, None, None) for c in made]
