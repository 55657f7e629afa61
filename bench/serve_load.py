"""`embedtune serve` under load: /v1/embeddings throughput against the same model run through
sentence-transformers in this process (the same-run baseline, with the vectors compared), and a promotion
and a rollback while clients keep asking (failed requests, answers whose vector is not the named
version's, switch-over time).

    python -m bench.serve_load [--model packaged:all-MiniLM-L6-v2] [--data ../shared/data/nfcorpus]
                               [--seconds 20] [--clients 4]

The state folder is a temporary one with the set's first passages as chunks (the index off: the load
here is the model, not the store; bench/serve_latency.py measures search at scale). Version 1 is the base
model with its weights nudged (so each answer's vector tells which version made it).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

QUERY = "how do vaccines train the immune system"


def passages(data: Path | None, count: int) -> list[str]:
    from bench.index import passages as bench_passages

    if data is not None:
        from stages.evalsets import load_eval_file

        return load_eval_file(str(data), "anchor", "positive", "data").corpus_texts[:count]
    texts = bench_passages()
    return [next(texts) for _ in range(count)]


def nudged_copy(model: Path, folder: Path) -> Path:
    """The model with its weights moved a little: another version whose vectors differ from the base's."""
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model), device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in st.parameters():
            if parameter.dim() == 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    st.save(str(folder))
    return folder


def timed_requests(url: str, body: dict, seconds: float) -> tuple[int, float]:
    import httpx

    done, started = 0, time.perf_counter()
    with httpx.Client(timeout=60) as client:
        while time.perf_counter() - started < seconds:
            response = client.post(url, json=body)
            response.raise_for_status()
            done += 1
    return done, time.perf_counter() - started


def throughput(url: str, model: Path, texts: list[str], seconds: float) -> None:
    """Queries one at a time and 32-passage batches: HTTP against sentence-transformers, same texts."""
    import httpx
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model), device="cpu")
    batch = texts[:32]
    rows = []
    for name, body, size, direct in (
        ("one query", {"input": QUERY}, 1, lambda: st.encode([QUERY], normalize_embeddings=True)),
        (
            "32 passages",
            {"input": batch, "input_type": "passage"},
            32,
            lambda: st.encode(batch, batch_size=32, normalize_embeddings=True),
        ),
    ):
        calls, elapsed = timed_requests(f"{url}/v1/embeddings", body, seconds)
        direct()  # warm
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            direct()
            count += 1
        base_elapsed = time.perf_counter() - started
        served = np.asarray(
            [d["embedding"] for d in httpx.post(f"{url}/v1/embeddings", json=body).json()["data"]]
        )
        cosine = float((served * direct()).sum(1).min())
        http_rate, st_rate = calls * size / elapsed, count * size / base_elapsed
        rows.append((name, http_rate, st_rate, cosine))
    print("\n/v1/embeddings against sentence-transformers in this process (texts per second)")
    print(f"{'request':<12} {'HTTP':>9} {'ST':>9} {'ratio':>6} {'min cosine':>11}")
    for name, http_rate, st_rate, cosine in rows:
        print(f"{name:<12} {http_rate:>9.1f} {st_rate:>9.1f} {http_rate / st_rate:>6.2f} {cosine:>11.6f}")


class Load:
    """Clients asking /v1/embeddings and /v1/search in turn until stopped; every answer is kept."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answers: list[
            tuple[float, str, str, list[float] | None, int]
        ] = []  # t, endpoint, version, vec, status
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        import httpx

        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                if index % 2 == 0:
                    response = client.post(f"{self.url}/v1/embeddings", json={"input": QUERY})
                    body = response.json() if response.status_code == 200 else {}
                    vector = body["data"][0]["embedding"] if body else None
                    row = (
                        time.perf_counter(),
                        "embeddings",
                        body.get("model", ""),
                        vector,
                        response.status_code,
                    )
                else:
                    response = client.post(f"{self.url}/v1/search", json={"query": QUERY, "k": 5})
                    body = response.json() if response.status_code == 200 else {}
                    row = (time.perf_counter(), "search", body.get("model", ""), None, response.status_code)
                with self.lock:
                    self.answers.append(row)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def switch_over(answers, since: float, until: float, version: str) -> float:
    """Seconds from `since` to the first answer naming `version` after which, up to `until`, no answered
    request names another."""
    window = [a for a in answers if since <= a[0] < until and a[4] == 200]
    for i, answer in enumerate(window):
        if answer[2] == version and all(a[2] == version for a in window[i:]):
            return answer[0] - since
    return float("nan")


def promotion_under_load(url: str, settings, layout, db, nudged: Path, base_vector, new_vector, args) -> None:
    from state.registry import ModelRegistry

    registry = ModelRegistry(db.conn, layout)
    record = registry.register(nudged)
    with Load(url, args.clients) as load:
        time.sleep(args.seconds / 2)
        promoted_at = time.perf_counter()
        registry.promote(record.id)
        time.sleep(args.seconds)
        rolled_at = time.perf_counter()
        registry.rollback(Path(settings.model.base))
        time.sleep(args.seconds)
    answers = load.answers
    failed = [a for a in answers if a[4] != 200]
    expected = {"base": np.asarray(base_vector), f"v{record.id}": np.asarray(new_vector)}
    wrong = [
        a for a in answers if a[3] is not None and float(np.dot(np.asarray(a[3]), expected[a[2]])) < 0.9999
    ]
    latencies = np.diff([a[0] for a in answers])
    print(f"\npromotion and rollback under load ({args.clients} clients, {len(answers)} answers)")
    print(f"failed requests: {len(failed)}  ({sorted({a[4] for a in failed})})")
    print(f"embeddings answers whose vector is not the named version's: {len(wrong)}")
    print(f"versions named: {sorted({a[2] for a in answers})}")
    ended = answers[-1][0] + 1 if answers else rolled_at
    first_new = next((a[0] for a in answers if a[0] >= promoted_at and a[2] == f"v{record.id}"), float("nan"))
    first_back = next((a[0] for a in answers if a[0] >= rolled_at and a[2] == "base"), float("nan"))
    print(f"first answer from v{record.id}: {first_new - promoted_at:.2f} s after the promotion; first from")
    print(f"the base again: {first_back - rolled_at:.2f} s after the rollback (answers started before a swap")
    print("finish on the version they started with, and name it; the switch-over below waits for them)")
    print(
        f"switch-over to v{record.id}: {switch_over(answers, promoted_at, rolled_at, f'v{record.id}'):.2f} s"
    )
    print(f"switch-over back to base: {switch_over(answers, rolled_at, ended, 'base'):.2f} s")
    if len(latencies):
        print(f"answers per second: {len(answers) / (answers[-1][0] - answers[0][0]):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--data", type=Path, default=None, help="a BEIR folder for the passages")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=200)
    args = parser.parse_args()

    from bench.index import add_documents
    from daemon.logs import configure_logging
    from daemon.serve import serve_in_thread
    from daemon.settings import Settings
    from stages.models import resolve_model_path
    from state.db import Database
    from state.layout import StateLayout

    root = Path(tempfile.mkdtemp(prefix="embedtune-serve-load-"))
    try:
        model = resolve_model_path(args.model, root / "packaged")
        settings = Settings.model_validate(
            {
                "paths": {"state_dir": str(root / "state"), "inbox": str(root / "inbox")},
                "model": {"base": str(model), "device": "cpu", "backend": "torch"},
                "index": {"enabled": False},
                "serve": {"poll_s": 0.5},
                "logging": {"level": "warning"},
            }
        )
        configure_logging("warning", "console")
        layout = StateLayout(settings.paths.state_dir).ensure()
        db = Database(layout.database)
        texts = passages(args.data, args.chunks)
        add_documents(db.conn, iter(texts), documents=args.chunks // 10, per_doc=10, start=0)
        nudged = nudged_copy(model, root / "nudged")
        from sentence_transformers import SentenceTransformer

        base_vector = SentenceTransformer(str(model), device="cpu").encode(
            [QUERY], normalize_embeddings=True
        )[0]
        new_vector = SentenceTransformer(str(nudged), device="cpu").encode(
            [QUERY], normalize_embeddings=True
        )[0]
        print(
            f"model {args.model}; cosine of the two versions' vectors for the probe: {np.dot(base_vector, new_vector):.4f}"
        )
        server, state, thread, url = serve_in_thread(settings)
        try:
            import httpx

            deadline = time.monotonic() + 300
            while httpx.get(f"{url}/health").status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not become ready")
                time.sleep(0.2)
            throughput(url, model, texts, args.seconds)
            promotion_under_load(url, settings, layout, db, nudged, base_vector, new_vector, args)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            state.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
