"""The llama client as the tests drive it: short timeouts and retries, a stream read to its end.

Clients a test makes are closed after it: pass them to conftest's ``clients`` list
(:func:`serve` does).
"""

from __future__ import annotations

from typing import Any

from bridge.llama.client import LlamaCppClient, RetryPolicy, Stream, StreamEnd, TextDelta, Timeouts
from tests.support.fake_llama import ScriptedHttpServer


def make_client(url: str, *, connect: float = 1.0, first_byte: float = 2.0, idle: float = 1.0,
                request: float = 1.0, non_streamed: float = 2.0, attempts: int = 1,
                backoff: float = 0.01) -> LlamaCppClient:
    """A client with timeouts short enough for a scripted server (seconds) and no jitter."""
    return LlamaCppClient(
        url,
        timeouts=Timeouts(connect=connect, first_byte=first_byte, idle=idle, request=request,
                          non_streamed=non_streamed),
        retry=RetryPolicy(attempts=attempts, initial_backoff=backoff, max_backoff=backoff,
                          jitter=0.0),
    )


def serve(clients: list[LlamaCppClient], server: ScriptedHttpServer,
          **settings: Any) -> LlamaCppClient:
    """A :func:`make_client` of ``server``, added to ``clients`` (closed after the test)."""
    client = make_client(server.url, **settings)
    clients.append(client)
    return client


def collect(stream: Stream) -> tuple[str, StreamEnd]:
    """Iterate a stream to its end: (concatenated text, the StreamEnd)."""
    text: list[str] = []
    ends: list[StreamEnd] = []
    with stream:
        for delta in stream:
            if isinstance(delta, TextDelta):
                text.append(delta.text)
            elif isinstance(delta, StreamEnd):
                ends.append(delta)
    assert len(ends) == 1, "exactly one StreamEnd"
    return "".join(text), ends[0]
