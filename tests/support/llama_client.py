"""The llama client as the tests drive it: short timeouts and retries, a stream read to its end.

Clients a test makes are closed after it: pass them to conftest's ``clients`` list
(:func:`serve` does).
"""

from __future__ import annotations

from typing import Any

from bridge.llama.async_client import AsyncLlamaCppClient
from bridge.llama.async_stream import AsyncStream
from bridge.llama.client import LlamaCppClient, RetryPolicy, Stream, StreamEnd, TextDelta, Timeouts
from tests.support.fake_llama import ScriptedHttpServer


def short_settings(*, connect: float = 1.0, first_byte: float = 2.0, idle: float = 1.0,
                  request: float = 1.0, non_streamed: float = 2.0, attempts: int = 1,
                  backoff: float = 0.01) -> dict[str, Any]:
    """Timeouts short enough for a scripted server (seconds) and retries without jitter,
    as the clients' ``timeouts`` and ``retry`` arguments."""
    return {"timeouts": Timeouts(connect=connect, first_byte=first_byte, idle=idle,
                                 request=request, non_streamed=non_streamed),
            "retry": RetryPolicy(attempts=attempts, initial_backoff=backoff,
                                 max_backoff=backoff, jitter=0.0)}


def make_client(url: str, **settings: Any) -> LlamaCppClient:
    """A client with :func:`short_settings` (``settings``: their arguments)."""
    return LlamaCppClient(url, **short_settings(**settings))


def make_async_client(url: str, **settings: Any) -> AsyncLlamaCppClient:
    """An asyncio client with :func:`short_settings` (``settings``: their arguments)."""
    return AsyncLlamaCppClient(url, **short_settings(**settings))


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


async def acollect(stream: AsyncStream) -> tuple[str, StreamEnd]:
    """:func:`collect` for an asyncio stream."""
    text: list[str] = []
    ends: list[StreamEnd] = []
    async with stream:
        async for delta in stream:
            if isinstance(delta, TextDelta):
                text.append(delta.text)
            elif isinstance(delta, StreamEnd):
                ends.append(delta)
    assert len(ends) == 1, "exactly one StreamEnd"
    return "".join(text), ends[0]
