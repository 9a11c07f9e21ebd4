"""A scripted HTTP/SSE server on 127.0.0.1 for fault injection against the llama client.

Each accepted connection reads one HTTP request, then plays a *script*: a list of
actions such as "send SSE headers", "send these bytes", "stall", "reset". It
records what a test needs to assert on: the request bodies, how many connections
were made (retries) and whether/when the client closed its side (timeouts and
cancellation must close the connection so llama-server frees the slot).

Everything is bounded: stalls wait on events with a maximum duration and stop()
wakes them, so no server thread outlives the ``with`` block.

Example::

    script = [SSEHeaders(), Send(chat_chunk("hi")), Send(chat_chunk(finish="stop")),
              Send(DONE)]
    with ScriptedSSEServer(script) as server:
        client = LlamaCppClient(server.url)
        ...
        assert server.connection(0).client_closed.wait(2)
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
IO_TIMEOUT_S = 5.0  # bound on reading a request and on each send
DRAIN_S = 3.0  # after a script: how long to wait for the client to close


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Respond:
    """A complete, non-streamed HTTP response (then the connection closes)."""

    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    content_type: str = "application/json"


@dataclass(frozen=True)
class SSEHeaders:
    """Start a streamed response: status line and SSE headers.

    ``chunked`` (as llama-server does) wraps each following :class:`Send` in one HTTP
    chunk; otherwise the body is delimited by closing the connection.
    """

    status: int = 200
    chunked: bool = True
    with_body: tuple[bytes, ...] = ()
    """Body pieces written in the same network write as the headers (each its own
    HTTP chunk when chunked): the client then reads them together with the headers."""


@dataclass(frozen=True)
class Send:
    """Write bytes (one HTTP chunk when chunked) as one network write."""

    data: bytes


@dataclass(frozen=True)
class Pause:
    """Wait ``seconds`` (bounded; stop() interrupts) — the server being slow."""

    seconds: float


@dataclass(frozen=True)
class Stall:
    """Send nothing until the client closes, the server stops or ``max_seconds`` pass."""

    max_seconds: float = 10.0


@dataclass(frozen=True)
class Close:
    """Close gracefully (FIN) without finishing the body (no final chunk)."""


@dataclass(frozen=True)
class Reset:
    """Abort the connection with a TCP RST (SO_LINGER 0)."""


Action = Respond | SSEHeaders | Send | Pause | Stall | Close | Reset
Script = Sequence[Action]


# --------------------------------------------------------------------------- SSE helpers


DONE = b"data: [DONE]\n\n"
PING = b":\n\n"


def event(payload: Any, *, eol: bytes = b"\n") -> bytes:
    """One ``data:`` event carrying ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + eol + eol


def chat_chunk(content: str | None = None, *, finish: str | None = None,
               reasoning: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
               timings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object as llama-server streams it."""
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    chunk: dict[str, Any] = {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "object": "chat.completion.chunk", "id": "chatcmpl-test", "model": "test",
    }
    if timings is not None:
        chunk["timings"] = timings
    return chunk


def usage_chunk(prompt_tokens: int = 3, completion_tokens: int = 2) -> dict[str, Any]:
    """The trailing chunk with empty ``choices`` that ``include_usage`` adds."""
    return {"choices": [], "object": "chat.completion.chunk", "id": "chatcmpl-test",
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "timings": {"predicted_n": completion_tokens}}


def chat_stream(texts: Sequence[str], finish: str = "stop") -> list[Action]:
    """A complete, well-formed chat stream: headers, one event per text, end, usage, DONE."""
    actions: list[Action] = [SSEHeaders()]
    actions += [Send(event(chat_chunk(t))) for t in texts]
    actions += [Send(event(chat_chunk(finish=finish, timings={"predicted_n": len(texts)}))),
                Send(event(usage_chunk(completion_tokens=len(texts)))), Send(DONE)]
    return actions


def llama_error(status: int, message: str, error_type: str) -> Respond:
    """An error answer in llama-server's format."""
    return Respond(status, {"error": {"code": status, "message": message, "type": error_type}})


# --------------------------------------------------------------------------- server


@dataclass
class Connection:
    """What the server saw on one accepted connection."""

    index: int
    opened_at: float = field(default_factory=time.monotonic)
    request_line: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    request_read: threading.Event = field(default_factory=threading.Event)
    stall_started: threading.Event = field(default_factory=threading.Event)
    client_closed: threading.Event = field(default_factory=threading.Event)
    client_closed_at: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def json(self) -> Any:
        """The request body decoded as JSON."""
        return json.loads(self.body)

    def mark_client_closed(self) -> None:
        if not self.client_closed.is_set():
            self.client_closed_at = time.monotonic()
            self.client_closed.set()


class ScriptedSSEServer:
    """Serves scripted responses on a free port of 127.0.0.1.

    Args:
        scripts: one script used for every connection, or a list of scripts where
            connection *i* plays ``scripts[min(i, len - 1)]`` (e.g. 503, 503, success).
        max_connections: connections accepted before the server refuses more (bound).
    """

    def __init__(self, scripts: Sequence[Any], *, max_connections: int = 32) -> None:
        # Typed loosely: a list literal mixing action classes infers as list[object].
        if scripts and not isinstance(scripts[0], Action):  # a list of scripts
            self._scripts: list[Script] = [list(script) for script in scripts]
        else:
            self._scripts = [list(scripts)]
        for script in self._scripts:
            for action in script:
                if not isinstance(action, Action):
                    raise TypeError(f"not a script action: {action!r}")
        self._max = max_connections
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._connections: list[Connection] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="scripted-sse",
                                          daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ScriptedSSEServer:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop accepting, wake every stall and pause, and join all threads."""
        self._stop.set()
        self._listener.close()
        self._acceptor.join(timeout=5)
        for thread in list(self._threads):
            thread.join(timeout=DRAIN_S + IO_TIMEOUT_S)

    # ------------------------------------------------------------------ inspection

    @property
    def connections(self) -> list[Connection]:
        """Snapshot of the connections accepted so far."""
        with self._lock:
            return list(self._connections)

    def connection(self, index: int, timeout: float = 5.0) -> Connection:
        """The ``index``-th connection, waiting up to ``timeout`` for it to arrive."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._connections) > index, timeout):
                raise AssertionError(f"connection #{index} never arrived "
                                     f"({len(self._connections)} so far)")
            return self._connections[index]

    # ------------------------------------------------------------------ internals

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.05)
                if not ready:
                    continue
                sock, _ = self._listener.accept()
            except OSError:
                return  # listener closed by stop()
            with self._lock:
                if len(self._connections) >= self._max:
                    sock.close()
                    continue
                conn = Connection(index=len(self._connections))
                self._connections.append(conn)
                self._lock.notify_all()
                script = self._scripts[min(conn.index, len(self._scripts) - 1)]
            thread = threading.Thread(target=self._serve, args=(sock, conn, script),
                                      name=f"scripted-sse-{conn.index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, conn: Connection, script: Script) -> None:
        sock.settimeout(IO_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        player = _Player(sock, conn, self._stop)
        try:
            if not _read_request(sock, conn):
                return
            for action in script:
                if not player.play(action):
                    return
            player.finish()
        except OSError:
            conn.mark_client_closed()  # a write failed: the client went away
        finally:
            with suppress(OSError):
                sock.close()
            conn.finished.set()


def _read_request(sock: socket.socket, conn: Connection) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            conn.mark_client_closed()
            return False
        data += piece
        if len(data) > MAX_HEADER_BYTES:
            raise OSError("request headers too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    conn.request_line = lines[0]
    for line in lines[1:]:
        name, _, value = line.partition(":")
        conn.headers[name.strip().lower()] = value.strip()
    length = min(int(conn.headers.get("content-length", "0") or 0), MAX_BODY_BYTES)
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    conn.body = rest[:length]
    conn.request_read.set()
    return True


class _Player:
    def __init__(self, sock: socket.socket, conn: Connection, stop: threading.Event) -> None:
        self.sock = sock
        self.conn = conn
        self.stop = stop
        self.chunked = False
        self.open = True

    def play(self, action: Action) -> bool:
        """Run one action; False ends the script (connection closed either way)."""
        if isinstance(action, Respond):
            body = action.body
            if isinstance(body, dict | list):
                body = json.dumps(body).encode()
            elif isinstance(body, str):
                body = body.encode()
            head = (f"HTTP/1.1 {action.status} X\r\nContent-Type: {action.content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            self.sock.sendall(head.encode() + body)
        elif isinstance(action, SSEHeaders):
            self.chunked = action.chunked
            te = "Transfer-Encoding: chunked\r\n" if action.chunked else ""
            head = (f"HTTP/1.1 {action.status} OK\r\nContent-Type: text/event-stream\r\n"
                    f"{te}Connection: close\r\n\r\n")
            self.sock.sendall(head.encode() + b"".join(map(self._frame, action.with_body)))
        elif isinstance(action, Send):
            self.sock.sendall(self._frame(action.data))
        elif isinstance(action, Pause):
            return not self.stop.wait(action.seconds)
        elif isinstance(action, Stall):
            self.conn.stall_started.set()
            self._wait_client_close(action.max_seconds)
            return False
        elif isinstance(action, Close):
            self.sock.shutdown(socket.SHUT_WR)
            self._wait_client_close(DRAIN_S)
            return False
        elif isinstance(action, Reset):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        return True

    def _frame(self, data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n" if self.chunked else data

    def finish(self) -> None:
        """End the body properly, then wait (bounded) to see the client close."""
        if self.chunked:
            self.sock.sendall(b"0\r\n\r\n")
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self._wait_client_close(DRAIN_S)

    def _wait_client_close(self, max_seconds: float) -> None:
        """Wait until the peer closes (EOF or reset), stop() or ``max_seconds``."""
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
                    continue  # extra bytes from the client: ignore
            except OSError:
                pass  # reset by the client: closed as well
            self.conn.mark_client_closed()
            return
