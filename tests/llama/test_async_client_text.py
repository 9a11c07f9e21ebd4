"""AsyncLlamaCppClient's text level against a scripted SSE server: ``generate_stream``
yields ``str`` chunks, ``generate`` returns the text or the tool calls, ``debug_info`` is
filled and never sent."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.fake_llama import (
    COMPLETION_PATH,
    DONE,
    Respond,
    ScriptedSSEServer,
    Send,
    SSEHeaders,
    Stall,
    chat_chunk,
    chat_stream,
    event,
    stream_script,
)
from tests.support.llama_client import make_async_client
from tests.support.prompts import HI as MESSAGES

pytestmark = [pytest.mark.timeout(20), pytest.mark.asyncio]


async def test_generate_stream_yields_text_and_fills_debug_info() -> None:
    info: dict[str, Any] = {}
    with ScriptedSSEServer(chat_stream(["Hel", "lo", " \u00e9"], finish="length")) as server:
        async with make_async_client(server.url) as client:
            chunks = [c async for c in client.generate_stream(MESSAGES, 0.0, 0.9, 3, info)]
        body = server.connection(0).json()
    assert chunks == ["Hel", "lo", " \u00e9"]
    assert body["temperature"] == 0.0 and body["top_p"] == 0.9 and body["max_tokens"] == 3
    assert "debug_info" not in body
    assert info["finish_reason"] == "length"
    assert info["usage"] == {"prompt_tokens": 3, "completion_tokens": 3}
    assert info["timings"] == {"predicted_n": 3}
    assert info["backend"] == server.url


async def test_generate_stream_collects_streamed_tool_calls_in_debug_info() -> None:
    calls = [{"index": 0, "id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"ci'}}]
    more = [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]
    script = [SSEHeaders(), Send(event(chat_chunk(tool_calls=calls))),
              Send(event(chat_chunk(tool_calls=more))),
              Send(event(chat_chunk(finish="tool_calls"))), Send(DONE)]
    info: dict[str, Any] = {}
    with ScriptedSSEServer(script) as server:
        async with make_async_client(server.url) as client:
            chunks = [c async for c in client.generate_stream(
                MESSAGES, debug_info=info, tools=[{"type": "function"}], tool_choice="auto")]
        body = server.connection(0).json()
    assert chunks == []
    assert body["tools"] == [{"type": "function"}] and body["tool_choice"] == "auto"
    assert info["finish_reason"] == "tool_calls"
    assert info["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Oslo"}'}}]


async def test_generate_returns_text_or_tool_calls() -> None:
    text = {"choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hi there"}}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
    tool_calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    tools = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": tool_calls}}]}
    info: dict[str, Any] = {}
    with ScriptedSSEServer([[Respond(200, text)], [Respond(200, tools)]]) as server:
        async with make_async_client(server.url) as client:
            assert await client.generate(MESSAGES, max_tokens=8, debug_info=info) == "Hi there"
            assert info["usage"] == {"prompt_tokens": 4, "completion_tokens": 2}
            assert info["finish_reason"] == "stop" and info["backend"] == server.url
            assert await client.generate(MESSAGES, tools=[{"type": "function"}]) == tool_calls
        assert "debug_info" not in server.connection(0).json()


async def test_complete_stream_and_complete() -> None:
    answer = {"choices": [{"text": " upon a time", "index": 0, "finish_reason": "stop"}]}
    info: dict[str, Any] = {}
    with ScriptedSSEServer([stream_script(COMPLETION_PATH, ["Once", " upon"]),
                            [Respond(200, answer)]]) as server:
        async with make_async_client(server.url) as client:
            chunks = [c async for c in client.complete_stream("Tell", max_tokens=2,
                                                              debug_info=info)]
            assert await client.complete("Once") == " upon a time"
        assert server.connection(0).request_line.startswith("POST /v1/completions ")
        assert server.connection(1).json()["prompt"] == "Once"
    assert chunks == ["Once", " upon"]
    assert info["finish_reason"] == "stop"


async def test_leaving_async_with_mid_answer_closes_the_connection() -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Stall(10)]
    info: dict[str, Any] = {}
    with ScriptedSSEServer(script) as server:
        async with make_async_client(server.url, idle=10.0) as client:
            async with client.generate_stream(MESSAGES, debug_info=info) as chunks:
                async for chunk in chunks:
                    assert chunk == "a"
                    break
            assert server.connection(0).client_closed.wait(5)
    assert info == {}  # the answer never ended
