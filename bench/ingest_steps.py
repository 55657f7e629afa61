"""Where ingest's CPU goes: each step of the ingest job, and the built-in synthesis each new chunk then
gets, run one after another in one thread on a generated corpus (no daemon, no other work).

The daemon runs these steps in threads of one Python process, so whatever holds the GIL runs one at a
time; the sum printed as "CPU per MB" bounds what any arrangement can reach: one core can do at most
1/that MB/s, two cores at most twice that, and only if every step ran in parallel processes with nothing
else on the machine. This is the floor profile for issue 26's ingest target (docs/benchmarks.md).

    python -m bench.ingest_steps [--files 300] [--kinds txt] [--sentences 400,800] [--model packaged:all-MiniLM-L6-v2]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from daemon.ingest import Chunker
from daemon.logs import configure_logging
from daemon.settings import Settings
from daemon.synthesis import SynthesisService
from daemon.workers import WorkerPool
from stages.extract import extract, read_checked
from stages.llm import CircuitBreaker
from stages.text import detect_language
from state.db import Database
from state.documents import DocumentStore
from state.queue import JobQueue
from tests.docs_factory import generate_corpus


class StepClock:
    """Seconds spent per named step, summed over the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def step(self, name: str):
        started = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--kinds", default="txt", help="file kinds, comma-separated")
    parser.add_argument("--sentences", default="400,800", help="sentences per file, MIN,MAX")
    parser.add_argument(
        "--model", default="packaged:all-MiniLM-L6-v2", help="model.base, whose tokenizer chunks"
    )
    args = parser.parse_args()
    configure_logging("error", "console")
    root = Path(tempfile.mkdtemp(prefix="ingest-steps-"))
    low, high = (int(n) for n in args.sentences.split(","))
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    files = generate_corpus(root / "corpus", args.files, kinds=kinds, sentences=(low, high))
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    settings = Settings.model_validate(
        {
            "paths": {"inbox": str(root / "inbox"), "state_dir": str(root / "state")},
            "model": {"base": args.model},
        }
    )
    ingest = settings.ingest
    chunker = Chunker(args.model, ingest.chunk_tokens, ingest.chunk_overlap, ingest.min_chunk_chars)
    queue = JobQueue(Database(root / "state.db").conn)
    store = DocumentStore(queue.conn, queue)
    clock = StepClock()
    chunks = 0
    for path in files:
        with clock.step("record the file, queue its job"):
            stat = path.stat()
            store.file_seen(str(path), stat.st_size, stat.st_mtime)
        with clock.step("claim the ingest job"):
            job = queue.claim("bench", ["ingest"])
        with clock.step("read, hash, extract"):
            data = read_checked(path, 1 << 30)
            sha = hashlib.sha256(data).hexdigest()
            extracted = extract(path, data)
        with clock.step("chunk (split, count tokens)"):
            made = chunker(extracted.sections)
        with clock.step("detect the language"):
            language = detect_language(extracted.text)
        with clock.step("store chunks, queue synthesis"):
            store.store_version(
                job, job.payload["document_id"], sha, len(data), stat.st_mtime, language, made, 0.1
            )
        chunks += len(made)
    ingest_seconds = sum(clock.seconds.values())
    service = SynthesisService(settings, CircuitBreaker())
    pool = WorkerPool(
        "bench", root / "state.db", {"synthesize": service.handle}, 1, batches={"synthesize": service}
    )
    with clock.step("synthesis without an LLM (as the pool runs it)"):
        while pool.work_once(queue, "bench"):
            pass
    total = sum(clock.seconds.values())
    print(f"files {len(files)} ({megabytes:.1f} MB; {'/'.join(kinds)}), chunks {chunks}, model {args.model}")
    print(f"{'step':40s} {'seconds':>8s} {'share':>6s} {'MB/s alone':>11s}")
    for name, seconds in clock.seconds.items():
        print(f"{name:40s} {seconds:8.2f} {seconds / total:6.1%} {megabytes / seconds:11.1f}")
    print(
        f"ingest job: {ingest_seconds / megabytes:.3f} core-s per MB -> at most {megabytes / ingest_seconds:.2f} MB/s "
        f"on one core, {2 * megabytes / ingest_seconds:.2f} on two"
    )
    print(
        f"with synthesis: {total / megabytes:.3f} core-s per MB -> at most {megabytes / total:.2f} MB/s on one core, "
        f"{2 * megabytes / total:.2f} on two"
    )


if __name__ == "__main__":
    main()
