"""AsyncLlamaCppClient against the session's real llama.cpp server (xllamacpp + Gemma 3 270M).

As tests/llama/test_client_real.py for the blocking client: greedy requests (temperature
0, a fixed seed) whose streamed text must equal llama-server's own non-streamed answer,
and cancelling -- the stream, its task -- must free the slot (``/slots``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import pytest
import pytest_asyncio

from bridge.llama.answers import DEBUG_KEYS
from bridge.llama.async_client import AsyncLlamaCppClient
from bridge.llama.client import LlamaCppClient
from bridge.llama.types import TextDelta, Timeouts
from bridge.protocol.errors import StreamCancelled
from tests.support.llama_client import acollect
from tests.support.waiting import poll_until

pytestmark = [pytest.mark.llama, pytest.mark.timeout(180), pytest.mark.asyncio]

SAMPLING: dict[str, Any] = {"temperature": 0.0, "seed": 42, "max_tokens": 16}
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."}]
TIMEOUTS = Timeouts(connect=5, first_byte=60, idle=30, request=10, non_streamed=120)
LONG = {"temperature": 0.0, "seed": 42, "max_tokens": 2000, "ignore_eos": True}
"""A request that would run ~30 s if nothing stopped it."""


@pytest_asyncio.fixture
async def client(llama_server: str) -> AsyncIterator[AsyncLlamaCppClient]:
    async with AsyncLlamaCppClient(llama_server, timeouts=TIMEOUTS) as c:
        yield c


@pytest.fixture
def sync_client(llama_server: str) -> Iterator[LlamaCppClient]:
    with LlamaCppClient(llama_server, timeouts=TIMEOUTS) as c:
        yield c


async def no_slot_busy(sync_client: LlamaCppClient, within: float) -> bool:
    """Poll /slots until no slot is processing, up to ``within`` seconds."""
    def idle(slots: list[dict[str, Any]]) -> bool:
        return not any(slot.get("is_processing") for slot in slots)

    return idle(await asyncio.to_thread(poll_until, sync_client.slots, idle, within, 0.1))


async def test_streamed_chat_equals_llama_servers_own_answer(
        client: AsyncLlamaCppClient, sync_client: LlamaCppClient) -> None:
    text, end = await acollect(client.stream_chat(MESSAGES, **SAMPLING))
    own = await asyncio.to_thread(sync_client.chat, MESSAGES, **SAMPLING)
    gen = await client.chat(MESSAGES, **SAMPLING)
    assert text == own.content == gen.content
    assert end.finish_reason == own.finish_reason == gen.finish_reason
    assert end.finish_reason in ("stop", "length")
    assert end.usage is not None and own.usage is not None
    assert end.usage.completion_tokens == own.usage.completion_tokens
    assert end.usage.prompt_tokens == own.usage.prompt_tokens > 0
    assert 1 <= end.usage.completion_tokens <= 16
    assert end.timings is not None and "predicted_n" in end.timings


async def test_streamed_completion_equals_llama_servers_own_answer(
        client: AsyncLlamaCppClient, sync_client: LlamaCppClient) -> None:
    prompt = "The capital of France is"
    text, end = await acollect(client.stream_completion(prompt, **SAMPLING))
    own = await asyncio.to_thread(sync_client.completion, prompt, **SAMPLING)
    gen = await client.completion(prompt, **SAMPLING)
    assert text == own.content == gen.content
    assert end.finish_reason == own.finish_reason
    assert end.usage is not None and own.usage is not None
    assert end.usage.completion_tokens == own.usage.completion_tokens >= 1


async def test_text_api_answers_as_the_blocking_clients(
        client: AsyncLlamaCppClient, sync_client: LlamaCppClient) -> None:
    info: dict[str, Any] = {}
    async with client.generate_stream(MESSAGES, debug_info=info, **SAMPLING) as chunks:
        streamed = "".join([chunk async for chunk in chunks])
    whole = await client.generate(MESSAGES, **SAMPLING)
    sync_info: dict[str, Any] = {}
    sync_streamed = await asyncio.to_thread(
        lambda: "".join(sync_client.generate_stream(MESSAGES, debug_info=sync_info, **SAMPLING)))
    assert streamed == whole == sync_streamed
    assert set(info) == set(sync_info) == set(DEBUG_KEYS)
    assert info["finish_reason"] == sync_info["finish_reason"] in ("stop", "length")
    assert info["usage"] == sync_info["usage"]
    assert info["usage"]["completion_tokens"] <= 16
    assert info["backend"] == client.base_url and info["error"] is None
    assert info["ttft_s"] is not None and 0 < info["ttft_s"] <= info["elapsed_s"]


@pytest.mark.parametrize("how", ["close", "cancel"])
async def test_stopping_a_stream_frees_the_slot(client: AsyncLlamaCppClient,
                                                sync_client: LlamaCppClient,
                                                how: Literal["close", "cancel"]) -> None:
    """``close``: leave ``async with`` mid-answer; ``cancel``: ``stream.cancel()`` from
    another task while this one reads."""
    busy_during_stream = False
    seen = 0
    async with client.stream_chat(MESSAGES, **LONG) as stream:
        with pytest.raises(StreamCancelled) if how == "cancel" else contextlib.nullcontext():
            async for delta in stream:
                seen += isinstance(delta, TextDelta)
                if seen == 3:
                    busy_during_stream = any(s.get("is_processing")
                                             for s in await client.slots())
                    if how == "close":
                        break
                    asyncio.get_running_loop().call_soon(stream.cancel)
    assert busy_during_stream, "the slot should have been busy while streaming"
    assert await no_slot_busy(sync_client, within=5.0), "llama-server kept generating"


async def test_cancelling_the_task_mid_stream_frees_the_slot(
        client: AsyncLlamaCppClient, sync_client: LlamaCppClient) -> None:
    three = asyncio.Event()

    async def read() -> None:
        seen = 0
        async for delta in client.stream_chat(MESSAGES, **LONG):  # no `async with`
            seen += isinstance(delta, TextDelta)
            if seen == 3:
                three.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(three.wait(), 60)
    assert any(s.get("is_processing") for s in await client.slots())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await no_slot_busy(sync_client, within=5.0), "llama-server kept generating"


async def test_health_props_slots_models(client: AsyncLlamaCppClient) -> None:
    health = await client.health()
    assert (health.ok, health.status, health.http_status) == (True, "ok", 200)
    props = await client.props()
    assert props.total_slots == 2
    assert props.n_ctx == 2048  # 4096 shared by 2 slots
    assert props.model is not None and props.model.endswith(".gguf")
    assert len(await client.slots()) == 2
    models = await client.models()
    assert len(models) == 1 and models[0].endswith(".gguf")
    assert await client.count_tokens("Hello world") >= 2

