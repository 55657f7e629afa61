"""Chunking in worker processes, so the ingest threads chunk in parallel instead of taking turns.

Why: chunking (sentence splitting, per-word token counts, the tokenizer for unknown words) is Python and
holds the GIL; with the chunker shared under a lock, two ingest workers chunked one document at a time and
plain-text ingest stopped at ~3 MB/s on 2 cores (issue 14's profile). Each worker process loads the
tokenizer once and chunks whole documents; the ingest threads keep reading, extracting and storing (SQLite
releases the GIL while it writes).

The processes are started on first use with the forkserver method (the daemon has threads; forking it
would copy their locks), and stopped after `IDLE_S` without work so an idle daemon keeps its small
footprint (issue 14: a few hundred MB). A worker that dies (an OOM kill) breaks the pool: the next call
starts a new one and chunks again; chunking is a pure function of the text, so nothing is lost.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from stages.extract import Section
from state.documents import NewChunk

IDLE_S = 60.0

_worker_chunker = None  # in a worker process: its own Chunker, built by _start_worker


def _start_worker(model_path: str, chunk_tokens: int, overlap: int, min_chars: int) -> None:
    global _worker_chunker
    from daemon.ingest import Chunker

    _worker_chunker = Chunker(model_path, chunk_tokens, overlap, min_chars)


def _chunk_in_worker(sections: list[Section]) -> list[NewChunk]:
    return _worker_chunker.chunk(sections)


class ChunkPool:
    """`chunk(sections)` in one of `workers` processes that each hold the model's tokenizer."""

    def __init__(
        self, model_path: Path, chunk_tokens: int, overlap: int, min_chars: int, workers: int
    ) -> None:
        self.args = (str(model_path), chunk_tokens, overlap, min_chars)
        self.workers = max(1, workers)
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._busy = 0
        self._idle_timer: threading.Timer | None = None

    def chunk(self, sections: list[Section]) -> list[NewChunk]:
        for attempt in (1, 2):
            executor = self._acquire()
            try:
                return executor.submit(_chunk_in_worker, sections).result()
            except BrokenProcessPool:
                self._discard(executor)
                if attempt == 2:
                    raise
            finally:
                self._release()
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _acquire(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("forkserver"),
                    initializer=_start_worker,
                    initargs=self.args,
                )
            self._busy += 1
            return self._executor

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._busy == 0 and self._executor is not None:
                self._idle_timer = threading.Timer(IDLE_S, self._stop_if_idle)
                self._idle_timer.daemon = True
                self._idle_timer.start()

    def _stop_if_idle(self) -> None:
        with self._lock:
            if self._busy or self._executor is None:
                return
            executor, self._executor = self._executor, None
        executor.shutdown(wait=False)

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)
