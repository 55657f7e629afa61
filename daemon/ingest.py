"""The ingest job: read a settled file, hash it, extract, chunk, and store the version in one step."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

from daemon.logs import get_logger
from daemon.workers import JobContext
from stages.base_choice import AUTO, choose_base
from stages.chunk import TokenCounter, chunk_sections
from stages.extract import ExtractionError, extract, read_checked
from stages.models import load_tokenizer, max_seq_length, resolve_model_path
from stages.text import detect_language
from state.base_model import record_base, recorded_base
from state.documents import DocumentStore, NewChunk

log = get_logger("embedtune.ingest")


class Chunker:
    """Chunking with the configured embedding model's tokenizer, loaded once and shared by threads."""

    def __init__(
        self,
        model_reference: str,
        chunk_tokens: int,
        overlap: int,
        min_chars: int,
        converted_root: Path | None = None,
    ) -> None:
        path = resolve_model_path(model_reference, converted_root)
        self.counter = TokenCounter(load_tokenizer(path))
        # Leave room for the special tokens the model adds ([CLS], [SEP]).
        self.max_tokens = max(16, min(chunk_tokens, max_seq_length(path) - 2))
        self.overlap = min(overlap, self.max_tokens // 2)
        self.min_chars = min_chars
        self._lock = threading.Lock()

    def __call__(self, sections) -> list[NewChunk]:
        with self._lock:  # HF fast tokenizers are not re-entrant across threads
            chunks = chunk_sections(
                sections,
                self.counter.count,
                self.counter.split,
                self.max_tokens,
                self.overlap,
                self.min_chars,
                self.counter.count_many,
            )
        return [NewChunk(c.ordinal, c.text, c.heading, c.sha256, detect_language(c.text)) for c in chunks]

    def for_text(self, conn: sqlite3.Connection, text: str) -> Chunker:
        return self


class AutoBaseChunker:
    """The chunker when `model.base = "auto"`: the first document's text decides the base model (recorded
    once in the state database, so every process and later start agree), then its tokenizer chunks."""

    def __init__(self, settings, converted_root: Path) -> None:
        self.settings = settings
        self.converted_root = converted_root
        self._chunker: Chunker | None = None
        self._lock = threading.Lock()

    def for_text(self, conn: sqlite3.Connection, text: str) -> Chunker:
        with self._lock:
            if self._chunker is None:
                recorded = recorded_base(conn)
                if recorded is None:
                    choice = choose_base(text)
                    recorded = record_base(conn, choice.reference, choice.reason)
                    log.info("base_model_chosen", model=recorded[0], reason=recorded[1])
                ingest = self.settings.ingest
                self._chunker = Chunker(
                    recorded[0],
                    ingest.chunk_tokens,
                    ingest.chunk_overlap,
                    ingest.min_chunk_chars,
                    self.converted_root,
                )
            return self._chunker


def chunker_for(settings, converted_root: Path) -> Chunker | AutoBaseChunker:
    if settings.model.base == AUTO:
        return AutoBaseChunker(settings, converted_root)
    ingest = settings.ingest
    return Chunker(
        settings.model.base, ingest.chunk_tokens, ingest.chunk_overlap, ingest.min_chunk_chars, converted_root
    )


def make_ingest_handler(settings, chunker: Chunker | AutoBaseChunker):
    max_bytes = int(settings.ingest.max_file_mb * 1024 * 1024)

    def handle(ctx: JobContext) -> None:
        store = DocumentStore(ctx.conn, ctx.queue)
        doc_id = ctx.job.payload["document_id"]
        doc = store.get(doc_id)
        if doc is None or doc["status"] == "deleted":
            ctx.queue.complete(ctx.job)
            return
        path = Path(doc["path"])
        try:
            stat_before = path.stat() if path.exists() else None
            data = read_checked(path, max_bytes)
            sha = hashlib.sha256(data).hexdigest()
            extracted = extract(path, data)
            chunks = chunker.for_text(ctx.conn, extracted.text)(extracted.sections)
            if not chunks:
                raise ExtractionError("no usable text after chunking")
        except ExtractionError as exc:
            store.reject(ctx.job, doc_id, str(exc), settings.ingest.retire_samples)
            log.info("document_rejected", path=doc["path"], reason=str(exc))
            return
        language = detect_language(extracted.text)
        size = stat_before.st_size if stat_before else len(data)
        mtime = stat_before.st_mtime if stat_before else 0.0
        outcome = store.store_version(
            ctx.job,
            doc_id,
            sha,
            size,
            mtime,
            language,
            chunks,
            settings.synthesis.heldout_fraction,
            settings.ingest.retire_samples,
        )
        log.info(
            "document_ingested", path=doc["path"], outcome=outcome, chunks=len(chunks), language=language
        )

    return handle
