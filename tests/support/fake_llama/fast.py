"""The benchmarks' fake llama-server: SSE streams at any token rate, in its own process.

It speaks what the bridge reads from ``llama-server``, byte for byte in
the same shapes as xllamacpp 2026.10 writes them: HTTP/1.1 keep-alive, ``Transfer-
Encoding: chunked`` with one chunk per event, a ``role`` chunk, one
``data: {json}\\n\\n`` event per token with ``choices[0].delta.content``, a
``finish_reason`` chunk, a ``usage`` chunk with ``timings`` and ``data: [DONE]``.
``/health``, ``/props`` (``total_slots``), ``/slots`` and ``/v1/models`` answer too,
and a request that finds every slot busy waits without headers, as in llama-server.

It is one asyncio process writing raw bytes on transports (no HTTP framework), so
256 concurrent streams cost it little; it runs in its own process so that its CPU
time is never counted as the bridge's. (The threaded servers of this package, one
thread per connection, play faults exactly but would add their own scheduling noise
to every token's latency at these rates.)

Every token is five bytes, ``" "`` + four base-32 digits of the time it was written
(``time.monotonic_ns()`` in 0.1 ms units, modulo 2**20, i.e. 104.9 s): a subscriber
on the same machine counts tokens by counting spaces and measures each token's
latency from the server's write to its own receipt (:func:`token_latencies_ms`).

Per-request behaviour is set in the last message's text (the "prompt" of this
model), e.g. ``"fake: rate=50 tokens=200 prompt_ms=5"``: ``rate`` tokens/s per
stream (0 = as fast as the reader takes them), ``tokens`` per answer (also capped by
the request's ``max_tokens``; finish_reason ``length`` then), ``prompt_ms`` before
the first token. Defaults come from the command line.

Run it (``bench/fake_llama.py`` is this module's command)::

    python -m bench.fake_llama --slots 256 --rate 50 --tokens 200

It prints its URL on stdout and serves until stdin closes, SIGTERM, or ``--max-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

from tests.support.fake_llama.api import (
    CHAT_PATH,
    GENERATION_PATHS,
    HEALTH_OK,
    NOT_FOUND,
    error_body,
    models_body,
    props_body,
    slots_body,
)

_ALPHABET = b"0123456789abcdefghijklmnopqrstuv"
STAMP_MASK = 0xFFFFF  # 20 bits of 0.1 ms units
TOKEN_BYTES = 5
MODEL = "/root/.cache/fake_llama/fake-270m-q4_k_m.gguf"  # as long as the real model path
_TICK_S = 0.002  # paced streams are served on this tick
_FILL_EVENTS = 512  # unpaced: most events written for one stream before yielding
_OPTS = re.compile(r"\b(rate|tokens|prompt_ms)=([0-9.]+)")


def stamp_now() -> int:
    """The current time in the stamps' unit (0.1 ms, modulo 2**20)."""
    return (time.monotonic_ns() // 100_000) & STAMP_MASK


def _token(units: int) -> bytes:
    a = _ALPHABET
    return bytes((32, a[(units >> 15) & 31], a[(units >> 10) & 31], a[(units >> 5) & 31],
                  a[units & 31]))


def token_latencies_ms(text: str, now_units: int) -> list[float]:
    """Latency of every stamped token in ``text``, given the receive time in stamp units.

    Args:
        text: chunk text made of fake tokens (``" xxxx"`` each).
        now_units: :func:`stamp_now` at receipt.
    Returns:
        one latency in milliseconds per token found.
    """
    out = []
    for word in text.split(" "):
        if len(word) == 4:
            try:
                units = int(word, 32)
            except ValueError:
                continue
            out.append(((now_units - units) & STAMP_MASK) / 10.0)
    return out


@dataclass
class Defaults:
    slots: int
    rate: float
    tokens: int
    prompt_ms: float


class _Stream:
    """One streamed answer on one connection."""

    __slots__ = ("closed", "conn", "frame_a", "frame_b", "head", "kind", "paused", "prompt_ms",
                 "rate", "sent", "t0", "total", "wanted")

    def __init__(self, conn: _Conn, kind: str, total: int, wanted: int, rate: float,
                 prompt_ms: float) -> None:
        self.conn = conn
        self.kind = kind
        self.total = total  # tokens to send
        self.wanted = wanted  # tokens the script has (total < wanted: finish "length")
        self.rate = rate
        self.prompt_ms = prompt_ms
        self.sent = 0
        self.t0 = 0.0
        self.paused = False
        self.closed = False
        ident = f"chatcmpl-{os.urandom(16).hex()[:32]}"
        created = int(time.time())
        tail = (f',"created":{created},"id":"{ident}","model":"{MODEL}",'
                '"system_fingerprint":"b0-unknown","object":').encode()
        if kind == "chat":
            pre = b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"'
            post = b'"}}]' + tail + b'"chat.completion.chunk"}\n\n'
        else:
            pre = b'data: {"choices":[{"text":"'
            post = b'","index":0,"logprobs":null,"finish_reason":null}]' + tail + \
                b'"text_completion"}\n\n'
        size = len(pre) + TOKEN_BYTES + len(post)
        self.frame_a = b"%x\r\n" % size + pre
        self.frame_b = post + b"\r\n"
        self.head = tail  # reused by the closing events

    def events(self, n: int, units: int) -> bytes:
        tok = _token(units)
        frame = self.frame_a + tok + self.frame_b
        return frame * n

    def closing(self) -> bytes:
        finish = "length" if self.total < self.wanted else "stop"
        obj = b'"chat.completion.chunk"' if self.kind == "chat" else b'"text_completion"'
        if self.kind == "chat":
            fin = (b'data: {"choices":[{"finish_reason":"' + finish.encode() +
                   b'","index":0,"delta":{}}]' + self.head + obj + b"}\n\n")
        else:
            fin = (b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"' +
                   finish.encode() + b'"}]' + self.head + obj + b"}\n\n")
        elapsed_ms = (time.monotonic() - self.t0) * 1000
        usage = json.dumps({
            "usage": {"completion_tokens": self.total, "prompt_tokens": 8,
                      "total_tokens": self.total + 8},
            "timings": {"prompt_n": 8, "prompt_ms": self.prompt_ms, "predicted_n": self.total,
                        "predicted_ms": round(elapsed_ms, 3)}}, separators=(",", ":"))
        use = b'data: {"choices":[]' + self.head + obj + b"," + usage[1:].encode() + b"\n\n"
        done = b"data: [DONE]\n\n"
        return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (fin, use, done)) + b"0\r\n\r\n"


class Server:
    """The fake llama-server's state: slots, waiting requests, streams."""

    def __init__(self, defaults: Defaults) -> None:
        self.d = defaults
        self.active: set[_Stream] = set()
        self.paced: set[_Stream] = set()
        self.waiting: deque[_Stream] = deque()
        self.loop = asyncio.get_running_loop()
        self.streams_done = 0

    # ------------------------------------------------------------------ slots

    def submit(self, s: _Stream) -> None:
        if len(self.active) < self.d.slots:
            self._start(s)
        else:
            self.waiting.append(s)

    def _start(self, s: _Stream) -> None:
        self.active.add(s)
        s.conn.transport.write(b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\n"
                               b"Content-Type: text/event-stream\r\nX-Accel-Buffering: no\r\n"
                               b"Transfer-Encoding: chunked\r\n"
                               b"Keep-Alive: timeout=5, max=100\r\n\r\n")
        role = (b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":'
                b'"assistant","content":null}}]' + s.head + b'"chat.completion.chunk"}\n\n')
        if s.kind == "chat":
            s.conn.transport.write(b"%x\r\n%s\r\n" % (len(role), role))
        if s.prompt_ms > 0:
            self.loop.call_later(s.prompt_ms / 1000, self._begin, s)
        else:
            self._begin(s)

    def _begin(self, s: _Stream) -> None:
        if s.closed:
            return
        s.t0 = time.monotonic()
        if s.total == 0:
            self.finish(s)
        elif s.rate > 0:
            self._paced_step(s, s.t0, stamp_now())
            if not s.closed:
                self.paced.add(s)
        else:
            self.fill(s)

    def finish(self, s: _Stream) -> None:
        if not s.closed:
            s.conn.transport.write(s.closing())
            self.streams_done += 1
        self.release(s)

    def release(self, s: _Stream) -> None:
        s.closed = True
        s.conn.stream = None
        self.paced.discard(s)
        if s in self.active:
            self.active.discard(s)
            while self.waiting and len(self.active) < self.d.slots:
                nxt = self.waiting.popleft()
                if not nxt.closed:
                    self._start(nxt)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(s)

    # ------------------------------------------------------------------ writing

    def fill(self, s: _Stream) -> None:
        """Unpaced: write until the transport pushes back (or a fair share is written)."""
        if s.closed or s.paused:
            return
        units = stamp_now()
        budget = _FILL_EVENTS
        write = s.conn.transport.write
        while budget > 0 and not s.paused and s.sent < s.total:
            n = min(32, s.total - s.sent, budget)
            write(s.events(n, units))
            s.sent += n
            budget -= n
        if s.sent >= s.total:
            self.finish(s)
        elif not s.paused:
            self.loop.call_soon(self.fill, s)

    def _paced_step(self, s: _Stream, now: float, units: int) -> None:
        due = min(s.total, 1 + int((now - s.t0) * s.rate))
        n = due - s.sent
        if n > 0 and not s.paused:
            s.conn.transport.write(s.events(n, units))
            s.sent = due
        if s.sent >= s.total:
            self.finish(s)

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            if self.paced:
                now = time.monotonic()
                units = stamp_now()
                for s in list(self.paced):
                    self._paced_step(s, now, units)

    def resumed(self, s: _Stream) -> None:
        if s.rate <= 0:
            self.loop.call_soon(self.fill, s)


class _Conn(asyncio.Protocol):
    """One HTTP/1.1 connection (keep-alive, one request at a time)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buf = bytearray()
        self.stream: _Stream | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:  # the client closed: cancel, free the slot
            self.server.release(self.stream)

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.paused = True

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.paused = False
            self.server.resumed(self.stream)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.stream is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            parts = head[0].split(" ")
            self.handle(parts[0], parts[1] if len(parts) > 1 else "/", body)

    def reply(self, status: int, obj: object) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        self.transport.write(b"HTTP/1.1 %d %s\r\nServer: llama.cpp\r\n"
                             b"Content-Type: application/json; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nKeep-Alive: timeout=5, max=100\r\n\r\n%s"
                             % (status, reason.encode(), len(body), body))

    def handle(self, method: str, path: str, body: bytes) -> None:
        d = self.server.d
        path = path.split("?")[0]
        if method == "GET" and path == "/health":
            self.reply(200, HEALTH_OK)
        elif method == "GET" and path == "/props":
            self.reply(200, props_body(slots=d.slots, n_ctx=4096, model_path=MODEL))
        elif method == "GET" and path == "/slots":
            self.reply(200, slots_body(d.slots, busy=len(self.server.active)))
        elif method == "GET" and path == "/v1/models":
            self.reply(200, models_body(MODEL))
        elif method == "POST" and path in GENERATION_PATHS:
            self.generate("chat" if path == CHAT_PATH else "completion", body)
        else:
            self.reply(404, NOT_FOUND)

    def generate(self, kind: str, body: bytes) -> None:
        d = self.server.d
        try:
            req = json.loads(body)
            if kind == "chat":
                content = str(req["messages"][-1].get("content") or "")
            else:
                content = str(req["prompt"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            self.reply(400, error_body(400, "bad request body", "invalid_request_error"))
            return
        opts = {k: float(v) for k, v in _OPTS.findall(content)}
        wanted = int(opts.get("tokens", d.tokens))
        cap = req.get("max_tokens")
        total = min(wanted, int(cap)) if isinstance(cap, int) and cap > 0 else wanted
        rate = opts.get("rate", d.rate)
        prompt_ms = opts.get("prompt_ms", d.prompt_ms)
        if not req.get("stream"):
            text = "".join(_token(stamp_now()).decode() for _ in range(total))
            finish = "length" if total < wanted else "stop"
            usage = {"completion_tokens": total, "prompt_tokens": 8, "total_tokens": total + 8}
            if kind == "chat":
                choice: dict[str, object] = {"finish_reason": finish, "index": 0,
                                             "message": {"role": "assistant", "content": text}}
            else:
                choice = {"text": text, "index": 0, "finish_reason": finish}
            self.reply(200, {"choices": [choice], "model": MODEL, "usage": usage})
            return
        self.stream = _Stream(self, kind, total, wanted, rate, prompt_ms)
        self.server.submit(self.stream)


async def _serve(args: argparse.Namespace) -> None:
    server = Server(Defaults(args.slots, args.rate, args.tokens, args.prompt_ms))
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: _Conn(server), "127.0.0.1", args.port, backlog=1024)
    port = srv.sockets[0].getsockname()[1]
    sys.stdout.write(f"http://127.0.0.1:{port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def stdin_closed() -> None:
        if not os.read(0, 4096):
            stop.set()

    with contextlib.suppress(OSError, ValueError, NotImplementedError):
        loop.add_reader(0, stdin_closed)
    tick = asyncio.create_task(server.ticker())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.max_s)
    tick.cancel()
    srv.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fake_llama", description=__doc__.split(
        "\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--slots", type=int, default=256, help="total_slots in /props")
    p.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream; 0 = unpaced")
    p.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    p.add_argument("--prompt-ms", type=float, default=0.0, help="delay before the first token")
    p.add_argument("--max-s", type=float, default=3600.0, help="exit after this long anyway")
    args = p.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
