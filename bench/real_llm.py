"""Synthesis against a real OpenAI-compatible server, clean or behind injected faults.

Runs the real daemon (a subprocess, default settings except the LLM url) on documents dropped into a fresh
inbox, with a fault-injecting proxy on 127.0.0.1 between it and the server, and waits until every chunk's
synthesize job has ended and the filter has run. Prints completions per minute, tokens per reply,
valid-JSON rate, questions stored / judged / kept, jobs dead, and whether the daemon stayed up.

    ../shared/tools/local-llm.sh serve 8091 0.5b            # a real llama.cpp server (benchmarks only)
    python -m bench.real_llm --upstream http://127.0.0.1:8091 --topics 0               # the two guides
    python -m bench.real_llm --upstream http://127.0.0.1:8091 --topics 0 --faults      # 10% 429, 10% 500,
                                                                                        # 10% truncated, 3% hangs
    python -m bench.real_llm --upstream http://127.0.0.1:8091 --topics 9 [--faults]    # ~100 chunks
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from daemon.bundled_docs import write_samples
from stages.llm import chat_completions_url, extract_json

FAULT_MIX = {"429": 0.10, "500": 0.10, "truncated": 0.10, "hang": 0.03}


class FaultProxy:
    """Forwards chat requests to the real server; injects faults drawn with the given probabilities."""

    def __init__(self, upstream: str, faults: dict[str, float], seed: int = 0, hang_s: float = 150.0) -> None:
        self.upstream = chat_completions_url(upstream)
        self.faults = faults
        self.rng = random.Random(seed)
        self.hang_s = hang_s
        self.lock = threading.Lock()
        self.injected: dict[str, int] = {}
        self.replies: list[dict] = []  # one per upstream 200: tokens, finish reason, valid JSON, seconds
        self.http = httpx.Client(timeout=httpx.Timeout(900.0))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def draw(self) -> str:
        with self.lock:
            roll, edge = self.rng.random(), 0.0
            for name, share in self.faults.items():
                edge += share
                if roll < edge:
                    self.injected[name] = self.injected.get(name, 0) + 1
                    return name
            return "ok"

    def forward(self, body: bytes) -> tuple[int, bytes]:
        started = time.monotonic()
        response = self.http.post(self.upstream, content=body, headers={"Content-Type": "application/json"})
        if response.status_code == 200:
            record = {"seconds": time.monotonic() - started}
            try:
                data = response.json()
                choice = data["choices"][0]
                record["tokens"] = (data.get("usage") or {}).get("completion_tokens")
                record["finish"] = choice.get("finish_reason")
                try:
                    record["valid_json"] = isinstance(extract_json(choice["message"]["content"]), dict)
                except ValueError:
                    record["valid_json"] = False
                record["structured"] = (json.loads(body).get("response_format") or {}).get("type")
            except (ValueError, KeyError, IndexError, TypeError):
                record["valid_json"] = False
            with self.lock:
                self.replies.append(record)
        return response.status_code, response.content

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fault = proxy.draw()
                if fault == "429":
                    self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "2"})
                elif fault == "500":
                    self._send(500, b'{"error": {"message": "injected server error"}}')
                elif fault == "hang":
                    time.sleep(proxy.hang_s)
                    self.close_connection = True
                else:
                    try:
                        status, content = proxy.forward(body)
                    except httpx.HTTPError as exc:
                        self._send(502, json.dumps({"error": {"message": str(exc)}}).encode())
                        return
                    if fault == "truncated" and status == 200:
                        content = content[: len(content) // 2]
                    self._send(status, content)

        return Handler


def scalar(db: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute(sql).fetchone()
        return int(row[0] or 0) if row else 0
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def run(args: argparse.Namespace, workdir: Path) -> dict:
    proxy = FaultProxy(args.upstream, FAULT_MIX if args.faults else {}, seed=args.seed)
    inbox, state = workdir / "inbox", workdir / "state"
    config = workdir / "config.toml"
    config.write_text(
        f'[paths]\ninbox = "{inbox}"\nstate_dir = "{state}"\n'
        f'[llm]\nurl = "{proxy.url}"\nmodel = "{args.model}"\n'
        f"[training]\nmin_new_samples = 1000000\n"  # synthesis only: no round during the benchmark
    )
    documents = write_samples(inbox, topics_limit=args.topics)
    db = state / "embedtune.db"
    log = (workdir / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "--config", str(config), "run"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()
    synthesized_at = None
    try:
        while time.monotonic() - started < args.limit_minutes * 60:
            time.sleep(2)
            if daemon.poll() is not None:
                break
            ingested = scalar(db, "SELECT COUNT(*) FROM documents WHERE status IN ('ingested','rejected')")
            open_jobs = scalar(
                db,
                "SELECT COUNT(*) FROM jobs WHERE kind IN ('ingest','synthesize') "
                "AND state IN ('pending','running','failed')",
            )
            if ingested >= documents and open_jobs == 0 and scalar(db, "SELECT COUNT(*) FROM chunks"):
                synthesized_at = synthesized_at or time.monotonic() - started
                if scalar(db, "SELECT COUNT(*) FROM jobs WHERE state IN ('pending','running','failed')") == 0:
                    break
        elapsed = time.monotonic() - started
        alive = daemon.poll() is None
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
    replies = proxy.replies
    tokens = [r["tokens"] for r in replies if r.get("tokens") is not None]
    return {
        "faults": args.faults,
        "documents": documents,
        "chunks": scalar(db, "SELECT COUNT(*) FROM chunks"),
        "synthesis_minutes": round(synthesized_at / 60, 2) if synthesized_at else None,
        "total_minutes": round(elapsed / 60, 2),
        "daemon_alive": alive,
        "completions": len(replies),
        "completions_per_min": round(len(replies) / (elapsed / 60), 1),
        "tokens_per_reply_mean": round(sum(tokens) / len(tokens), 1) if tokens else None,
        "tokens_per_reply_max": max(tokens) if tokens else None,
        "cut_by_length": sum(r.get("finish") == "length" for r in replies),
        "valid_json_rate": round(sum(r["valid_json"] for r in replies) / len(replies), 3)
        if replies
        else None,
        "reply_seconds_mean": round(sum(r["seconds"] for r in replies) / len(replies), 2)
        if replies
        else None,
        "structured": sorted({str(r.get("structured")) for r in replies}),
        "injected": proxy.injected,
        "chunks_synthesized": scalar(db, "SELECT COUNT(DISTINCT chunk_id) FROM samples"),
        "questions": scalar(db, "SELECT COUNT(*) FROM samples WHERE kind IN ('question','rewrite')"),
        "judged_pass": scalar(db, "SELECT COUNT(*) FROM samples WHERE judge_score >= 0.6"),
        "kept": scalar(db, "SELECT COUNT(*) FROM samples WHERE kept = 1"),
        "jobs_done": scalar(db, "SELECT COUNT(*) FROM jobs WHERE kind='synthesize' AND state='done'"),
        "jobs_dead": scalar(db, "SELECT COUNT(*) FROM jobs WHERE state='dead'"),
        "attempts_failed": scalar(
            db,
            "SELECT COALESCE(SUM(attempts),0) - COUNT(*) FROM jobs WHERE kind='synthesize' AND state='done'",
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", required=True, help="the real server, e.g. http://127.0.0.1:8091")
    parser.add_argument("--model", default="local")
    parser.add_argument("--topics", type=int, default=0, help="Python reference topics beside the two guides")
    parser.add_argument(
        "--faults", action="store_true", help="inject 10%% 429, 10%% 500, 10%% truncated, 3%% hangs"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-minutes", type=float, default=40.0)
    parser.add_argument("--output", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="embedtune-real-llm-") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
