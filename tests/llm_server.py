"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions protocol, with injectable faults.

Faults are taken from a script (one per request, in order) or drawn at random with given weights:
ok, latency:<s>, 429:<retry-after s>, 500, html, hang, truncated, nonjson, empty, wronglang, 400, 401,
length (half a JSON reply with finish_reason "length"), miscount (a judge reply one score short), down (503 until cleared). The replies are
deterministic functions of the prompt.

Two behaviours of real servers that once stalled synthesis can be switched on:
- `ramble_tokens`: after the JSON the model goes on writing that many words, one per `token_s`, unless the
  request's `max_tokens` stops it (finish_reason "length"), as a small instruct model does;
- `slots`: requests are served one slot at a time (llama.cpp's server with `--parallel 1`); the others
  wait in a queue, and the time queued counts against the client's read timeout.
`accepts` lists the `response_format` types the server takes; any other is refused with `refusal_status`.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _passage(prompt: str) -> str:
    match = re.search(r"(?:PASSAGE:|段落：)\n(.*?)(?:\n\n(?:QUESTIONS:|问题：)|$)", prompt, re.S)
    return match.group(1).strip() if match else ""


def _questions(prompt: str) -> list[str]:
    match = re.search(r"(?:QUESTIONS:|问题：)\n(.*)$", prompt, re.S)
    if not match:
        return []
    return [re.sub(r"^\d+\.\s*", "", line).strip() for line in match.group(1).splitlines() if line.strip()]


def is_chinese(text: str) -> bool:
    return len(re.findall(r"[\u4e00-\u9fff]", text)) > len(text) * 0.2


def overlap_grade(question: str, passage: str) -> int:
    """A deterministic grader: how many of the question's words (3+ letters) the passage holds."""
    words = set(re.findall(r"[a-z]{3,}", question.lower()))
    found = words & set(re.findall(r"[a-z]{3,}", passage.lower()))
    if not words or not found:
        return 0
    if found == words:
        return 3
    return 2 if len(found) * 2 >= len(words) else 1


def answer(prompt: str, wrong_language: bool = False) -> dict:
    count = int((re.search(r"(\d+)", prompt) or [0, 2])[1])
    if "TASK:questions" in prompt:
        passage = _passage(prompt)
        chinese = is_chinese(passage) != wrong_language
        if chinese:
            seeds = [s for s in re.split(r"[。！？；\n]", passage) if len(s) >= 4] or [passage[:8]]
            return {"questions": [f"{seeds[i % len(seeds)][:10]}是什么？" for i in range(count)]}
        words = [w for w in re.findall(r"[A-Za-z]{4,}", passage)] or ["topic"]
        return {
            "questions": [
                f"what about {words[i % len(words)].lower()} {words[(i * 3 + 1) % len(words)].lower()}?"
                for i in range(count)
            ]
        }
    if "TASK:rewrites" in prompt:
        items = []
        for question in _questions(prompt):
            rewrite = question.rstrip("?？") if is_chinese(question) else "how " + question.rstrip("?")
            items.append({"question": question, "rewrites": [rewrite][: max(1, count)]})
        return {"items": items}
    if "TASK:grade" in prompt:  # the gate's assessor (stages/assessor.py): 0-3 by shared words
        match = re.search(r"QUESTION:\n(.*?)\n\nPASSAGE:\n(.*)$", prompt, re.S)
        return {"grade": overlap_grade(match.group(1), match.group(2)) if match else 0}
    if "TASK:judge" in prompt:
        questions = _questions(prompt)
        return {"scores": [0.2 if "irrelevant" in q.lower() else 0.9 for q in questions]}
    return {"error": "unknown task"}


class FakeLlm:
    def __init__(
        self,
        script: list[str] | None = None,
        weights: dict[str, float] | None = None,
        seed: int = 0,
        latency: float = 0.0,
        ramble_tokens: int = 0,
        token_s: float = 0.0,
        slots: int = 0,
        accepts: tuple[str, ...] = ("json_schema", "json_object"),
        refusal_status: int = 400,
        models: tuple[str, ...] = (),
    ) -> None:
        self.script = list(script or [])
        self.ramble_tokens = ramble_tokens
        self.token_s = token_s
        self.slot_gate = threading.BoundedSemaphore(slots) if slots else None
        self.accepts = accepts
        self.refusal_status = refusal_status  # llama-cpp-python's server refuses with 500
        self.models = models  # when set, any other model name is answered 404, as vLLM and OpenAI do
        self.completion_tokens: list[int] = []
        self.weights = weights
        self.latency = latency
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.down = False
        self.requests: list[dict] = []
        self.faults: dict[str, int] = {}
        self.hang_seconds = 30.0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeLlm:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next_fault(self) -> str:
        with self.lock:
            if self.down:
                fault = "down"
            elif self.script:
                fault = self.script.pop(0)
            elif self.weights:
                names = list(self.weights)
                fault = self.rng.choices(names, [self.weights[n] for n in names])[0]
            else:
                fault = "ok"
            self.faults[fault.split(":")[0]] = self.faults.get(fault.split(":")[0], 0) + 1
            return fault

    def ramble(self, content: str, max_tokens: int | None) -> tuple[str, str]:
        """The JSON, then words without end until `max_tokens` (one word = one token here)."""
        words = content.split(" ") + ["and", "furthermore"] * (self.ramble_tokens // 2)
        finish = "stop"
        if max_tokens is not None and len(words) > max_tokens:
            words, finish = words[:max_tokens], "length"
        time.sleep(self.token_s * len(words))
        with self.lock:
            self.completion_tokens.append(len(words))
        return " ".join(words), finish

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as real servers do; otherwise delayed ACKs add 40 ms

            def log_message(self, *args) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    pass  # the client was killed mid-request: that is the point of some tests

            def _send(
                self,
                status: int,
                body: bytes,
                content_type: str = "application/json",
                headers: dict | None = None,
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake.lock:
                    fake.requests.append(
                        {
                            "time": time.monotonic(),
                            "auth": self.headers.get("Authorization"),
                            "path": self.path,
                            "body": body,
                        }
                    )
                if not self.path.endswith("/v1/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                if fake.models and body.get("model") not in fake.models:
                    message = f"The model `{body.get('model')}` does not exist."
                    self._send(404, json.dumps({"error": {"message": message}}).encode())
                    return
                fmt = (body.get("response_format") or {}).get("type")
                if fmt is not None and fmt not in fake.accepts:
                    message = f"validation error: ('body', 'response_format', 'type') {fmt} not supported"
                    self._send(fake.refusal_status, json.dumps({"error": {"message": message}}).encode())
                    return
                if fake.slot_gate is not None:
                    with fake.slot_gate:  # queued behind the busy slot, as a one-slot server does
                        self._serve(body)
                else:
                    self._serve(body)

            def _serve(self, body: dict) -> None:
                fault = fake.next_fault()
                name, _, arg = fault.partition(":")
                if fake.latency:
                    time.sleep(fake.latency)
                prompt = body["messages"][-1]["content"] if body.get("messages") else ""
                first_prompt = next(
                    (m["content"] for m in body.get("messages", []) if m["role"] == "user"), ""
                )
                if name == "latency":
                    time.sleep(float(arg or 1))
                elif name == "hang":
                    time.sleep(fake.hang_seconds)
                    return
                elif name == "429":
                    self._send(
                        429, b'{"error": {"message": "rate limited"}}', headers={"Retry-After": arg or "1"}
                    )
                    return
                elif name in ("500", "down"):
                    self._send(500 if name == "500" else 503, b'{"error": {"message": "server error"}}')
                    return
                elif name == "html":
                    self._send(502, b"<!DOCTYPE html><html><body>Bad gateway</body></html>", "text/html")
                    return
                elif name in ("400", "401"):
                    self._send(int(name), json.dumps({"error": {"message": f"fake {name} error"}}).encode())
                    return
                if name == "miscount":  # a small model's judge reply: one score short
                    reply_value = answer(first_prompt if "TASK:" not in prompt else prompt)
                    reply_value["scores"] = reply_value.get("scores", [0.5, 0.5])[:-1]
                    content = json.dumps(reply_value)
                elif name == "nonjson":
                    content = "Sure! Here are some questions you might ask."
                elif name == "empty":
                    content = json.dumps({"questions": []})
                else:
                    prompt_for_answer = first_prompt if "TASK:" not in prompt else prompt
                    content = json.dumps(
                        answer(prompt_for_answer, wrong_language=name == "wronglang"), ensure_ascii=False
                    )
                finish = "stop"
                if name == "length":
                    content, finish = content[: len(content) // 2], "length"
                elif fake.ramble_tokens:
                    content, finish = fake.ramble(content, body.get("max_tokens"))
                reply = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": finish,
                            }
                        ],
                    },
                    ensure_ascii=False,
                ).encode()
                if name == "truncated":
                    reply = reply[: len(reply) // 2]
                    self._send(200, reply)
                    return
                self._send(200, reply)

        return Handler
