"""Reading N token streams: one thread per stream (the bridge today) vs one asyncio loop.

    .venv/bin/python -m bench.ingest_compare [--streams 8,64,256] [--rate 50]

Evidence for the design change proposed in docs/performance.md: both sides read
paced SSE streams from :mod:`bench.fake_llama` (each token in its own TCP segment,
as from a real model) with the bridge's own parsing code (the chunked decoder,
:class:`bridge.llama.sse.SSEParser`, the OpenAI chunk accumulator) and only count the
text deltas -- no MQTT. The thread side is ``LlamaCppClient.stream_chat`` in
one thread per stream, exactly as the bridge's workers use it; the asyncio side
is a sketch (a protocol per connection, no timeouts, no retries), so it shows what
the event loop saves, not a finished design. Each side runs ``--seconds`` with
closed-loop streams; CPU per token is this process's CPU time over the tokens read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import threading
import time

from bench.procs import REPO
from bridge.llama.dechunk import Dechunker
from bridge.llama.events import EventAccumulator
from bridge.llama.sse import SSEParser
from bridge.llama.types import TextDelta


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _body(rate: float, tokens: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": f"fake: rate={rate:g} tokens={tokens}"}],
            "max_tokens": tokens}


class _StreamProtocol(asyncio.Protocol):
    """One streamed chat request on its own connection, parsed as the bridge parses it."""

    def __init__(self, body: bytes, done: asyncio.Future[None], counter: list[int]) -> None:
        self.body, self.done, self.counter = body, done, counter
        self.head: bytes | None = b""
        self.dechunk = Dechunker(None)
        self.parser = SSEParser()
        self.acc = EventAccumulator("chat", "fake")
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: fake\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(self.body), self.body))

    def data_received(self, data: bytes) -> None:
        if self.head is not None:  # response headers first
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            data, self.head = self.head[end + 4:], None
        for item in self.parser.feed(self.dechunk.decode(data)):
            for delta in self.acc.event(item.data, item.event):  # type: ignore[union-attr]
                if isinstance(delta, TextDelta):
                    self.counter[0] += 1
            if self.acc.done:
                assert self.transport is not None
                self.transport.close()
                if not self.done.done():
                    self.done.set_result(None)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _asyncio_side(port: int, n: int, rate: float, tokens: int,
                        seconds: float) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    counter = [0]
    body = json.dumps({**_body(rate, tokens), "stream": True}).encode()
    end = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < end:
            done: asyncio.Future[None] = loop.create_future()
            await loop.create_connection(
                lambda done=done: _StreamProtocol(body, done, counter),  # type: ignore[misc]
                "127.0.0.1", port)
            await done

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.sleep(1.0)
    c0, k0, t0 = _cpu(), counter[0], time.monotonic()
    await asyncio.sleep(seconds - 1.5)
    c1, k1, t1 = _cpu(), counter[0], time.monotonic()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return 1e6 * (c1 - c0) / max(k1 - k0, 1), (k1 - k0) / (t1 - t0)


def _thread_side(url: str, n: int, rate: float, tokens: int,
                 seconds: float) -> tuple[float, float]:
    from bridge.llama.client import LlamaCppClient

    client = LlamaCppClient(url, pool_size=n + 8)
    counter = [0]
    end = time.monotonic() + seconds
    lock = threading.Lock()

    def one() -> None:
        while time.monotonic() < end:
            with client.stream_chat(**_body(rate, tokens)) as stream:  # type: ignore[arg-type]
                for delta in stream:
                    if isinstance(delta, TextDelta):
                        with lock:
                            counter[0] += 1

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for th in threads:
        th.start()
    time.sleep(1.0)
    c0, k0, t0 = _cpu(), counter[0], time.monotonic()
    time.sleep(seconds - 1.5)
    c1, k1, t1 = _cpu(), counter[0], time.monotonic()
    for th in threads:
        th.join(seconds + 30)
    client.close()
    return 1e6 * (c1 - c0) / max(k1 - k0, 1), (k1 - k0) / (t1 - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest_compare")
    p.add_argument("--streams", default="8,64,256")
    p.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream")
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args(argv)
    fake = subprocess.Popen([sys.executable, "-m", "bench.fake_llama", "--slots", "1024"],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert fake.stdout is not None
        url = fake.stdout.readline().decode().strip()
        port = int(url.rsplit(":", 1)[1])
        tokens = int(a.rate * 3)  # 3-second answers, closed loop
        print("| streams | offered tok/s | asyncio µs/token | threads µs/token |")
        print("|---|---|---|---|")
        for n in (int(x) for x in a.streams.split(",")):
            us_a, _ = asyncio.run(_asyncio_side(port, n, a.rate, tokens, a.seconds))
            us_t, _ = _thread_side(url, n, a.rate, tokens, a.seconds)
            print(f"| {n} | {n * a.rate:.0f} | {us_a:.1f} | {us_t:.1f} |", flush=True)
    finally:
        if fake.stdin is not None:
            fake.stdin.close()
        fake.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
