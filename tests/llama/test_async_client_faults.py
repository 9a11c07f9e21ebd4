"""AsyncLlamaCppClient against a scripted SSE server: each fault ends as it does for the
blocking client.

Every case of the fault table (tests/support/llama_faults.py) runs with both clients:
the same typed exception (class, message, status), the same text, the same number of
connections, and a held connection closed by the client.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import pytest

from bridge.llama.client import LlamaCppClient
from bridge.protocol.errors import BackendHTTPError, BridgeError
from tests.support.fake_llama import CLOSE_SEEN_S, ScriptedSSEServer
from tests.support.llama_client import acollect, collect, make_async_client, make_client
from tests.support.llama_faults import FAULT_CASES, FaultCase, fault_target
from tests.support.prompts import HI as MESSAGES

pytestmark = pytest.mark.timeout(30)


@dataclass
class Outcome:
    """How one call of a fault case ended, and how long it took."""

    seconds: float
    error: BridgeError | None = None
    text: str | None = None


def run_sync(case: FaultCase, client: LlamaCppClient) -> Outcome:
    start = time.monotonic()
    try:
        if case.call == "chat":
            text = client.chat(MESSAGES).content
        else:
            text = collect(client.stream_chat(MESSAGES))[0]
    except BridgeError as exc:
        return Outcome(time.monotonic() - start, error=exc)
    return Outcome(time.monotonic() - start, text=text)


async def run_async(case: FaultCase, url: str) -> Outcome:
    async with make_async_client(url, **case.settings) as client:
        start = time.monotonic()
        try:
            if case.call == "chat":
                text = (await client.chat(MESSAGES)).content
            else:
                text = (await acollect(client.stream_chat(MESSAGES)))[0]
        except BridgeError as exc:
            return Outcome(time.monotonic() - start, error=exc)
        return Outcome(time.monotonic() - start, text=text)


def check(case: FaultCase, got: Outcome, server: ScriptedSSEServer | None) -> None:
    """``got`` is what ``case`` demands of every client."""
    if case.error is None:
        assert got.error is None, got.error
        assert got.text == case.text
    else:
        assert isinstance(got.error, case.error), got.error
        if case.match is not None:
            assert re.search(case.match, str(got.error)), str(got.error)
    if server is not None and case.connections is not None:
        assert len(server.connections) == case.connections
    if server is not None and case.closes:
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    low, high = case.seconds
    assert low <= got.seconds < high


@pytest.mark.asyncio
@pytest.mark.parametrize("case", FAULT_CASES, ids=[case.id for case in FAULT_CASES])
async def test_a_fault_ends_as_for_the_blocking_client(case: FaultCase,
                                                       clients: list[LlamaCppClient]) -> None:
    with fault_target(case) as (url, server):
        client = make_client(url, **case.settings)
        clients.append(client)
        sync = await asyncio.to_thread(run_sync, case, client)
        check(case, sync, server)
    with fault_target(case) as (url, server):
        got = await run_async(case, url)
        check(case, got, server)
    assert type(got.error) is type(sync.error)
    if isinstance(got.error, BackendHTTPError) and isinstance(sync.error, BackendHTTPError):
        assert (got.error.status, got.error.error_type, got.error.retryable) == (
            sync.error.status, sync.error.error_type, sync.error.retryable)

