"""LlamaCppClient against a scripted SSE server: one test per fault.

Each test asserts the typed exception (or the exact result), that it came within
its timeout, and — where a stuck server must be released — that the server saw
the client close the connection.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from bridge.llama.client import (
    CancelToken,
    LlamaCppClient,
    ReasoningDelta,
    Stream,
    StreamEnd,
    TextDelta,
    ToolCallDelta,
)
from bridge.protocol.errors import (
    BackendHTTPError,
    BackendProtocolError,
    BackendStreamError,
    BackendUnavailable,
    ConnectTimeout,
    FirstByteTimeout,
    IdleTimeout,
    StreamCancelled,
)
from bridge.protocol.messages import ChatMessage
from tests.support.fake_llama import (
    CLOSE_SEEN_S,
    DONE,
    PING,
    Action,
    Close,
    Pause,
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
    usage_chunk,
)
from tests.support.llama_client import collect, make_client, serve
from tests.support.prompts import HI as MESSAGES

pytestmark = pytest.mark.timeout(20)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


# --------------------------------------------------------------------------- success paths


def test_well_formed_stream_yields_text_usage_and_timings(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer(chat_stream(["Hel", "lo", " \u00e9"], finish="length")) as server:
        client = serve(clients, server)
        stream = client.stream_chat(
            [ChatMessage(role="user", content="hi")], temperature=0.0, max_tokens=3,
            seed=42, top_k=None, chat_template_kwargs={"enable_thinking": False})
        text, end = collect(stream)
        body = server.connection(0).json()
        line = server.connection(0).request_line
    assert text == "Hello \u00e9"
    assert end.finish_reason == "length"
    assert end.usage is not None and end.usage.completion_tokens == 3
    assert end.timings == {"predicted_n": 3}
    assert line.startswith("POST /v1/chat/completions ")
    assert body == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.0,
                    "max_tokens": 3, "seed": 42,
                    "chat_template_kwargs": {"enable_thinking": False},
                    "stream": True, "stream_options": {"include_usage": True}}
    assert stream.attempts == 1
    assert stream.first_byte_at is not None and stream.first_byte_at >= stream.started_at


def test_reasoning_and_tool_call_fragments(clients: list[LlamaCppClient]) -> None:
    calls = [{"index": 0, "id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"ci'}}]
    more = [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]
    script = [SSEHeaders(), Send(event(chat_chunk(reasoning="thinking"))),
              Send(event(chat_chunk(tool_calls=calls))), Send(event(chat_chunk(tool_calls=more))),
              Send(event(chat_chunk(finish="tool_calls"))), Send(DONE)]
    with ScriptedSSEServer(script) as server:
        client = serve(clients, server)
        with client.stream_chat(MESSAGES, tools=[{"type": "function"}]) as stream:
            deltas = list(stream)
    assert deltas == [ReasoningDelta("thinking"),
                      ToolCallDelta(0, "call_1", "get_weather", '{"ci'),
                      ToolCallDelta(0, None, None, 'ty":"Oslo"}'),
                      StreamEnd("tool_calls", None, None)]


def test_completion_stream_uses_v1_completions(clients: list[LlamaCppClient]) -> None:
    def chunk(text: str, finish: str | None = None) -> bytes:
        return event({"choices": [{"text": text, "index": 0, "finish_reason": finish}],
                      "object": "text_completion"})

    script = [SSEHeaders(), Send(chunk("Once")), Send(chunk(" upon")),
              Send(event({"choices": [{"text": "", "index": 0, "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 2, "completion_tokens": 2}})),
              Send(DONE)]
    with ScriptedSSEServer(script) as server:
        client = serve(clients, server)
        text, end = collect(client.stream_completion("Tell", max_tokens=2))
        conn = server.connection(0)
    assert text == "Once upon"
    assert end.finish_reason == "length"
    assert end.usage is not None and end.usage.prompt_tokens == 2
    assert conn.request_line.startswith("POST /v1/completions ")
    assert conn.json()["prompt"] == "Tell"


def test_eof_after_finish_reason_without_done_completes(clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))),
              Send(event(chat_chunk(finish="stop")))]  # then a proper end of body, no [DONE]
    with ScriptedSSEServer(script) as server:
        text, end = collect(serve(clients, server).stream_chat(MESSAGES))
    assert (text, end.finish_reason, end.usage) == ("a", "stop", None)


def test_close_delimited_body_after_finish_reason_completes(
        clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(chunked=False), Send(event(chat_chunk("a"))),
              Send(event(chat_chunk(finish="stop"))), Close()]
    with ScriptedSSEServer(script) as server:
        text, end = collect(serve(clients, server).stream_chat(MESSAGES))
    assert (text, end.finish_reason) == ("a", "stop")


def test_multibyte_utf8_split_across_network_writes(clients: list[LlamaCppClient]) -> None:
    text = "h\u00e9llo \U0001f642 \u4e16\u754c \u0939\u093f\u0928\u094d\u0926\u0940"
    raw = event(chat_chunk(text))
    # Every byte its own HTTP chunk and TCP write: code points arrive split.
    script = [SSEHeaders(), *(Send(raw[i:i + 1]) for i in range(len(raw))),
              Send(event(chat_chunk(finish="stop"))), Send(DONE)]
    with ScriptedSSEServer(script) as server:
        got, _ = collect(serve(clients, server).stream_chat(MESSAGES))
    assert got == text


def test_crlf_line_endings(clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("x"), eol=b"\r\n")),
              Send(b":\r\n\r\n"), Send(event(chat_chunk("y"), eol=b"\r\n")),
              Send(event(chat_chunk(finish="stop"), eol=b"\r\n")), Send(b"data: [DONE]\r\n\r\n")]
    with ScriptedSSEServer(script) as server:
        got, end = collect(serve(clients, server).stream_chat(MESSAGES))
    assert (got, end.finish_reason) == ("xy", "stop")


def test_a_running_stream_holds_no_8_kib_read_buffer(clients: list[LlamaCppClient]) -> None:
    """http.client's reader for the status line and headers lives as long as the
    response; at its default 8 KiB it was the largest allocation per running stream."""
    with ScriptedSSEServer(chat_stream(["a", "b"])) as server:
        stream = serve(clients, server).stream_chat(MESSAGES)
        with stream:
            stream.open()
            reader = stream._response.raw._fp.fp  # type: ignore[union-attr]
            assert isinstance(reader, io.BufferedReader)
            assert sys.getsizeof(reader) < 2048  # C BufferedReader counts its buffer
            got = [d for d in stream if isinstance(d, TextDelta)]
    assert got == [TextDelta("a"), TextDelta("b")]


def test_slow_first_byte_within_timeout_works(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([Pause(0.4), *chat_stream(["ok"])]) as server:
        stream = serve(clients, server, first_byte=3.0).stream_chat(MESSAGES)
        got, _ = collect(stream)
    assert got == "ok"
    assert stream.first_byte_at is not None
    assert stream.first_byte_at - stream.started_at >= 0.4


def test_pings_interleaved_with_data_succeed(clients: list[LlamaCppClient]) -> None:
    # Data every ~0.25 s, pings in between; the whole stream lasts > 3x idle.
    script: list[Action] = [SSEHeaders()]
    for i in range(6):
        script += [Send(PING), Pause(0.12), Send(PING), Pause(0.12),
                   Send(event(chat_chunk(str(i))))]
    script += [Send(event(chat_chunk(finish="stop"))), Send(DONE)]
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=0.5).stream_chat(MESSAGES)
        got, _ = collect(stream)
    assert got == "012345"
    assert stream.pings == 12


def test_slow_consumer_does_not_use_up_the_idle_budget(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer(chat_stream(["a", "b", "c"])) as server:
        stream = serve(clients, server, idle=0.3).stream_chat(MESSAGES)
        got: list[str] = []
        with stream:
            for delta in stream:
                if isinstance(delta, TextDelta):
                    got.append(delta.text)
                    # Simulates a consumer slower than the idle timeout (e.g. a slow
                    # broker); it is not waiting for a condition.
                    time.sleep(0.4)
    assert got == ["a", "b", "c"]


# --------------------------------------------------------------------------- timeouts


def test_stall_before_first_byte_is_first_byte_timeout(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([Stall(10)]) as server:
        client = serve(clients, server, first_byte=0.4, attempts=3)
        start = time.monotonic()
        with pytest.raises(FirstByteTimeout, match=r"first_byte=0\.4 s") as info:
            collect(client.stream_chat(MESSAGES))
        took = elapsed_since(start)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
        assert len(server.connections) == 1  # the server may be working on it: never retried
    assert 0.35 <= took < 1.5
    assert server.url in str(info.value)


def test_stall_mid_stream_is_idle_timeout_and_closes(clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("partial"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=0.4, attempts=3).stream_chat(MESSAGES)
        assert next(stream) == TextDelta("partial")
        start = time.monotonic()
        with pytest.raises(IdleTimeout, match=r"idle=0\.4 s"):
            next(stream)
        took = elapsed_since(start)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
        assert len(server.connections) == 1
    assert 0.35 <= took < 1.5


def test_only_pings_for_longer_than_idle_is_idle_timeout(clients: list[LlamaCppClient]) -> None:
    script: list[Action] = [SSEHeaders(), Send(event(chat_chunk("a")))]
    script += [Send(PING), Pause(0.05)] * 100  # pings for ~5 s, never data
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=0.4).stream_chat(MESSAGES)
        assert next(stream) == TextDelta("a")
        start = time.monotonic()
        with pytest.raises(IdleTimeout, match="keep-alive ping"):
            next(stream)
        took = elapsed_since(start)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    assert 0.35 <= took < 1.5
    assert stream.pings >= 3


# --------------------------------------------------------------------------- broken streams


def test_reset_mid_stream_is_protocol_error_not_retried(clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("half"))), Reset()]
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, attempts=3).stream_chat(MESSAGES)
        with pytest.raises(BackendProtocolError, match="broke mid-stream"):
            collect(stream)
        assert len(server.connections) == 1
    assert stream.attempts == 1


def test_graceful_close_mid_chunked_body_is_protocol_error(
        clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("half"))), Close()]
    with ScriptedSSEServer(script) as server:
        with pytest.raises(BackendProtocolError):
            collect(serve(clients, server, attempts=3).stream_chat(MESSAGES))
        assert len(server.connections) == 1


def test_eof_without_finish_reason_is_cut_off(clients: list[LlamaCppClient]) -> None:
    # A complete HTTP body that simply stops: no finish_reason, no [DONE].
    script = [SSEHeaders(), Send(event(chat_chunk("half")))]
    with ScriptedSSEServer(script) as server:
        with pytest.raises(BackendProtocolError, match="cut off"):
            collect(serve(clients, server, attempts=3).stream_chat(MESSAGES))
        assert len(server.connections) == 1


def test_malformed_json_event_is_protocol_error(clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Send(b'data: {"choices": [\n\n'),
              Stall(10)]
    with ScriptedSSEServer(script) as server:
        with pytest.raises(BackendProtocolError, match="malformed JSON"):
            collect(serve(clients, server).stream_chat(MESSAGES))
        # the server stalls after the bad event: only the client can end the connection
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)


def test_in_band_error_event_is_stream_error(clients: list[LlamaCppClient]) -> None:
    error = {"error": {"code": 500, "message": "slot crashed", "type": "server_error"}}
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Send(event(error)), Stall(10)]
    with ScriptedSSEServer(script) as server:
        with pytest.raises(BackendStreamError, match="slot crashed") as info:
            collect(serve(clients, server).stream_chat(MESSAGES))
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    assert info.value.error_type == "server_error"
    assert info.value.status == 0


def test_legacy_error_line_is_stream_error(clients: list[LlamaCppClient]) -> None:
    legacy = b'error: {"code":400,"message":"bad grammar","type":"invalid_request_error"}\n\n'
    script = [SSEHeaders(), Send(legacy)]
    with (ScriptedSSEServer(script) as server,
          pytest.raises(BackendStreamError, match="bad grammar") as info):
        collect(serve(clients, server).stream_chat(MESSAGES))
    assert info.value.error_type == "invalid_request_error"


def test_non_event_stream_answer_is_protocol_error(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([Respond(200, {"choices": []})]) as server:
        with pytest.raises(BackendProtocolError, match="not an event stream"):
            collect(serve(clients, server).stream_chat(MESSAGES))
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)


@contextlib.contextmanager
def python_runs_during_every_allocation() -> Iterator[list[BaseException]]:
    """Run a little Python (a 30-call recursion) at every garbage collection, and make
    every allocation of a container collect: as a finalizer or an unraisable-exception
    hook may run at any allocation. Yields the errors that Python code hit."""
    errors: list[BaseException] = []

    def recurse(n: int) -> int:
        return 0 if n == 0 else recurse(n - 1)

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            try:
                recurse(30)
            except RecursionError as exc:
                errors.append(exc)

    threshold = gc.get_threshold()
    gc.callbacks.append(callback)
    gc.set_threshold(1)
    try:
        yield errors
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(callback)


@pytest.mark.parametrize("nested", [b"[" * 200_000, b'{"a":' * 100_000],
                         ids=["arrays", "objects"])
def test_deeply_nested_json_is_protocol_error(clients: list[LlamaCppClient],
                                              nested: bytes) -> None:
    """Refused as malformed without recursing: a decoder that recursed to the stack's
    limit would make any Python that runs meanwhile (a finalizer, pytest's hook for
    unraisable exceptions) fail with RecursionError itself."""
    script = [SSEHeaders(), Send(b"data: " + nested + b"\n\n")]
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server).stream_chat(MESSAGES)
        with (python_runs_during_every_allocation() as errors,
              pytest.raises(BackendProtocolError, match="malformed JSON")):
            collect(stream)
    assert errors == []


def test_deeply_nested_json_body_is_protocol_error(clients: list[LlamaCppClient]) -> None:
    body = b'{"choices": ' + b"[" * 200_000
    with ScriptedSSEServer([Respond(200, body, content_type="application/json")]) as server:
        client = serve(clients, server)
        with (python_runs_during_every_allocation() as errors,
              pytest.raises(BackendProtocolError, match="malformed JSON")):
            client.chat(MESSAGES)
    assert errors == []


# --------------------------------------------------------------------------- HTTP errors, retries


def test_4xx_llama_error_is_http_error_not_retried(clients: list[LlamaCppClient]) -> None:
    msg = "request (3024 tokens) exceeds the available context size (2048 tokens)"
    with ScriptedSSEServer([llama_error(400, msg, "exceed_context_size_error")]) as server:
        stream = serve(clients, server, attempts=3).stream_chat(MESSAGES)
        with pytest.raises(BackendHTTPError, match="exceeds the available context") as info:
            stream.open()
        assert len(server.connections) == 1
    assert info.value.status == 400
    assert info.value.error_type == "exceed_context_size_error"
    assert info.value.retryable is False
    assert isinstance(info.value.body, dict)


def test_non_json_5xx_body_is_tolerated(clients: list[LlamaCppClient]) -> None:
    page = Respond(502, "<html>Bad Gateway</html>", content_type="text/html")
    with ScriptedSSEServer([page]) as server:
        with pytest.raises(BackendHTTPError, match="Bad Gateway") as info:
            collect(serve(clients, server, attempts=3).stream_chat(MESSAGES))
        assert len(server.connections) == 1
    assert (info.value.status, info.value.error_type) == (502, None)


def test_503_loading_then_success_is_retried(clients: list[LlamaCppClient]) -> None:
    loading = llama_error(503, "Loading model", "unavailable_error")
    with ScriptedSSEServer([[loading], [loading], chat_stream(["fine"])]) as server:
        stream = serve(clients, server, attempts=3).stream_chat(MESSAGES)
        got, _ = collect(stream)
        assert len(server.connections) == 3
    assert got == "fine"
    assert stream.attempts == 3


def test_503_every_time_gives_up_after_the_attempts(clients: list[LlamaCppClient]) -> None:
    loading = llama_error(503, "Loading model", "unavailable_error")
    with ScriptedSSEServer([loading]) as server:
        with pytest.raises(BackendHTTPError, match="Loading model") as info:
            collect(serve(clients, server, attempts=3).stream_chat(MESSAGES))
        assert len(server.connections) == 3
    assert info.value.status == 503


def test_connection_refused_is_unavailable_after_n_attempts(
        clients: list[LlamaCppClient]) -> None:
    # A bound but not listening port refuses connections, and nobody can take it meanwhile.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}"
        client = make_client(url, attempts=3)
        clients.append(client)
        stream = client.stream_chat(MESSAGES)
        start = time.monotonic()
        with pytest.raises(BackendUnavailable, match="attempt 3/3") as info:
            collect(stream)
    assert not isinstance(info.value, ConnectTimeout)
    assert stream.attempts == 3
    assert url in str(info.value)
    assert elapsed_since(start) < 2.0


def test_connect_timeout_when_nobody_accepts(clients: list[LlamaCppClient]) -> None:
    # A listener with a full accept queue drops further SYNs: the connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = []
        for _ in range(4):  # more than the backlog holds; later ones wait in SYN_SENT
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        try:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"
            client = make_client(url, connect=0.3, attempts=2)
            clients.append(client)
            start = time.monotonic()
            with pytest.raises(ConnectTimeout, match=r"connect=0\.3 s"):
                collect(client.stream_chat(MESSAGES))
            assert 0.5 <= elapsed_since(start) < 3.0  # two attempts of 0.3 s
        finally:
            for filler in fillers:
                filler.close()


# --------------------------------------------------------------------------- cancellation


def cancel_when(server: ScriptedSSEServer, flag: str,
                stream: Stream) -> tuple[threading.Thread, list[float]]:
    """A thread that cancels ``stream`` once connection 0's event ``flag`` is set
    (waiting for the connection to arrive first); records when it cancelled."""
    when: list[float] = []

    def run() -> None:
        event: threading.Event = getattr(server.connection(0), flag)
        if event.wait(5):
            when.append(time.monotonic())
            stream.cancel()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, when


def test_cancel_mid_stream_from_another_thread(clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=10.0).stream_chat(MESSAGES)
        assert next(stream) == TextDelta("a")
        thread, when = cancel_when(server, "stall_started", stream)
        with pytest.raises(StreamCancelled):
            next(stream)  # blocks in recv until the other thread cancels
        raised_at = time.monotonic()
        thread.join(5)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    assert when and raised_at - when[0] < 0.5
    assert stream.cancelled
    with pytest.raises(StopIteration):
        next(stream)


def test_cancel_while_queued_before_headers(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([Stall(10)]) as server:
        stream = serve(clients, server, first_byte=10.0).stream_chat(MESSAGES)
        thread, when = cancel_when(server, "request_read", stream)
        with pytest.raises(StreamCancelled):
            stream.open()
        raised_at = time.monotonic()
        thread.join(5)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
        assert len(server.connections) == 1
    assert when and raised_at - when[0] < 0.5


def test_cancel_before_open_never_connects(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer(chat_stream(["x"])) as server:
        stream = serve(clients, server).stream_chat(MESSAGES)
        stream.cancel()
        with pytest.raises(StreamCancelled):
            next(stream)
        assert server.connections == []


def test_cancel_interrupts_retry_backoff(clients: list[LlamaCppClient]) -> None:
    loading = llama_error(503, "Loading model", "unavailable_error")
    with ScriptedSSEServer([loading]) as server:
        stream = serve(clients, server, attempts=3, backoff=10.0).stream_chat(MESSAGES)
        # The first 503 was read and its connection closed: the client is now backing off.
        thread, when = cancel_when(server, "finished", stream)
        with pytest.raises(StreamCancelled, match="retry"):
            stream.open()
        raised_at = time.monotonic()
        thread.join(5)
        assert len(server.connections) == 1
    assert when and raised_at - when[0] < 0.5


# --------------------------------------------------------------------------- non-streamed calls

CHAT_ANSWER = {
    "choices": [{"finish_reason": "tool_calls", "index": 0, "message": {
        "role": "assistant", "content": None, "reasoning_content": "hmm",
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]}}],
    "usage": {"completion_tokens": 5, "prompt_tokens": 7, "total_tokens": 12},
    "timings": {"predicted_n": 5},
}


def test_chat_non_streamed(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([Respond(200, CHAT_ANSWER)]) as server:
        gen = serve(clients, server).chat(MESSAGES, tools=[{"type": "function"}],
                                          tool_choice="auto")
        body = server.connection(0).json()
    assert gen.content is None
    assert gen.tool_calls == CHAT_ANSWER["choices"][0]["message"]["tool_calls"]  # type: ignore[index]
    assert gen.finish_reason == "tool_calls"
    assert gen.reasoning == "hmm"
    assert gen.usage is not None
    assert (gen.usage.prompt_tokens, gen.usage.completion_tokens) == (7, 5)
    assert gen.timings == {"predicted_n": 5}
    assert body["stream"] is False and "stream_options" not in body
    assert body["tool_choice"] == "auto"


def test_completion_non_streamed(clients: list[LlamaCppClient]) -> None:
    answer = {"choices": [{"text": "there", "index": 0, "finish_reason": "stop"}]}
    with ScriptedSSEServer([Respond(200, answer)]) as server:
        gen = serve(clients, server).completion("hi", max_tokens=4)
        assert server.connection(0).request_line.startswith("POST /v1/completions ")
    assert (gen.content, gen.finish_reason, gen.usage) == ("there", "stop", None)


def test_chat_http_error(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([llama_error(400, "bad", "invalid_request_error")]) as server:
        with pytest.raises(BackendHTTPError) as info:
            serve(clients, server, attempts=3).chat(MESSAGES)
        assert len(server.connections) == 1
    assert info.value.error_type == "invalid_request_error"


def test_chat_stall_is_first_byte_timeout_on_non_streamed_limit(
        clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([Stall(10)]) as server:
        client = serve(clients, server, first_byte=5.0, non_streamed=0.4)
        with pytest.raises(FirstByteTimeout, match=r"non_streamed=0\.4 s"):
            client.chat(MESSAGES)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)


def test_chat_cancelled_through_token(clients: list[LlamaCppClient]) -> None:
    token = CancelToken()
    with ScriptedSSEServer([Stall(10)]) as server:
        client = serve(clients, server, non_streamed=10.0)

        def cancel_later() -> None:
            if server.connection(0).request_read.wait(5):
                token.cancel()

        thread = threading.Thread(target=cancel_later)
        thread.start()
        with pytest.raises(StreamCancelled):
            client.chat(MESSAGES, cancel_token=token)
        thread.join(5)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)


# --------------------------------------------------------------------------- server state


def test_health_ok_loading_and_unreachable(clients: list[LlamaCppClient]) -> None:
    loading = llama_error(503, "Loading model", "unavailable_error")
    with ScriptedSSEServer([[Respond(200, {"status": "ok"})], [loading]]) as server:
        client = serve(clients, server, attempts=3)
        ok = client.health()
        not_yet = client.health()
    assert (ok.ok, ok.status, ok.http_status) == (True, "ok", 200)
    assert (not_yet.ok, not_yet.status, not_yet.http_status) == (False, "Loading model", 503)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        gone = make_client(f"http://127.0.0.1:{holder.getsockname()[1]}", attempts=3)
        clients.append(gone)
        # twice, not the client's 3 attempts: a probe only rules out a stale connection
        with pytest.raises(BackendUnavailable, match="attempt 2/2"):
            gone.health()


def test_props_slots_models(clients: list[LlamaCppClient]) -> None:
    props = {"total_slots": 2, "model_alias": "", "model_path": "/m/gemma.gguf",
             "default_generation_settings": {"n_ctx": 2048, "params": {}},
             "chat_template_caps": {"supports_tools": False}}
    slots = [{"id": 0, "is_processing": False}, {"id": 1, "is_processing": True}]
    models = {"object": "list", "data": [{"id": "gemma", "object": "model"}]}
    scripts = [[Respond(200, props)], [Respond(200, slots)], [Respond(200, models)]]
    with ScriptedSSEServer(scripts) as server:
        client = serve(clients, server)
        got = client.props()
        assert client.slots() == slots
        assert client.models() == ["gemma"]
    assert (got.total_slots, got.model, got.n_ctx) == (2, "/m/gemma.gguf", 2048)
    assert got.chat_template_caps == {"supports_tools": False}


def test_slots_endpoint_disabled_is_http_error(clients: list[LlamaCppClient]) -> None:
    disabled = llama_error(501, "This server does not support slots endpoint.",
                           "not_supported_error")
    with ScriptedSSEServer([disabled]) as server, pytest.raises(BackendHTTPError) as info:
        serve(clients, server).slots()
    assert info.value.status == 501


def test_bad_base_url_is_rejected() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        LlamaCppClient("localhost:8080")


def test_error_payload_helpers_are_valid_json() -> None:
    # Guards the scripted server itself: a broken helper would make other tests vacuous.
    assert json.loads(event(usage_chunk())[6:]) == usage_chunk()
