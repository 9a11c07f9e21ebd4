"""A scripted llama-server for fault injection at scale: path-aware, one script per generation.

:class:`tests.support.scripted_sse.ScriptedSSEServer` plays scripts by connection
index, which is right for one client call but not for a whole bridge, whose
health probes (``/health``, ``/props``, ``/v1/models``) take connections too.
This server answers those probes itself and plays a script only for generation
requests (``POST /v1/chat/completions`` and ``/v1/completions``), chosen by a
callable from the request body -- e.g. "stall before the first byte when the
prompt says so". It records every generation (body, whether and when the client
closed the connection), so tests can count backend requests (nothing generated
twice) and check that timeouts close the connection.

It uses the action types of :mod:`tests.support.scripted_sse` (``SSEHeaders``,
``Send``, ``Pause``, ``Stall``, ``Close``, ``Reset``, ``Respond``). Every wait is
bounded and :meth:`FaultLlama.stop` wakes them all.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from tests.support.scripted_sse import (
    DONE,
    Action,
    Close,
    Pause,
    Reset,
    Respond,
    Send,
    SSEHeaders,
    Stall,
    chat_chunk,
    event,
    usage_chunk,
)

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
IO_TIMEOUT_S = 10.0
DEFAULT_TEXTS = ("Hello", " from", " the", " scripted", " server.")

ScriptFor = Callable[[str, dict[str, Any]], Sequence[Action]]


def completion_chunk(text: str | None = None, *, finish: str | None = None) -> dict[str, Any]:
    """A ``text_completion`` stream object as llama-server sends on ``/v1/completions``."""
    return {"choices": [{"text": text or "", "index": 0, "finish_reason": finish}],
            "object": "text_completion", "id": "cmpl-test", "model": "scripted"}


def stream_script(path: str, texts: Sequence[str] = DEFAULT_TEXTS, *, gap_s: float = 0.0,
                  finish: str = "stop") -> list[Action]:
    """A complete, well-formed stream for ``path`` (chat or completion format)."""
    chat = path.endswith("chat/completions")
    actions: list[Action] = [SSEHeaders()]
    for text in texts:
        if gap_s:
            actions.append(Pause(gap_s))
        actions.append(Send(event(chat_chunk(text) if chat else completion_chunk(text))))
    end = chat_chunk(finish=finish) if chat else completion_chunk(finish=finish)
    actions += [Send(event(end)), Send(event(usage_chunk(completion_tokens=len(texts)))),
                Send(DONE)]
    return actions


def default_script(path: str, body: dict[str, Any]) -> list[Action]:
    """The default: stream :data:`DEFAULT_TEXTS` (or one JSON answer when not streaming)."""
    if body.get("stream"):
        return stream_script(path)
    text = "".join(DEFAULT_TEXTS)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if path.endswith("chat/completions"):
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return [Respond(200, {"choices": [choice], "usage": {
        "prompt_tokens": 3, "completion_tokens": len(DEFAULT_TEXTS), "total_tokens": 8}})]


@dataclass
class Generation:
    """One generation request the server received."""

    index: int
    path: str
    body: dict[str, Any]
    received_at: float = field(default_factory=time.monotonic)
    client_closed: threading.Event = field(default_factory=threading.Event)
    client_closed_at: float | None = None
    stall_started: threading.Event = field(default_factory=threading.Event)
    stall_started_at: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def prompt_text(self) -> str:
        """The prompt, or the content of the last message."""
        if isinstance(self.body.get("prompt"), str):
            return str(self.body["prompt"])
        messages = self.body.get("messages") or [{}]
        return str(messages[-1].get("content") or "")

    def mark_closed(self) -> None:
        if not self.client_closed.is_set():
            self.client_closed_at = time.monotonic()
            self.client_closed.set()


class FaultLlama:
    """A fake llama-server on a free 127.0.0.1 port.

    Args:
        script_for: ``(path, body) -> actions`` for each generation request.
        slots: ``total_slots`` reported by ``/props``.
        model: the model name reported by ``/props`` and ``/v1/models``.
    """

    def __init__(self, script_for: ScriptFor = default_script, *, slots: int = 2,
                 model: str = "scripted-model", stale_keepalive: bool = False) -> None:
        self.script_for = script_for
        self.slots = slots
        self.model = model
        self.healthy = True
        # Keep GET connections open, and close one without an answer when the client
        # sends its next request on it: what a client sees when it reuses a keep-alive
        # connection at the moment the server's keep-alive timeout closes it.
        self.stale_keepalive = stale_keepalive
        self.stale_closes = 0
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._generations: list[Generation] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-llama",
                                          daemon=True)

    def __enter__(self) -> FaultLlama:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop accepting, wake every stall, join every thread."""
        self._stop.set()
        self._listener.close()
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(IO_TIMEOUT_S)

    # ------------------------------------------------------------------ inspection

    @property
    def generations(self) -> list[Generation]:
        """Snapshot of the generation requests received so far."""
        with self._cond:
            return list(self._generations)

    def wait_generations(self, count: int, timeout: float) -> list[Generation]:
        """Wait until ``count`` generation requests arrived; returns them all.

        Raises:
            AssertionError: fewer arrived within ``timeout``.
        """
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self._generations) >= count, timeout)
            assert ok, f"{len(self._generations)} generation requests arrived, not {count}"
            return list(self._generations)

    # ------------------------------------------------------------------ serving

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.05)
                if not ready:
                    continue
                sock, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True,
                                      name="fault-llama-conn")
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(IO_TIMEOUT_S)
        gen: Generation | None = None
        try:
            request = _read_request(sock)
            if request is None:
                return
            method, path, body = request
            if method == "GET":
                self._answer_get(sock, path, keep_alive=self.stale_keepalive)
                if self.stale_keepalive and self._next_request_arrives(sock):
                    with self._cond:
                        self.stale_closes += 1
                return
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                data = {}
            if path == "/tokenize":
                text = str(data.get("content", ""))
                _send_response(sock, Respond(200, {"tokens": list(range(len(text.split())))}))
                return
            with self._cond:
                gen = Generation(len(self._generations), path, data)
                self._generations.append(gen)
                self._cond.notify_all()
            _Player(sock, gen, self._stop).play_all(self.script_for(path, data))
        except OSError:
            if gen is not None:
                gen.mark_closed()
        finally:
            with suppress(OSError):
                sock.close()
            if gen is not None:
                gen.finished.set()

    def _next_request_arrives(self, sock: socket.socket) -> bool:
        """Wait (bounded) for the client to send on this connection again."""
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready:
                try:
                    return bool(sock.recv(65536, socket.MSG_PEEK))
                except OSError:
                    return False
        return False

    def _answer_get(self, sock: socket.socket, path: str, keep_alive: bool = False) -> None:
        if path == "/health":
            answer = Respond(200, {"status": "ok"}) if self.healthy else \
                Respond(503, {"error": {"code": 503, "message": "Loading model",
                                        "type": "unavailable_error"}})
        elif path == "/props":
            answer = Respond(200, {"total_slots": self.slots, "model_alias": self.model,
                                   "model_path": f"/models/{self.model}.gguf",
                                   "default_generation_settings": {"n_ctx": 4096},
                                   "chat_template_caps": {}})
        elif path == "/v1/models":
            answer = Respond(200, {"object": "list", "data": [{"id": self.model}]})
        elif path == "/slots":
            answer = Respond(200, [{"id": i, "is_processing": False} for i in range(self.slots)])
        else:
            answer = Respond(404, {"error": {"code": 404, "message": "not found",
                                             "type": "not_found_error"}})
        _send_response(sock, answer, keep_alive=keep_alive)


def _read_request(sock: socket.socket) -> tuple[str, str, bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return None
        data += piece
        if len(data) > MAX_HEADER_BYTES:
            return None
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path = [*lines[0].split(" "), "", ""][:2]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = min(int(value.strip() or 0), MAX_BODY_BYTES)
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    return method, path, rest[:length]


def _send_response(sock: socket.socket, answer: Respond, *, keep_alive: bool = False) -> None:
    body = answer.body
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    connection = "keep-alive" if keep_alive else "close"
    head = (f"HTTP/1.1 {answer.status} X\r\nContent-Type: {answer.content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {connection}\r\n\r\n")
    sock.sendall(head.encode() + body)


class _Player:
    def __init__(self, sock: socket.socket, gen: Generation, stop: threading.Event) -> None:
        self.sock = sock
        self.gen = gen
        self.stop = stop
        self.chunked = False

    def play_all(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if not self.play(action):
                return
        if self.chunked:
            self.sock.sendall(b"0\r\n\r\n")
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self._wait_client_close(3.0)

    def play(self, action: Action) -> bool:
        if isinstance(action, Respond):
            _send_response(self.sock, action)
        elif isinstance(action, SSEHeaders):
            self.chunked = action.chunked
            te = "Transfer-Encoding: chunked\r\n" if action.chunked else ""
            self.sock.sendall(f"HTTP/1.1 {action.status} OK\r\nContent-Type: text/event-stream"
                              f"\r\n{te}Connection: close\r\n\r\n".encode())
        elif isinstance(action, Send):
            data = action.data
            if self.chunked:
                data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
            self.sock.sendall(data)
        elif isinstance(action, Pause):
            return not self.stop.wait(action.seconds)
        elif isinstance(action, Stall):
            self.gen.stall_started_at = time.monotonic()
            self.gen.stall_started.set()
            self._wait_client_close(action.max_seconds)
            return False
        elif isinstance(action, Close):
            self.sock.shutdown(socket.SHUT_WR)
            self._wait_client_close(3.0)
            return False
        elif isinstance(action, Reset):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        return True

    def _wait_client_close(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], min(remaining, 0.02))
            if not ready:
                continue
            try:
                if self.sock.recv(65536):
                    continue
            except OSError:
                pass
            self.gen.mark_closed()
            return
