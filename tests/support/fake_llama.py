"""A small fake llama-server that records what the bridge sends (for exact body assertions).

It speaks just enough of llama-server's HTTP API for a :class:`bridge.service.bridge.Bridge`
to use it as a backend: ``/health``, ``/props`` (slots and per-slot ``n_ctx``),
``/tokenize`` (one token per whitespace-separated word, so tests can compute
budgets by hand), and streamed or non-streamed ``/v1/chat/completions`` and
``/v1/completions``. Every generation request body is recorded.

The real llama.cpp server is used for the end-to-end tests of the same features;
this one exists to assert *exactly* what the bridge sent (system prompt, history,
sampling fields), which a real server does not report.

A test can hold a generation mid-stream: :meth:`FakeLlama.hold_next` returns an
Event; the next generation request streams its first piece and then waits for it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOLD_MAX_S = 60.0  # a held stream continues after this even if the test forgot it

Answer = Callable[[dict[str, Any]], list[str]]


def words(text: str) -> int:
    """The fake tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def default_answer(body: dict[str, Any]) -> list[str]:
    return ["Hello", " from", " the", " fake."]


class FakeLlama:
    """A fake llama-server on 127.0.0.1 (a free port).

    Args:
        n_ctx: per-slot context reported by ``/props``.
        slots: ``total_slots`` reported by ``/props``.
        answer: the text pieces to stream for a request body.
        tool_calls: the ``tool_calls`` of a non-streamed chat answer for a request body
            (none if unset or it returns none).
    """

    def __init__(self, *, n_ctx: int = 4096, slots: int = 2,
                 answer: Answer = default_answer,
                 tool_calls: Callable[[dict[str, Any]], list[dict[str, Any]] | None] | None
                 = None) -> None:
        self.n_ctx = n_ctx
        self.slots = slots
        self.answer = answer
        self.tool_calls = tool_calls
        self.bodies: list[tuple[str, dict[str, Any]]] = []  # (path, body) of generations
        self.tokenize_calls = 0
        self._cond = threading.Condition()
        self._holds: list[threading.Event] = []
        self._stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection
            timeout = 10  # bounds a read from a client that sends nothing

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._json(200, {"status": "ok"})
                elif self.path == "/props":
                    self._json(200, {"total_slots": fake.slots, "model_alias": "fake-model",
                                     "default_generation_settings": {"n_ctx": fake.n_ctx},
                                     "chat_template_caps": {}})
                else:
                    self._json(404, {"error": {"code": 404, "message": "not found",
                                               "type": "not_found_error"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/tokenize":
                    with fake._cond:
                        fake.tokenize_calls += 1
                    self._json(200, {"tokens": list(range(words(body.get("content", ""))))})
                elif self.path in ("/v1/chat/completions", "/v1/completions"):
                    fake._generate(self, self.path, body)
                else:
                    self._json(404, {"error": {"code": 404, "message": "not found",
                                               "type": "not_found_error"}})

            def _json(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = False  # server_close() joins the handler threads
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, name="fake-llama",
                                        daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeLlama:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            for gate in self._holds:
                gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    # ------------------------------------------------------------------ test controls

    def hold_next(self) -> threading.Event:
        """The next generation streams one piece, then waits until the returned Event is set."""
        gate = threading.Event()
        with self._cond:
            self._holds.append(gate)
        return gate

    def chat_bodies(self) -> list[dict[str, Any]]:
        with self._cond:
            return [b for p, b in self.bodies if p == "/v1/chat/completions"]

    def wait_bodies(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``n`` generation requests arrived; return all bodies so far."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.bodies) >= n, timeout), \
                f"only {len(self.bodies)} generation requests arrived, expected {n}"
            return [b for _, b in self.bodies]

    # ------------------------------------------------------------------ generation

    def _generate(self, handler: BaseHTTPRequestHandler, path: str,
                  body: dict[str, Any]) -> None:
        chat = path == "/v1/chat/completions"
        with self._cond:
            self.bodies.append((path, body))
            gate = self._holds.pop(0) if self._holds else None
            self._cond.notify_all()
        pieces = self.answer(body)
        if chat:
            prompt_tokens = sum(words(str(m.get("content") or "")) for m in body["messages"])
        else:
            prompt_tokens = words(body["prompt"])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                 "total_tokens": prompt_tokens + len(pieces)}
        if not body.get("stream"):
            text = "".join(pieces)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                calls = self.tool_calls(body) if self.tool_calls else None
                if calls:
                    choice["message"]["tool_calls"] = calls
                    choice["finish_reason"] = "tool_calls"
            else:
                choice["text"] = text
            data = json.dumps({"choices": [choice], "usage": usage}).encode()
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()

        def send(payload: Any) -> None:
            handler.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            handler.wfile.flush()

        def chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
            if chat:
                delta = {"content": text} if text is not None else {}
                return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return {"choices": [{"index": 0, "text": text or "", "finish_reason": finish}]}

        for i, piece in enumerate(pieces):
            send(chunk(piece))
            if i == 0 and gate is not None:
                gate.wait(HOLD_MAX_S)
        send(chunk(None, "stop"))
        send({"choices": [], "usage": usage})
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()
