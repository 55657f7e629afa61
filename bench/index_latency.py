"""New document -> searchable, the way the daemon does it: a real daemon (embedded defaults: settle time,
the 5 s index check, a fresh child process per sync that loads the model) with synthesis and the filter
competing for the same cores, as they do when people drop files.

A seed corpus is dropped into the inbox and the daemon left to ingest and index it; then new documents
arrive one at a time and each is timed from the moment its file is written until it is ingested and until
the live collection holds its chunks. The same run also times a sync in one warm process
(`IndexService.sync` after one new document: what `bench.index --incremental` measures), the baseline
the daemon path is compared with.

    python -m bench.index_latency [--seed-documents 60] [--new-documents 5] [--doc-chunks 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.index import add_documents, passages


def write_document(inbox: Path, name: str, texts, chunks: int) -> Path:
    """A text file whose paragraphs are real passages (one chunk each at the default chunk size)."""
    path = inbox / f"{name}.txt"
    staging = inbox / f".{name}.tmp"  # dot files are ignored by the watcher: the file appears whole
    staging.write_text("\n\n".join(next(texts) for _ in range(chunks)) + "\n", encoding="utf-8")
    staging.rename(path)
    return path


def wait(predicate, timeout: float, what: str) -> float:
    """Seconds until predicate() holds (the daemon's main loop runs in its thread meanwhile)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def main() -> None:
    from daemon.indexing import IndexService
    from daemon.logs import configure_logging
    from daemon.service import Daemon
    from daemon.settings import load_settings
    from state.db import connect
    from state.index_records import IndexRecords, chunk_signature

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed-documents", type=int, default=60)
    parser.add_argument("--new-documents", type=int, default=5)
    parser.add_argument("--doc-chunks", type=int, default=5)
    args = parser.parse_args()
    configure_logging("warning", "console")
    work = Path(tempfile.mkdtemp(prefix="embedtune-latency-"))
    settings = load_settings(None)
    settings.paths.inbox = work / "inbox"
    settings.paths.state_dir = work / "state"
    settings.paths.inbox.mkdir(parents=True)
    settings.training.min_new_samples = 10**9  # no round: this measures ingest and index only
    texts = passages()
    for number in range(args.seed_documents):
        write_document(settings.paths.inbox, f"seed{number}", texts, args.doc_chunks)
    daemon = Daemon(settings)
    started = time.monotonic()
    daemon.start()
    loop = threading.Thread(target=daemon.run_forever, name="daemon-loop", daemon=True)
    loop.start()  # what `embedtune run` does after start-up: heartbeat, the 5 s index check, rounds
    conn = connect(daemon.layout.database, readonly=True)

    def indexed() -> bool:
        live = IndexRecords(conn).live()
        return live is not None and live.signature == chunk_signature(conn)

    def ingested(path: Path) -> bool:
        row = conn.execute("SELECT status FROM documents WHERE path = ?", (str(path),)).fetchone()
        return row is not None and row[0] == "ingested"

    try:
        wait(
            lambda: all(ingested(p) for p in settings.paths.inbox.glob("seed*.txt")),
            3600,
            "seed ingest",
        )
        wait(indexed, 3600, "seed index")
        seed_s = time.monotonic() - started
        rows = []
        for number in range(args.new_documents):
            path = write_document(settings.paths.inbox, f"new{number}", texts, args.doc_chunks)
            written = time.monotonic()
            wait(lambda path=path: ingested(path), 600, f"{path.name} ingested")
            ingest_s = time.monotonic() - written
            wait(indexed, 600, f"{path.name} indexed")
            rows.append((ingest_s, time.monotonic() - written))
    finally:
        daemon.stop_requested.set()
        loop.join(timeout=60)
        daemon.shutdown()
    # Baseline, same run: a document stored as the ingest job stores it, then a sync in this process,
    # once to load the model (warm) and once timed.
    service = IndexService(settings, daemon.layout)
    writable = connect(daemon.layout.database)
    add_documents(writable, texts, 1, args.doc_chunks, start=10**6)
    service.sync(writable)
    add_documents(writable, texts, 1, args.doc_chunks, start=10**6 + 1)
    synced = time.monotonic()
    report = service.sync(writable)
    warm_s = time.monotonic() - synced
    chunks = conn.execute("SELECT COUNT(*) FROM chunks WHERE active = 1").fetchone()[0]
    ingest = statistics.median(r[0] for r in rows)
    searchable = statistics.median(r[1] for r in rows)
    print(
        f"seed: {args.seed_documents} documents, {chunks} chunks, ingested and indexed in {seed_s:.0f}s\n"
        f"new document ({args.doc_chunks} chunks), file written -> ingested: median {ingest:.1f}s, "
        f"-> searchable: median {searchable:.1f}s (each: {', '.join(f'{r[1]:.1f}' for r in rows)})\n"
        f"baseline, a sync in a warm process ({report.added} chunks added): {warm_s:.2f}s; "
        f"daemon path / warm sync: {searchable / max(warm_s, 1e-6):.0f}x"
    )


if __name__ == "__main__":
    main()
