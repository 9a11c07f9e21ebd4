"""A transparent TCP tap in front of a real llama-server: relays bytes, records both directions.

Why: llama.cpp's output at temperature 0 is not reproducible from one run to the
next once several requests share its KV cache (measured on this machine: 3 of 6
prompts gave different text when merely run in a different order), so a fault
test cannot compare a stream with a separate "fault-free" run. It compares the
text a device received with the text llama-server sent *for that very request*,
which the tap records on the wire between the bridge and the server.

The tap forwards bytes unchanged in both directions and closes both sides as soon
as either side closes (so a cancelled stream still frees the llama-server slot at
once). Afterwards :meth:`HttpTap.exchanges` parses what it saw as HTTP/1.1
request/response pairs (Content-Length or chunked bodies).

Example::

    with HttpTap(llama.url) as tap:
        ...  # point the bridge at tap.url
        gens = [x for x in tap.exchanges() if x.path.endswith("/completions")]
        assert gens[0].sse_text() == text_the_device_received
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_IO_S = 0.05  # select granularity; stop() is noticed within this


@dataclass
class _Conn:
    index: int
    c2s: bytearray = field(default_factory=bytearray)
    s2c: bytearray = field(default_factory=bytearray)
    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float | None = None
    closed_by: str | None = None  # "client", "server" or "tap"


@dataclass(frozen=True)
class Exchange:
    """One HTTP request and its response (possibly cut short) on a tapped connection.

    Attributes:
        connection: index of the TCP connection (in accept order).
        method: e.g. ``POST``.
        path: e.g. ``/v1/chat/completions``.
        body: the request body.
        status: the response status, or None if no response started.
        response: the response body (de-chunked), as far as it arrived.
        complete: the response body arrived to its end.
        closed_by: who closed the connection (if it is closed).
    """

    connection: int
    method: str
    path: str
    body: bytes
    status: int | None
    response: bytes
    complete: bool
    closed_by: str | None

    def json(self) -> Any:
        """The request body as JSON."""
        return json.loads(self.body)

    @property
    def finished(self) -> bool:
        """The stream reached its end (``[DONE]`` or a ``finish_reason``); the client may
        have closed the connection before the final empty chunk, which is fine."""
        return self.complete or b"data: [DONE]" in self.response or \
            b'"finish_reason":"' in self.response.replace(b'": "', b'":"')

    def sse_text(self) -> str:
        """The generated text: ``delta.content`` (chat) or ``text`` (completion) of every event."""
        out: list[str] = []
        for block in self.response.decode("utf-8", "replace").split("\n\n"):
            for line in block.split("\n"):
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if not data or data == "[DONE]":
                    continue
                try:
                    event = json.loads(data)
                except ValueError:
                    continue  # an event cut by the end of the recording
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if "delta" in choice else choice.get("text")
                    if isinstance(text, str):
                        out.append(text)
        return "".join(out)


class HttpTap:
    """Listens on a free 127.0.0.1 port and relays every connection to ``upstream``.

    Args:
        upstream: base URL of the real server, e.g. ``http://127.0.0.1:8080``.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="http-tap", daemon=True)

    def __enter__(self) -> HttpTap:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop accepting, close every relayed connection, join the threads."""
        self._stop.set()
        self._listener.close()
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)

    # ------------------------------------------------------------------ inspection

    def exchanges(self) -> list[Exchange]:
        """Every request/response pair seen so far, in connection order."""
        with self._lock:
            snapshot = [(c.index, bytes(c.c2s), bytes(c.s2c), c.closed_by) for c in self._conns]
        out: list[Exchange] = []
        for index, c2s, s2c, closed_by in snapshot:
            requests = _parse_requests(c2s)
            responses = _parse_responses(s2c)
            for i, (method, path, body) in enumerate(requests):
                status, response, complete = responses[i] if i < len(responses) else \
                    (None, b"", False)
                out.append(Exchange(index, method, path, body, status, response, complete,
                                    closed_by))
        return out

    def generations(self) -> list[Exchange]:
        """The exchanges that asked for a generation (chat or plain completion)."""
        return [x for x in self.exchanges()
                if x.method == "POST" and x.path.endswith("completions")]

    # ------------------------------------------------------------------ relay

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], _IO_S)
                if not ready:
                    continue
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed by stop()
            with self._lock:
                conn = _Conn(len(self._conns))
                self._conns.append(conn)
            thread = threading.Thread(target=self._relay, args=(client, conn),
                                      name=f"http-tap-{conn.index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket, conn: _Conn) -> None:
        try:
            server = socket.create_connection(self._upstream, timeout=5)
        except OSError:
            client.close()  # upstream down: the client sees a closed connection
            conn.closed_by, conn.closed_at = "server", time.monotonic()
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peers = {client: (server, conn.c2s, "client"), server: (client, conn.s2c, "server")}
        closed_by = "tap"
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, server], [], [], _IO_S)
                for sock in ready:
                    other, record, side = peers[sock]
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        closed_by = side
                        return
                    with self._lock:
                        record += data
                    other.sendall(data)
        except OSError:
            closed_by = "tap"
        finally:
            conn.closed_by, conn.closed_at = closed_by, time.monotonic()
            for sock in (client, server):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


# --------------------------------------------------------------------------- parsing


def _headers(block: bytes) -> tuple[str, dict[str, str]]:
    lines = block.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return lines[0], fields


def _parse_requests(data: bytes) -> list[tuple[str, str, bytes]]:
    out: list[tuple[str, str, bytes]] = []
    pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return out
        first, fields = _headers(data[pos:end])
        parts = first.split(" ")
        length = int(fields.get("content-length", "0") or 0)
        body = data[end + 4:end + 4 + length]
        out.append((parts[0], parts[1] if len(parts) > 1 else "", body))
        pos = end + 4 + length


def _parse_responses(data: bytes) -> list[tuple[int, bytes, bool]]:
    out: list[tuple[int, bytes, bool]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return out
        first, fields = _headers(data[pos:end])
        status = int(first.split(" ")[1])
        pos = end + 4
        if "chunked" in fields.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    out.append((status, bytes(body), False))
                    return out
                size = int(data[pos:eol].split(b";")[0] or b"0", 16)
                if size == 0:
                    out.append((status, bytes(body), True))
                    pos = eol + 2
                    trailer_end = data.find(b"\r\n", pos)
                    pos = len(data) if trailer_end < 0 else trailer_end + 2
                    break
                chunk = data[eol + 2:eol + 2 + size]
                body += chunk
                if len(chunk) < size:
                    out.append((status, bytes(body), False))
                    return out
                pos = eol + 2 + size + 2
        elif "content-length" in fields:
            length = int(fields["content-length"])
            body_bytes = data[pos:pos + length]
            out.append((status, body_bytes, len(body_bytes) == length))
            pos += length
        else:  # delimited by the connection closing
            out.append((status, data[pos:], True))
            return out
    return out
