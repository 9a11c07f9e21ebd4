"""AsyncLlamaCppClient against a scripted SSE server: what it sends, the typed API,
cancelling (a call, the task, closing the stream), its sockets, and the small calls.

The faults shared with the blocking client are tests/llama/test_async_client_faults.py.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from bridge.config.settings import DeploymentConfig
from bridge.llama.async_client import AsyncLlamaCppClient
from bridge.llama.async_stream import AsyncStream
from bridge.llama.types import ReasoningDelta, StreamEnd, TextDelta, ToolCallDelta
from bridge.protocol.errors import BackendHTTPError, BackendUnavailable, StreamCancelled
from bridge.protocol.messages import ChatMessage
from tests.support.fake_llama import (
    CLOSE_SEEN_S,
    DONE,
    Pause,
    Respond,
    ScriptedSSEServer,
    Send,
    SSEHeaders,
    Stall,
    chat_chunk,
    chat_stream,
    completion_chunk,
    event,
    llama_error,
)
from tests.support.llama_client import acollect, make_async_client
from tests.support.prompts import HI as MESSAGES

pytestmark = [pytest.mark.timeout(20), pytest.mark.asyncio]


async def closed_by_client(server: ScriptedSSEServer, index: int = 0) -> bool:
    """Whether the server saw the client close connection ``index`` (waited for, bounded)."""
    return await asyncio.to_thread(server.connection(index).client_closed.wait, CLOSE_SEEN_S)


async def reached(server: ScriptedSSEServer, flag: str) -> bool:
    """Wait (bounded) until connection 0's event ``flag`` is set."""
    def wait() -> bool:
        return bool(getattr(server.connection(0), flag).wait(5))

    return await asyncio.to_thread(wait)


# --------------------------------------------------------------------------- requests, deltas


async def test_stream_chat_sends_the_body_and_yields_typed_deltas() -> None:
    with ScriptedSSEServer(chat_stream(["Hel", "lo", " \u00e9"], finish="length")) as server:
        async with make_async_client(server.url) as client:
            stream = client.stream_chat(
                [ChatMessage(role="user", content="hi")], temperature=0.0, max_tokens=3,
                seed=42, top_k=None, chat_template_kwargs={"enable_thinking": False})
            text, end = await acollect(stream)
        conn = server.connection(0)
    assert text == "Hello \u00e9"
    assert (end.finish_reason, end.timings) == ("length", {"predicted_n": 3})
    assert end.usage is not None and end.usage.completion_tokens == 3
    assert conn.request_line.startswith("POST /v1/chat/completions ")
    assert conn.json() == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.0,
                           "max_tokens": 3, "seed": 42,
                           "chat_template_kwargs": {"enable_thinking": False},
                           "stream": True, "stream_options": {"include_usage": True}}
    # Compression would make a server or proxy buffer the tokens.
    assert conn.headers["accept-encoding"] == "identity"
    assert conn.headers["content-type"] == "application/json"
    assert stream.attempts == 1
    assert stream.first_byte_at is not None and stream.first_byte_at >= stream.started_at
    assert stream.first_delta_at is not None and stream.token_events == 3


async def test_reasoning_and_tool_call_fragments() -> None:
    calls = [{"index": 0, "id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"ci'}}]
    more = [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]
    script = [SSEHeaders(), Send(event(chat_chunk(reasoning="thinking"))),
              Send(event(chat_chunk(tool_calls=calls))), Send(event(chat_chunk(tool_calls=more))),
              Send(event(chat_chunk(finish="tool_calls"))), Send(DONE)]
    with ScriptedSSEServer(script) as server:
        async with (make_async_client(server.url) as client,
                    client.stream_chat(MESSAGES, tools=[{"type": "function"}]) as stream):
            deltas = [delta async for delta in stream]
    assert deltas == [ReasoningDelta("thinking"),
                      ToolCallDelta(0, "call_1", "get_weather", '{"ci'),
                      ToolCallDelta(0, None, None, 'ty":"Oslo"}'),
                      StreamEnd("tool_calls", None, None)]


async def test_stream_completion_uses_v1_completions() -> None:
    script = [SSEHeaders(), Send(event(completion_chunk("Once"))),
              Send(event(completion_chunk(" upon", finish="length"))), Send(DONE)]
    with ScriptedSSEServer(script) as server:
        async with make_async_client(server.url) as client:
            text, end = await acollect(client.stream_completion("Tell", max_tokens=2))
        conn = server.connection(0)
    assert (text, end.finish_reason) == ("Once upon", "length")
    assert conn.request_line.startswith("POST /v1/completions ")
    assert conn.json()["prompt"] == "Tell"


async def test_first_byte_shorter_than_idle_does_not_bound_the_body() -> None:
    """A stream's reads wait for the idle budget, not for the first-byte timeout."""
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Pause(0.6),
              Send(event(chat_chunk("b", finish="stop"))), Send(DONE)]
    with ScriptedSSEServer(script) as server:
        async with make_async_client(server.url, first_byte=0.3, idle=2.0) as client:
            text, _ = await acollect(client.stream_chat(MESSAGES))
    assert text == "ab"


async def test_slow_consumer_does_not_use_up_the_idle_budget() -> None:
    with ScriptedSSEServer(chat_stream(["a", "b", "c"])) as server:
        async with (make_async_client(server.url, idle=0.3) as client,
                    client.stream_chat(MESSAGES) as stream):
            got: list[str] = []
            async for delta in stream:
                if isinstance(delta, TextDelta):
                    got.append(delta.text)
                    # A consumer slower than the idle timeout; not waiting for a condition.
                    await asyncio.sleep(0.4)
    assert got == ["a", "b", "c"]


async def test_a_stream_ends_once_and_releases_its_connection() -> None:
    with ScriptedSSEServer(chat_stream(["x"])) as server:
        async with make_async_client(server.url) as client:
            stream = client.stream_chat(MESSAGES)
            deltas = [delta async for delta in stream]  # no `async with`: the end closes it
            assert [delta async for delta in stream] == []
            assert await closed_by_client(server)
    assert isinstance(deltas[-1], StreamEnd)


# --------------------------------------------------------------------------- non-streamed

CHAT_ANSWER = {
    "choices": [{"finish_reason": "tool_calls", "index": 0, "message": {
        "role": "assistant", "content": None, "reasoning_content": "hmm",
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]}}],
    "usage": {"completion_tokens": 5, "prompt_tokens": 7, "total_tokens": 12},
    "timings": {"predicted_n": 5},
}


async def test_chat_non_streamed() -> None:
    with ScriptedSSEServer([Respond(200, CHAT_ANSWER)]) as server:
        async with make_async_client(server.url) as client:
            gen = await client.chat(MESSAGES, tools=[{"type": "function"}], tool_choice="auto")
        body = server.connection(0).json()
    assert gen.content is None and gen.reasoning == "hmm"
    assert gen.tool_calls == CHAT_ANSWER["choices"][0]["message"]["tool_calls"]  # type: ignore[index]
    assert gen.finish_reason == "tool_calls" and gen.timings == {"predicted_n": 5}
    assert gen.usage is not None
    assert (gen.usage.prompt_tokens, gen.usage.completion_tokens) == (7, 5)
    assert body["stream"] is False and "stream_options" not in body
    assert body["tool_choice"] == "auto"


async def test_completion_non_streamed() -> None:
    answer = {"choices": [{"text": "there", "index": 0, "finish_reason": "stop"}]}
    with ScriptedSSEServer([Respond(200, answer)]) as server:
        async with make_async_client(server.url) as client:
            gen = await client.completion("hi", max_tokens=4)
        assert server.connection(0).request_line.startswith("POST /v1/completions ")
    assert (gen.content, gen.finish_reason, gen.usage) == ("there", "stop", None)


# --------------------------------------------------------------------------- cancelling


async def test_cancel_mid_stream_from_another_task() -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        async with make_async_client(server.url, idle=10.0) as client:
            stream = client.stream_chat(MESSAGES)
            assert await anext(stream) == TextDelta("a")

            async def cancel_when_stalled() -> float:
                assert await reached(server, "stall_started")
                stream.cancel()
                return time.monotonic()

            canceller = asyncio.create_task(cancel_when_stalled())
            with pytest.raises(StreamCancelled):
                await anext(stream)  # waits for data until the other task cancels
            raised_at = time.monotonic()
            assert raised_at - await canceller < 0.5
            assert await closed_by_client(server)
            assert stream.cancelled
            with pytest.raises(StopAsyncIteration):
                await anext(stream)


async def test_cancel_while_queued_before_headers() -> None:
    with ScriptedSSEServer([Stall(10)]) as server:
        async with make_async_client(server.url, first_byte=10.0) as client:
            stream = client.stream_chat(MESSAGES)

            async def cancel_when_sent() -> None:
                assert await reached(server, "request_read")
                stream.cancel()

            canceller = asyncio.create_task(cancel_when_sent())
            with pytest.raises(StreamCancelled):
                await stream.open()
            await canceller
            assert await closed_by_client(server)
        assert len(server.connections) == 1


async def test_cancel_before_open_never_connects() -> None:
    with ScriptedSSEServer(chat_stream(["x"])) as server:
        async with make_async_client(server.url) as client:
            stream = client.stream_chat(MESSAGES)
            stream.cancel()
            with pytest.raises(StreamCancelled):
                await anext(stream)
        assert server.connections == []


async def test_cancel_interrupts_retry_backoff() -> None:
    loading = llama_error(503, "Loading model", "unavailable_error")
    with ScriptedSSEServer([loading]) as server:
        async with make_async_client(server.url, attempts=3, backoff=10.0) as client:
            stream = client.stream_chat(MESSAGES)

            async def cancel_in_backoff() -> float:
                # The first 503 was read and its connection closed: the client backs off.
                assert await reached(server, "finished")
                stream.cancel()
                return time.monotonic()

            canceller = asyncio.create_task(cancel_in_backoff())
            with pytest.raises(StreamCancelled, match="retry"):
                await stream.open()
            assert time.monotonic() - await canceller < 0.5
        assert len(server.connections) == 1


async def test_closing_the_stream_mid_answer_closes_the_connection() -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        async with make_async_client(server.url, idle=10.0) as client:
            async with client.stream_chat(MESSAGES) as stream:
                async for _ in stream:
                    break
            assert await closed_by_client(server)


async def test_closing_the_stream_from_another_task_cancels_the_reader() -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        async with make_async_client(server.url, idle=10.0) as client:
            stream = client.stream_chat(MESSAGES)
            assert await anext(stream) == TextDelta("a")

            async def close_when_stalled() -> None:
                assert await reached(server, "stall_started")
                await stream.aclose()

            closer = asyncio.create_task(close_when_stalled())
            with pytest.raises(StreamCancelled):
                await anext(stream)
            await closer
            assert await closed_by_client(server)


async def test_cancelling_the_task_mid_stream_closes_the_connection() -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        async with make_async_client(server.url, idle=10.0) as client:
            got: list[TextDelta] = []
            first = asyncio.Event()

            async def read() -> None:
                async for delta in client.stream_chat(MESSAGES):  # no `async with`
                    if isinstance(delta, TextDelta):
                        got.append(delta)
                        first.set()

            task = asyncio.create_task(read())
            await asyncio.wait_for(first.wait(), 5)
            assert await reached(server, "stall_started")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await closed_by_client(server)
    assert got == [TextDelta("a")]


async def test_cancelling_a_non_streamed_call_closes_the_connection() -> None:
    with ScriptedSSEServer([Stall(10)]) as server:
        async with make_async_client(server.url, non_streamed=10.0) as client:
            task = asyncio.create_task(client.chat(MESSAGES))
            assert await reached(server, "request_read")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await closed_by_client(server)


# --------------------------------------------------------------------------- sockets


async def test_connections_have_nagle_off() -> None:
    """Set explicitly (asyncio's own TCP transports happen to set it too)."""
    with ScriptedSSEServer([chat_stream(["a"]), [Respond(200, {"status": "ok"})]]) as server:
        async with (make_async_client(server.url) as client,
                    client.stream_chat(MESSAGES) as stream):
            await stream.open()
            assert isinstance(stream, AsyncStream)
            response = stream._response
            assert response is not None
            sock = response.extensions["network_stream"].get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            text = [d async for d in stream if isinstance(d, TextDelta)]
    assert text == [TextDelta("a")]


# --------------------------------------------------------------------------- server state


async def test_health_ok_loading_and_unreachable() -> None:
    loading = llama_error(503, "Loading model", "unavailable_error")
    with ScriptedSSEServer([[Respond(200, {"status": "ok"})], [loading]]) as server:
        async with make_async_client(server.url, attempts=3) as client:
            ok = await client.health()
            not_yet = await client.health()
    assert (ok.ok, ok.status, ok.http_status) == (True, "ok", 200)
    assert (not_yet.ok, not_yet.status, not_yet.http_status) == (False, "Loading model", 503)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}"
        async with make_async_client(url, attempts=3) as gone:
            # twice, not the client's 3 attempts: a probe only rules out a stale connection
            with pytest.raises(BackendUnavailable, match="attempt 2/2"):
                await gone.health()


async def test_props_slots_models_tokenize() -> None:
    props = {"total_slots": 2, "model_alias": "", "model_path": "/m/gemma.gguf",
             "default_generation_settings": {"n_ctx": 2048, "params": {}},
             "chat_template_caps": {"supports_tools": False}}
    slots = [{"id": 0, "is_processing": False}, {"id": 1, "is_processing": True}]
    models = {"object": "list", "data": [{"id": "gemma", "object": "model"}]}
    tokens = {"tokens": [1, {"id": 2, "piece": "b"}]}
    scripts = [[Respond(200, props)], [Respond(200, slots)], [Respond(200, models)],
               [Respond(200, tokens)]]
    with ScriptedSSEServer(scripts) as server:
        async with make_async_client(server.url) as client:
            got = await client.props()
            assert await client.slots() == slots
            assert await client.models() == ["gemma"]
            assert await client.tokenize("ab") == [1, 2]
        assert server.connection(3).json() == {"content": "ab"}
    assert (got.total_slots, got.model, got.n_ctx) == (2, "/m/gemma.gguf", 2048)
    assert got.chat_template_caps == {"supports_tools": False}


async def test_slots_endpoint_disabled_is_http_error() -> None:
    disabled = llama_error(501, "This server does not support slots endpoint.",
                           "not_supported_error")
    with ScriptedSSEServer([disabled]) as server:
        async with make_async_client(server.url) as client:
            with pytest.raises(BackendHTTPError) as info:
                await client.slots()
    assert info.value.status == 501


# --------------------------------------------------------------------------- construction


async def test_a_configuration_gives_url_timeouts_retries_and_key() -> None:
    with ScriptedSSEServer([Respond(200, {"status": "ok"})]) as server:
        config = DeploymentConfig(llama={"urls": [server.url + "/"], "connect_timeout_s": 2.5,
                                         "first_byte_timeout_s": 7.0, "idle_timeout_s": 3.0,
                                         "retries": 4, "api_key": "sesame"})
        async with AsyncLlamaCppClient(config) as client:
            assert (await client.health()).ok
        assert server.connection(0).headers["authorization"] == "Bearer sesame"
    assert client.base_url == server.url
    assert (client.timeouts.connect, client.timeouts.first_byte, client.timeouts.idle) == (
        2.5, 7.0, 3.0)
    assert client.retry.attempts == 4


async def test_bad_urls_are_rejected() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        AsyncLlamaCppClient("localhost:8080")
    with pytest.raises(ValueError, match="urls"):
        AsyncLlamaCppClient(DeploymentConfig())
