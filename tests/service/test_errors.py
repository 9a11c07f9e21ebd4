"""Errors that tell the truth: ``retryable`` only where a retry can succeed, and the usage
of a cancelled stream.

* Every row of :data:`bridge.protocol.errors.LLAMA_ERROR_TYPES` (llama-server's error types)
  is played by a scripted llama-server, streamed and not, before the first byte and
  mid-stream; the protocol's table (docs/protocol.md) is checked against the code's.
* A request llama-server can never serve (an assistant ``tool_calls`` entry without
  ``"type"``: llama-server answers HTTP 500 ``server_error``) reaches the device as a
  non-retryable error -- through a scripted server and through the real llama.cpp.
* A cancelled stream's ``done`` reports the tokens generated before the cancel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bridge.llama.client import LlamaCppClient, StreamEnd, TextDelta
from bridge.mqtt.device import BridgeClient
from bridge.protocol.errors import LLAMA_ERROR_TYPES, BackendHTTPError, backend_retryable
from tests.support.bridge_proc import running_bridge
from tests.support.device import bridge_client
from tests.support.fake_llama import (
    Action,
    FakeLlama,
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
from tests.support.llama_client import make_client
from tests.support.processes import EmbeddedBroker
from tests.support.prompts import HI as MESSAGES
from tests.support.recorder import check_reply_stream, text_of
from tests.support.waiting import REPLY_TIMEOUT as TIMEOUT
from tests.support.waiting import poll_until

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

#: What llama-server (xllamacpp's build, checked by test_real_llama_...) answers for an
#: assistant tool call without "type": HTTP 500, type server_error.
MISSING_TYPE = ('Failed to parse messages: Missing tool call type: '
                '{"id":"c1","function":{"name":"f","arguments":"{}"}}')
UNSUPPORTED_TYPE = ('Failed to parse messages: Unsupported tool call type: '
                    '{"id":"c1","type":"x","function":{"name":"f","arguments":"{}"}}')
TOOLS_NO_TYPE = 'Failed to parse tools: Missing tool type: {"function":{"name":"f"}}; tools = []'

#: (status, error type, message, retryable for the device, connections the client makes
#: with 3 attempts). Every type of LLAMA_ERROR_TYPES is here (checked below), plus what
#: comes without a known type (a proxy, an older llama-server).
HTTP_CASES: list[tuple[int, str | None, str, bool, int]] = [
    (400, "invalid_request_error", "Invalid tool_choice: sometimes", False, 1),
    (400, "exceed_context_size_error",
     "request (5024 tokens) exceeds the available context size (2048 tokens)", False, 1),
    (401, "authentication_error", "Invalid API Key", False, 1),
    (403, "permission_error", "not allowed", False, 1),
    (404, "not_found_error", "File Not Found", False, 1),
    (501, "not_supported_error", "This server does not support embeddings.", False, 1),
    (503, "unavailable_error", "Loading model", True, 3),  # retried by the client first
    (500, "server_error", "Failed to decode the batch", True, 1),
    (500, "server_error", MISSING_TYPE, False, 1),
    (500, "server_error", UNSUPPORTED_TYPE, False, 1),
    (500, "server_error", TOOLS_NO_TYPE, False, 1),
    (502, None, "<html>Bad Gateway</html>", True, 1),
    (504, None, "Gateway Timeout", True, 1),
    (429, None, "Too Many Requests", True, 1),
    (408, None, "Request Timeout", True, 1),
    (422, None, "Unprocessable Entity", False, 1),
    (501, None, "Not Implemented", False, 1),
    (500, None, MISSING_TYPE, False, 1),  # an older server without "type": same message
    (418, "some_future_error", "teapot", False, 1),  # unknown type: by status
]

#: Errors sent as an event in the middle of a stream (status 0).
STREAM_CASES: list[tuple[str | None, str, bool]] = [
    ("server_error", "slot crashed", True),
    ("exceed_context_size_error", "context full", False),
    ("invalid_request_error", "bad grammar", False),
    (None, "something broke", True),
]


def _client(clients: list[LlamaCppClient], url: str) -> LlamaCppClient:
    client = make_client(url, first_byte=3, idle=2, request=2, non_streamed=3, attempts=3)
    clients.append(client)
    return client


def _answer(status: int, error_type: str | None, message: str) -> Respond:
    if error_type is None:
        return Respond(status, message, content_type="text/html")
    return llama_error(status, message, error_type)


def test_every_llama_error_type_has_a_case() -> None:
    assert {t for _, t, *_ in HTTP_CASES} >= set(LLAMA_ERROR_TYPES)
    for status, error_type, _, _, _ in HTTP_CASES:
        if error_type in LLAMA_ERROR_TYPES:
            assert LLAMA_ERROR_TYPES[error_type].status == status, error_type


@pytest.mark.timeout(30)
@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "no-stream"])
@pytest.mark.parametrize(("status", "error_type", "message", "retryable", "connections"),
                         HTTP_CASES)
def test_http_error_is_retryable_only_where_a_retry_can_succeed(
    clients: list[LlamaCppClient], streamed: bool, status: int, error_type: str | None,
    message: str, retryable: bool, connections: int
) -> None:
    with ScriptedSSEServer([_answer(status, error_type, message)]) as server:
        client = _client(clients, server.url)
        with pytest.raises(BackendHTTPError) as info:
            if streamed:
                client.stream_chat(MESSAGES).open()
            else:
                client.chat(MESSAGES)
        assert len(server.connections) == connections
    exc = info.value
    assert (exc.status, exc.error_type, exc.retryable) == (status, error_type, retryable)
    public = exc.public_message
    assert "127.0.0.1" not in public and "http://" not in public, public
    # a device told not to retry is told to change the request instead
    assert ("cannot succeed as sent" in public) is (not retryable), public


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("error_type", "message", "retryable"), STREAM_CASES)
def test_error_mid_stream_is_classified_by_its_type(
    clients: list[LlamaCppClient], error_type: str | None, message: str, retryable: bool
) -> None:
    error: dict[str, Any] = {"message": message, "code": 500}
    if error_type is not None:
        error["type"] = error_type
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Send(event({"error": error})),
              Stall(5)]
    with ScriptedSSEServer(script) as server:
        stream = _client(clients, server.url).stream_chat(MESSAGES)
        with pytest.raises(BackendHTTPError) as info, stream:
            for _ in stream:
                pass
    assert (info.value.status, info.value.retryable) == (0, retryable)


def test_protocol_error_table_is_the_code_table() -> None:
    """The protocol's table of llama-server's error types says what LLAMA_ERROR_TYPES says."""
    text = PROTOCOL.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| (yes|no)\b", text, re.MULTILINE)
    documented = {t: (int(s), r == "yes") for t, s, r in rows if t.endswith("_error")}
    assert documented == {t: (row.status, row.retryable) for t, row in LLAMA_ERROR_TYPES.items()}
    words = " ".join(text.split())
    for fault in ("Missing tool call type", "Unsupported tool call type",
                  "Failed to parse tools"):
        assert fault in words, fault  # the request-content 500s are named


def test_classification_without_a_message_pattern() -> None:
    # the message decides only for request-content faults; everything else by type/status
    assert backend_retryable(500, "server_error", "anything") is True
    assert backend_retryable(500, "server_error", "Failed to parse messages: x") is False
    assert backend_retryable(0, None, "Unsupported tool call type: {}") is False


# --------------------------------------------------------------------------- through the bridge


def _by_prompt(path: str, body: dict[str, Any]) -> Sequence[Action]:
    """Answers chosen by the request's last message (see the test below)."""
    messages = body.get("messages") or [{}]
    prompt = str(messages[-1].get("content") or body.get("prompt") or "")
    if prompt == "never":
        return [llama_error(500, MISSING_TYPE, "server_error")]
    if prompt == "later":
        return [llama_error(500, "Failed to decode the batch", "server_error")]
    if prompt == "too long":
        return [llama_error(400, "request (5024 tokens) exceeds the available context size "
                                 "(2048 tokens)", "exceed_context_size_error")]
    if prompt.startswith("tokens "):  # "tokens N": N token events, then nothing
        count = int(prompt.split()[1])
        return [SSEHeaders(), *[Send(event(chat_chunk(f" t{i}"))) for i in range(count)],
                Stall(30)]
    return stream_script(path)


def test_device_is_told_retryable_only_where_a_retry_can_succeed(amqtt: EmbeddedBroker) -> None:
    with FakeLlama(_by_prompt) as llama, \
            running_bridge(amqtt.host, amqtt.port, [llama.url], protocol="3.1.1") as bridge, \
            bridge_client(amqtt, "dev-retry", protocol="3.1.1") as dev:
        ends: dict[str, Any] = {}
        for prompt in ("never", "later", "too long"):
            msgs = list(dev.ask({"messages": [{"role": "user", "content": prompt}]},
                                idle_timeout=TIMEOUT))
            check_reply_stream(msgs)
            ends[prompt] = msgs[-1]
        # the client retried none of them (only "still loading" is retried at once)
        assert len(llama.generations) == 3
    never, later, too_long = ends["never"], ends["later"], ends["too long"]
    assert (never.type, never.code, never.retryable, never.backend_type) == \
        ("error", "backend_error", False, "server_error"), never
    assert "Missing tool call type" in never.message
    assert "cannot succeed as sent" in never.message
    assert (later.code, later.retryable) == ("backend_error", True), later
    assert (too_long.code, too_long.retryable, too_long.backend_type) == \
        ("backend_error", False, "exceed_context_size_error"), too_long
    for end in ends.values():
        assert llama.url not in end.message and "127.0.0.1" not in end.message
    # Counted once the broker acknowledged each terminal message: soon after it arrived.
    assert poll_until(lambda: bridge.stats["errors"], lambda n: n == 3, TIMEOUT) == 3


def test_real_llama_tool_call_without_type_is_not_retryable(
    amqtt: EmbeddedBroker, llama_server: str
) -> None:
    """The issue's case against the real llama.cpp: llama-server answers an assistant
    ``tool_calls`` entry without ``"type"`` with HTTP 500 ``server_error`` every time."""
    call = {"id": "c1", "function": {"name": "get_time", "arguments": "{}"}}
    request = {"messages": [{"role": "user", "content": "What time is it?"},
                            {"role": "assistant", "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": "c1", "content": "12:00"}],
               "max_tokens": 8}
    with running_bridge(amqtt.host, amqtt.port, [llama_server], protocol="3.1.1"), \
            bridge_client(amqtt, "dev-tool-type", protocol="3.1.1") as dev:
        for attempt in range(2):  # a retry fails the same way: the first answer was right
            msgs = list(dev.ask({**request, "id": f"tt-{attempt}"}, idle_timeout=TIMEOUT))
            check_reply_stream(msgs)
            end = msgs[-1]
            assert [m.type for m in msgs if m.type != "progress"] == ["start", "error"], msgs
            assert (end.code, end.retryable, end.backend_type) == \
                ("backend_error", False, "server_error"), end
            assert "Missing tool call type" in end.message, end.message
            assert "127.0.0.1" not in end.message and "http://" not in end.message


def test_rate_limited_and_busy_are_retryable(amqtt: EmbeddedBroker) -> None:
    """The bridge's own refusals that pass with time say so (``rate_limited`` used to
    come with ``retry_after_ms`` but ``retryable: false``)."""
    with FakeLlama(lambda path, body: [Stall(30)], slots=1) as llama, \
            running_bridge(amqtt.host, amqtt.port, [llama.url], protocol="3.1.1",
                           client_max_inflight=1, queue_size=1) as bridge, \
            bridge_client(amqtt, "dev-limited", protocol="3.1.1") as dev, \
            bridge_client(amqtt, "dev-other", protocol="3.1.1") as other, \
            bridge_client(amqtt, "dev-third", protocol="3.1.1") as third:
        running = dev.send({"prompt": "x"})
        llama.wait_generations(1, 30)
        limited = list(dev.ask({"prompt": "y"}, idle_timeout=TIMEOUT))
        queued = other.send({"prompt": "z"})
        busy = list(third.ask({"prompt": "w"}, idle_timeout=TIMEOUT))
        dev.cancel(running)
        other.cancel(queued)
        assert bridge.stats["rejected"] == 2
    for msgs, code in ((limited, "rate_limited"), (busy, "busy")):
        assert len(msgs) == 1, msgs
        end = msgs[0]
        assert (end.type, end.code, end.retryable) == ("error", code, True), end
        assert end.retry_after_ms is not None and end.retry_after_ms > 0


# --------------------------------------------------------------------------- cancelled usage


def _cancel_after_chunks(dev: BridgeClient, rid: str, count: int) -> list[Any]:
    """Read ``rid``'s replies, cancel it once ``count`` chunks arrived, read to the end."""
    seen: list[Any] = []
    cancelled = False
    for msg in dev.replies(rid, idle_timeout=TIMEOUT):
        seen.append(msg)
        if not cancelled and sum(m.type == "chunk" for m in seen) >= count:
            dev.cancel(rid)
            cancelled = True
    assert cancelled, f"the request ended before {count} chunks: {seen[-1]}"
    return seen


def test_cancelled_done_counts_the_tokens_received(amqtt: EmbeddedBroker) -> None:
    """llama-server sends usage only in a stream's last event, which a cancelled stream
    never gets: the ``done`` counts the token events that arrived (one per token)."""
    with FakeLlama(_by_prompt) as llama, \
            running_bridge(amqtt.host, amqtt.port, [llama.url], protocol="3.1.1",
                           flush_ms=0) as bridge, \
            bridge_client(amqtt, "dev-usage", protocol="3.1.1") as dev:
        rid = dev.send({"messages": [{"role": "user", "content": "tokens 37"}]})
        seen = _cancel_after_chunks(dev, rid, 37)
        assert llama.generations[0].client_closed.wait(10)
        # Counted once the broker acknowledged the `done`: soon after it arrived.
        snapshot = poll_until(bridge.metrics.snapshot,
                              lambda s: s["completion_tokens"] == 37, TIMEOUT)
    check_reply_stream(seen)
    done = seen[-1]
    assert (done.type, done.finish_reason) == ("done", "cancelled"), done
    assert done.usage.completion_tokens == 37
    assert done.usage.prompt_tokens == 0  # not known before the stream's end
    assert done.timings.tokens_per_s is not None and done.timings.tokens_per_s > 0
    assert snapshot["completion_tokens"] == 37


def test_stream_without_usage_reports_its_token_count(clients: list[LlamaCppClient]) -> None:
    """A stream that ends without llama-server's usage (an older server) is counted too."""
    from bridge.llama.stream import Stream

    texts = ["a", "b", "c", "d"]
    script = [*chat_stream(texts)[:-3], Send(event(chat_chunk(finish="stop"))),
              Send(b"data: [DONE]\n\n")]
    with ScriptedSSEServer(script) as server:
        stream: Stream = _client(clients, server.url).stream_chat(MESSAGES)
        got: list[str] = []
        with stream:
            for delta in stream:
                if isinstance(delta, TextDelta):
                    got.append(delta.text)
                elif isinstance(delta, StreamEnd):
                    assert delta.usage is None
    assert got == texts
    assert stream.usage_so_far().completion_tokens == 4


def test_real_llama_cancelled_done_counts_generated_tokens(
    amqtt: EmbeddedBroker, llama_server: str
) -> None:
    """The issue's case: a cancel after many chunks reported ``completion_tokens: 0``.
    With ``flush_ms = 0`` every token is one chunk, so the count equals the chunks."""
    with running_bridge(amqtt.host, amqtt.port, [llama_server], protocol="3.1.1",
                        max_tokens_cap=2000, flush_ms=0) as bridge, \
            bridge_client(amqtt, "dev-cancel-usage", protocol="3.1.1") as dev:
        rid = dev.send({"prompt": "Count from one to one thousand: one, two,",
                        "max_tokens": 2000})
        seen = _cancel_after_chunks(dev, rid, 40)
        assert poll_until(lambda: bridge.stats["cancelled"], lambda n: n == 1, TIMEOUT) == 1
    check_reply_stream(seen)
    done = seen[-1]
    assert (done.type, done.finish_reason) == ("done", "cancelled"), done
    chunks = [m for m in seen if m.type == "chunk"]
    assert len(chunks) >= 40 and text_of(seen)
    assert done.usage.completion_tokens == len(chunks), (done.usage, len(chunks))


def test_cancelled_before_any_token_reports_zero(amqtt: EmbeddedBroker) -> None:
    with FakeLlama(lambda path, body: [Stall(30)]) as llama, \
            running_bridge(amqtt.host, amqtt.port, [llama.url], protocol="3.1.1") as bridge, \
            bridge_client(amqtt, "dev-cancel-0", protocol="3.1.1") as dev:
        rid = dev.send({"prompt": "x"})
        llama.wait_generations(1, 30)
        dev.cancel(rid)
        msgs = list(dev.replies(rid, idle_timeout=TIMEOUT))
        assert poll_until(lambda: bridge.stats["cancelled"], lambda n: n == 1, TIMEOUT) == 1
    done = msgs[-1]
    assert (done.type, done.finish_reason) == ("done", "cancelled"), done
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (0, 0)
    assert json.loads(done.model_dump_json())["usage"] == {"prompt_tokens": 0,
                                                         "completion_tokens": 0}
