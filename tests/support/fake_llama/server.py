"""The scripted HTTP server on 127.0.0.1: one request per connection, answered by a script.

:class:`ScriptedHttpServer` accepts connections, reads one HTTP request on each, asks
:meth:`~ScriptedHttpServer.script` what to do and plays it (:mod:`.script`). It
records what a test asserts on: every connection with its request, whether and when
the client closed its side (timeouts and cancellation must close the connection so
llama-server frees the slot), when a stall began, when the script ended.

:class:`ScriptedSSEServer` plays scripts given up front, by connection index -- one
client's calls and retries. :class:`~tests.support.fake_llama.llama.FakeLlama` answers
like a whole llama-server.

Everything is bounded: stalls and pauses wait with a maximum duration and
:meth:`~ScriptedHttpServer.stop` wakes them, so no server thread outlives the
``with`` block.
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
from typing import Any, Self

from tests.support.fake_llama.script import (
    Action,
    Close,
    CloseOnReuse,
    Hold,
    Pause,
    Reset,
    Respond,
    Script,
    Send,
    SSEHeaders,
    Stall,
)

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
DRAIN_S = 3.0  # after a script: how long to wait for the client to close
CLOSE_SEEN_S = DRAIN_S  # a test's bound on the server seeing the client close: its drain
_POLL_S = 0.02  # select() slice while waiting for the client, so stop() is seen at once


@dataclass
class Connection:
    """One accepted connection: its request and what became of it."""

    index: int
    request_line: str = ""
    method: str = ""
    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    received_at: float = field(default_factory=time.monotonic)  # accepted, then: request read
    request_read: threading.Event = field(default_factory=threading.Event)
    stall_started: threading.Event = field(default_factory=threading.Event)
    stall_started_at: float | None = None
    client_closed: threading.Event = field(default_factory=threading.Event)
    client_closed_at: float | None = None
    reused: threading.Event = field(default_factory=threading.Event)  # see CloseOnReuse
    finished: threading.Event = field(default_factory=threading.Event)

    def json(self) -> Any:
        """The request body decoded as JSON."""
        return json.loads(self.body)

    def prompt_text(self) -> str:
        """A generation's prompt, or the content of its last message ("" if neither)."""
        try:
            body = self.json()
        except ValueError:
            return ""
        if not isinstance(body, dict):
            return ""
        if isinstance(body.get("prompt"), str):
            return str(body["prompt"])
        messages = body.get("messages") or [{}]
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        return str(last.get("content") or "")

    def mark_client_closed(self) -> None:
        if not self.client_closed.is_set():
            self.client_closed_at = time.monotonic()
            self.client_closed.set()


class ScriptedHttpServer:
    """Serves scripts on a free port of 127.0.0.1; subclasses say which script a request gets.

    Args:
        max_connections: connections accepted before the server refuses more (None: any).
    """

    io_timeout_s = 5.0  # bound on reading a request and on each send

    def __init__(self, *, max_connections: int | None = None) -> None:
        self._max = max_connections
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._connections: list[Connection] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="fake-llama",
                                          daemon=True)

    def script(self, conn: Connection) -> Script:
        """What to play for the request just read on ``conn``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
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
            thread.join(timeout=DRAIN_S + self.io_timeout_s)

    # ------------------------------------------------------------------ inspection

    @property
    def connections(self) -> list[Connection]:
        """Snapshot of the connections accepted so far."""
        with self._cond:
            return list(self._connections)

    def connection(self, index: int, timeout: float = 5.0) -> Connection:
        """The ``index``-th connection, waiting up to ``timeout`` for it to arrive."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._connections) > index, timeout):
                raise AssertionError(f"connection #{index} never arrived "
                                     f"({len(self._connections)} so far)")
            return self._connections[index]

    def _requests(self, paths: Sequence[str]) -> list[Connection]:
        """The connections whose request (read) went to one of ``paths``; hold ``_cond``."""
        return [c for c in self._connections if c.request_read.is_set() and c.path in paths]

    # ------------------------------------------------------------------ serving

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.05)
                if not ready:
                    continue
                sock, _ = self._listener.accept()
            except OSError:
                return  # listener closed by stop()
            with self._cond:
                if self._max is not None and len(self._connections) >= self._max:
                    sock.close()
                    continue
                conn = Connection(index=len(self._connections))
                self._connections.append(conn)
                self._cond.notify_all()
            thread = threading.Thread(target=self._serve, args=(sock, conn),
                                      name=f"fake-llama-{conn.index}", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, conn: Connection) -> None:
        sock.settimeout(self.io_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        player = _Player(sock, conn, self._stop)
        try:
            if not _read_request(sock, conn):
                return
            with self._cond:
                self._cond.notify_all()
            player.play_all(self.script(conn))
        except OSError:
            conn.mark_client_closed()  # a write failed: the client went away
        finally:
            with suppress(OSError):
                sock.close()
            conn.finished.set()


class ScriptedSSEServer(ScriptedHttpServer):
    """Plays the scripts given up front: connection *i* gets ``scripts[min(i, len - 1)]``.

    For one client's calls (e.g. 503, 503, success for its retries). Example::

        with ScriptedSSEServer(chat_stream(["hi"])) as server:
            client = LlamaCppClient(server.url)
            ...
            assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)

    Args:
        scripts: one script used for every connection, or a list of scripts.
        max_connections: connections accepted before the server refuses more (bound).
    """

    def __init__(self, scripts: Sequence[Any], *, max_connections: int = 32) -> None:
        super().__init__(max_connections=max_connections)
        # Typed loosely: a list literal mixing action classes infers as list[object].
        if scripts and not isinstance(scripts[0], Action):  # a list of scripts
            self._scripts: list[Script] = [list(script) for script in scripts]
        else:
            self._scripts = [list(scripts)]
        for script in self._scripts:
            for action in script:
                if not isinstance(action, Action):
                    raise TypeError(f"not a script action: {action!r}")

    def script(self, conn: Connection) -> Script:
        return self._scripts[min(conn.index, len(self._scripts) - 1)]


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
    conn.method, conn.path = [*lines[0].split(" "), "", ""][:2]
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
    conn.received_at = time.monotonic()
    conn.request_read.set()
    return True


class _Player:
    def __init__(self, sock: socket.socket, conn: Connection, stop: threading.Event) -> None:
        self.sock = sock
        self.conn = conn
        self.stop = stop
        self.chunked = False

    def play_all(self, script: Script) -> None:
        """Play ``script``; if it runs to its end, end the body properly and wait (bounded)
        to see the client close."""
        for action in script:
            if not self.play(action):
                return
        if self.chunked:
            self.sock.sendall(b"0\r\n\r\n")
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self._wait_client_close(DRAIN_S)

    def play(self, action: Action) -> bool:
        """Run one action; False ends the script (connection closed either way)."""
        if isinstance(action, Respond):
            body = action.body
            if isinstance(body, dict | list):
                body = json.dumps(body).encode()
            elif isinstance(body, str):
                body = body.encode()
            connection = "keep-alive" if action.keep_alive else "close"
            head = (f"HTTP/1.1 {action.status} X\r\nContent-Type: {action.content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: {connection}\r\n\r\n")
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
        elif isinstance(action, Hold):
            deadline = time.monotonic() + action.max_seconds
            while not action.gate.is_set() and not self.stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                action.gate.wait(min(remaining, _POLL_S))
        elif isinstance(action, Stall):
            self.conn.stall_started_at = time.monotonic()
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
        elif isinstance(action, CloseOnReuse):
            if self._client_sends_again(action.max_seconds):
                self.conn.reused.set()
            return False
        return True

    def _frame(self, data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n" if self.chunked else data

    def _readable(self, deadline: float) -> bool:
        """Wait until the socket is readable (True), ``deadline`` passes or stop() (False)."""
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], min(remaining, _POLL_S))
            if ready:
                return True
        return False

    def _client_sends_again(self, max_seconds: float) -> bool:
        if not self._readable(time.monotonic() + max_seconds):
            return False
        try:
            return bool(self.sock.recv(65536, socket.MSG_PEEK))
        except OSError:
            return False

    def _wait_client_close(self, max_seconds: float) -> None:
        """Wait until the peer closes (EOF or reset), stop() or ``max_seconds``."""
        deadline = time.monotonic() + max_seconds
        while self._readable(deadline):
            try:
                if self.sock.recv(65536):
                    continue  # extra bytes from the client: ignore
            except OSError:
                pass  # reset by the client: closed as well
            self.conn.mark_client_closed()
            return
