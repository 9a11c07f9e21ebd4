"""AsyncLlamaCppClient's text API against a scripted SSE server: ``generate_stream``
yields ``str`` chunks, ``generate`` returns the text or the tool calls, ``debug_info`` is
filled (the keys of :mod:`bridge.llama.answers`, as the blocking client's) and never sent."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.llama.answers import DEBUG_KEYS
from bridge.protocol.errors import BackendHTTPError, BackendProtocolError
from tests.support.fake_llama import (
    COMPLETION_PATH,
    DONE,
    Reset,
    Respond,
    ScriptedSSEServer,
    Send,
    SSEHeaders,
    Stall,
    chat_chunk,
    chat_stream,
    event,
    llama_error,
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
    assert set(info) == set(DEBUG_KEYS)
    assert info["finish_reason"] == "length"
    assert info["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert info["timings"] == {"predicted_n": 3}
    assert info["backend"] == server.url
    assert info["error"] is None and info["tool_calls"] is None
    assert info["ttft_s"] is not None and 0 <= info["ttft_s"] <= info["elapsed_s"]


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
            assert info["usage"] == {"prompt_tokens": 4, "completion_tokens": 2,
                                     "total_tokens": 6}
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
    # The answer never ended: no finish reason, what was generated until then.
    assert info["finish_reason"] is None and info["error"] is None
    assert info["usage"] == {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}


async def test_a_failed_stream_names_its_error_in_debug_info() -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Reset()]
    info: dict[str, Any] = {}
    with ScriptedSSEServer(script) as server:
        async with make_async_client(server.url) as client:
            got: list[str] = []
            with pytest.raises(BackendProtocolError):
                async with client.generate_stream(MESSAGES, debug_info=info) as chunks:
                    async for chunk in chunks:
                        got.append(chunk)
    assert got == ["a"]
    assert info["error"].startswith("BackendProtocolError: ")
    assert info["finish_reason"] is None
    assert info["usage"]["completion_tokens"] == 1


async def test_a_failed_call_names_its_error_in_debug_info() -> None:
    info: dict[str, Any] = {}
    with ScriptedSSEServer([llama_error(400, "bad", "invalid_request_error")]) as server:
        async with make_async_client(server.url) as client:
            with pytest.raises(BackendHTTPError):
                await client.generate(MESSAGES, debug_info=info)
    assert info["error"].startswith("BackendHTTPError: ")
    assert info["backend"] == server.url and info["usage"] is None
