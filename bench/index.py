"""Vector-store benchmark: a full (re-)index of N chunks, the no-op check, and incremental upserts.

Builds a state folder whose chunks are real passages from ../shared/data (all four corpora, cut to 800
characters; beyond the ~21k passages they hold, repeats carry a copy marker so every chunk text differs),
stored through the same DocumentStore calls the ingest job makes. Then, with the real model and Milvus Lite:

- full fill: IndexService.sync on an empty store (what a promotion costs), split into encoding and
  Milvus time, chunks/s and peak RSS;
- no-op sync: nothing changed (the diff the daemon pays when it checks);
- incremental: one new document of --doc-chunks chunks at a time, synced (the latency of a new document
  reaching the live collection, after ingest);
- alias swap and top-10 search latency.

    python -m bench.index --chunks 10000 [--model packaged:all-MiniLM-L6-v2] [--incremental 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
OUT = Path(__file__).resolve().parent / "out"


def passages(limit_chars: int = 800):
    """Real passages from every corpus, round-robin, forever (copies marked so texts stay distinct)."""
    corpora = []
    for name in ("nfcorpus", "zh-medqa", "dbpedia-5k", "msmarco-5k"):
        path = DATA / name / "corpus.jsonl"
        if path.exists():
            with open(path, encoding="utf-8") as handle:
                corpora.append([json.loads(line)["text"][:limit_chars] for line in handle if line.strip()])
    if not corpora:
        raise SystemExit(f"no corpora under {DATA}")
    copy = 0
    while True:
        for texts in zip(*corpora, strict=False):
            for text in texts:
                yield text if copy == 0 else f"[{copy}] {text}"
        copy += 1


def add_documents(conn, texts, documents: int, per_doc: int, start: int, folder: Path | None = None) -> int:
    """Documents of `per_doc` chunks, stored as the ingest job stores them. Returns chunks added. With
    `folder` (an inbox), each document is also a real file there whose size and mtime match its row, so a
    daemon started on the state finds its inbox unchanged."""
    from state.documents import DocumentStore, NewChunk
    from state.queue import JobQueue

    queue = JobQueue(conn)
    store = DocumentStore(conn, queue)
    added = 0
    for number in range(start, start + documents):
        path = f"{folder}/doc{number}.txt" if folder is not None else f"/bench/doc{number}.txt"
        chunks = []
        for i in range(per_doc):
            text = next(texts)
            chunks.append(NewChunk(i, text, "", hashlib.sha256(f"\x00{text}".encode()).hexdigest(), "en"))
        body = "\n\n".join(c.text for c in chunks).encode()
        if folder is not None:
            Path(path).write_bytes(body)
            os.utime(path, (float(number), float(number)))
        store.file_seen(path, len(body), float(number))
        job = queue.claim("bench", ["ingest"])
        store.store_version(
            job,
            job.payload["document_id"],
            hashlib.sha256(body).hexdigest(),
            len(body),
            float(number),
            "en",
            chunks,
            0.1,
        )
        added += per_doc
    return added


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_fill_parts() -> dict[str, float]:
    """Accumulate the seconds an index fill spends encoding and in Milvus upserts (patched in place)."""
    from daemon import indexing
    from state.vector_store import VectorStore

    timers = {"encode": 0.0, "store": 0.0}

    def timed(name, function):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                timers[name] += time.perf_counter() - started

        return wrapper

    indexing._LazyEncoder.passages = timed("encode", indexing._LazyEncoder.passages)
    VectorStore.upsert = timed("store", VectorStore.upsert)
    return timers


def export_for_fill(settings, layout, conn) -> dict:
    """The ONNX export the daemon's export job would make before the fill (checked on 256 chunks)."""

    from daemon.serving import base_model_path
    from daemon.step_params import torch_encode_params
    from stages.backend_check import CheckSample, check_variants
    from stages.onnx_export import export_model
    from state.samples import kept_pairs_sample

    passages, queries, relevant = kept_pairs_sample(conn, 256, 64)
    sample = CheckSample(passages, queries, relevant)
    params = torch_encode_params(settings)
    started = time.perf_counter()
    record = export_model(
        base_model_path(settings, conn),
        layout.exports,
        lambda path, files: check_variants(path, files, sample, params),
    )
    out = {"seconds": round(time.perf_counter() - started, 1), "failed": record.failed}
    out.update({name: {"passed": c.passed, "cosine_p1": c.cosine_p1} for name, c in record.variants.items()})
    print(f"export: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--doc-chunks", type=int, default=10)
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--incremental", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnx"],
        help="onnx: export the model first (as the daemon does, checked on 256 of the chunks) and fill with it",
    )
    parser.add_argument("--quantize", default="auto", choices=["auto", "none", "int8"])
    args = parser.parse_args()

    from daemon.indexing import IndexService, index_target
    from daemon.logs import configure_logging
    from daemon.settings import Settings
    from state.db import Database
    from state.layout import StateLayout
    from state.vector_store import open_store

    configure_logging("warning", "console")
    timers = time_fill_parts()

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.model_validate(
            {
                "paths": {"state_dir": f"{tmp}/state", "inbox": f"{tmp}/inbox"},
                "model": {
                    "base": args.model,
                    "device": "cpu",
                    "backend": args.backend,
                    "quantize": args.quantize,
                },
                "index": {"batch_size": args.batch_size},
            }
        )
        layout = StateLayout(settings.paths.state_dir).ensure()
        conn = Database(layout.database).conn
        texts = passages()
        started = time.perf_counter()
        documents = args.chunks // args.doc_chunks
        add_documents(conn, texts, documents, args.doc_chunks, 0)
        build_s = time.perf_counter() - started
        export = export_for_fill(settings, layout, conn) if args.backend != "torch" else None
        service = IndexService(settings, layout)

        started = time.perf_counter()
        report = service.sync(conn)
        full_s = time.perf_counter() - started
        full = {
            "chunks": report.added,
            "seconds": round(full_s, 1),
            "encode_s": round(timers["encode"], 1),
            "milvus_upsert_s": round(timers["store"], 1),
            "other_s": round(full_s - timers["encode"] - timers["store"], 1),
            "chunks_per_s": round(report.added / full_s, 1),
            "peak_rss_mb": round(peak_rss_mb()),
        }
        print(f"full fill: {json.dumps(full)}", flush=True)

        noop = []
        for _ in range(3):
            started = time.perf_counter()
            service.sync(conn)
            noop.append(time.perf_counter() - started)

        latencies = []
        for i in range(args.incremental):
            add_documents(conn, texts, 1, args.doc_chunks, documents + i)
            started = time.perf_counter()
            step = service.sync(conn)
            latencies.append(time.perf_counter() - started)
            assert step.added == args.doc_chunks, step

        target = index_target(settings)
        with open_store(target) as store:
            started = time.perf_counter()
            store.point_alias(settings.index.alias, report.collection)
            swap_ms = (time.perf_counter() - started) * 1000
        from daemon.step_params import encode_params
        from stages.encoder import Encoder
        from stages.models import resolve_model_path

        encoder = Encoder(resolve_model_path(args.model), encode_params(settings))
        queries = encoder.queries([f"question {i} about treatment and history" for i in range(20)])
        with open_store(target) as store:
            store.search(settings.index.alias, queries[:1], 10)  # load
            started = time.perf_counter()
            for vector in queries:
                store.search(settings.index.alias, vector[None, :], 10)
            search_ms = (time.perf_counter() - started) * 1000 / len(queries)
        db_mb = sum(p.stat().st_size for p in Path(target.uri).rglob("*") if p.is_file()) / 2**20

    result = {
        "chunks": args.chunks,
        "model": args.model,
        "build_state_s": round(build_s, 1),
        "backend": args.backend,
        "export": export,
        "full_fill": full,
        "noop_sync_s": round(statistics.median(noop), 2),
        "incremental_doc_chunks": args.doc_chunks,
        "incremental_sync_s_median": round(statistics.median(latencies), 2),
        "incremental_sync_s_max": round(max(latencies), 2),
        "alias_swap_ms": round(swap_ms, 1),
        "search_top10_ms": round(search_ms, 1),
        "milvus_lite_mb": round(db_mb, 1),
        "peak_rss_mb": round(peak_rss_mb()),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / f"index-{args.chunks}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
