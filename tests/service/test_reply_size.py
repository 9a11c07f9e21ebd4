"""The size bound of the non-streamed ``reply`` (docs/protocol.md; a request with
``"stream": false`` or ``tools``): no message exceeds ``max_message_bytes``, so an
answer too big for one ``reply`` goes as ``chunk`` messages followed by a ``reply``
without ``content``.

End to end through real brokers; the long answers come from a scripted backend
(:class:`FakeLlama`, exact text of any length) and, once, from the real llama.cpp
server behind an :class:`HttpTap`, compared with what llama-server itself answered.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.protocol.messages import decode_reply
from bridge.protocol.packet import packet_bytes
from tests.support.bridge_proc import running_bridge
from tests.support.device import bridge_client
from tests.support.fake_llama import FakeLlama, answer_with
from tests.support.recorder import (
    PublishLog,
    Recorder,
    check_bridge_messages,
    check_reply_stream,
    text_of,
)
from tests.support.tap import HttpTap
from tests.support.waiting import REPLY_TIMEOUT as TIMEOUT

MAX_MESSAGE = 1024  # the smallest max_message_bytes the config accepts
SIZES: dict[str, Any] = {"max_message_bytes": MAX_MESSAGE, "max_chunk_bytes": MAX_MESSAGE}
TOOLS = [{"type": "function", "function": {
    "name": "get_time", "description": "current time",
    "parameters": {"type": "object", "properties": {}}}}]
# Multi-byte characters (2, 3 and 4 bytes) and characters JSON must escape.
PIECES = [f'Zeile "{i}": Grüße aus 東京 🌊 \\ tab\tund\nneue Zeile. ' for i in range(60)]
LONG = "".join(PIECES)


def _long_answer(body: dict[str, Any]) -> list[str]:
    return PIECES


def _check_chunked_reply(msgs: list[Any], text: str, topic_payloads: list[bytes]) -> None:
    """``msgs`` answer ``text`` as chunks + a reply without content, every one bounded."""
    check_reply_stream(msgs)
    kinds = [m.type for m in msgs if m.type != "progress"]  # heartbeats may come anywhere
    assert kinds[0] == "start" and kinds[-1] == "reply", kinds
    assert set(kinds[1:-1]) == {"chunk"} and len(kinds) > 3, kinds
    assert text_of(msgs) == text
    assert msgs[-1].content is None, "the reply repeated the content it sent as chunks"
    assert topic_payloads and max(len(p) for p in topic_payloads) <= MAX_MESSAGE


REQUESTS = {
    "stream-false": {"prompt": "Write a long text.", "stream": False},
    "tools": {"messages": [{"role": "user", "content": "Write a long text."}],
              "tools": TOOLS},
    "small-chunks": {"messages": [{"role": "user", "content": "Write a long text."}],
                     "stream": False, "chunk_bytes": 128},
}


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_long_reply_goes_as_chunks_then_reply_without_content(
    broker: Any, recorder: Recorder, published: PublishLog, kind: str
) -> None:
    request = REQUESTS[kind]
    # the precondition of the rule: this content alone does not fit in one message
    assert len(json.dumps(LONG).encode()) > MAX_MESSAGE
    with FakeLlama(answer_with(_long_answer)) as fake, \
            running_bridge(broker.host, broker.port, [fake.url], protocol=broker.protocol,
                           **SIZES) as bridge, \
            bridge_client(broker, "dev-size", published=published) as dev:
        msgs = list(dev.ask(request, idle_timeout=TIMEOUT))
        topic = f"llm/reply/dev-size/{msgs[0].id}"
        recorder.wait_terminal(topic, 30)
        # every message <= max_message_bytes, chunks <= their chunk_bytes, one QoS
        wire = check_bridge_messages(recorder, published, bridge.cfg, v5=bridge.link.is_v5)
        bodies = fake.wait_bodies(1)
    _check_chunked_reply(msgs, LONG, [p.payload for p in recorder.on_topic(topic)])
    assert len(wire[topic]) >= len(msgs)  # the recorder saw them all (QoS 1: maybe twice)
    assert msgs[-1].finish_reason == "stop"
    assert msgs[-1].usage.completion_tokens == len(PIECES)
    assert len(bodies) == 1 and not bodies[0].get("stream"), bodies  # one non-streamed call
    assert ("tools" in bodies[0]) == ("tools" in request)
    if kind == "small-chunks":
        assert all(len(p.payload) <= 128 for p in recorder.on_topic(topic)
                   if b'"type":"chunk"' in p.payload)


@pytest.mark.parametrize("broker", ["mosquitto-v5"], indirect=True)
def test_reply_that_fits_is_one_message_with_content(
    broker: Any, recorder: Recorder, published: PublishLog
) -> None:
    """The counterpart: a reply within the bound is sent as it is (no chunks)."""
    with FakeLlama() as fake, \
            running_bridge(broker.host, broker.port, [fake.url], protocol="5",
                           **SIZES) as bridge, \
            bridge_client(broker, "dev-size", published=published) as dev:
        msgs = list(dev.ask(REQUESTS["stream-false"], idle_timeout=TIMEOUT))
        recorder.wait_terminal(f"llm/reply/dev-size/{msgs[0].id}", 30)
        check_bridge_messages(recorder, published, bridge.cfg, v5=True)
    check_reply_stream(msgs)
    assert [m.type for m in msgs if m.type != "progress"] == ["start", "reply"]
    assert msgs[-1].content == "Hello from the fake."


@pytest.mark.parametrize("broker", ["mosquitto-v5"], indirect=True)
def test_reply_that_fits_only_without_its_topic_is_chunked_too(
    broker: Any, recorder: Recorder, published: PublishLog
) -> None:
    """A reply whose payload is under max_message_bytes but not with its topic added.

    The MQTT link bounds payload + topic (the broker's Maximum Packet Size counts the
    topic too), so such a reply cannot go as one message: it must be chunked like a
    bigger one, not dropped (which left the device without a terminal message).
    """
    answers = {"calibrate": "short answer"}

    def answer(body: dict[str, Any]) -> list[str]:
        return [answers[body["prompt"].split()[0]]]

    calibrate, boundary = "c" * 64, "b" * 64  # longest ids: the topic is long
    topic = f"llm/reply/dev-size/{boundary}"
    with FakeLlama(answer_with(answer)) as fake, \
            running_bridge(broker.host, broker.port, [fake.url], protocol="5",
                           **SIZES) as bridge, \
            bridge_client(broker, "dev-size", published=published) as dev:
        # The reply envelope's size (ids, usage, timings) measured on a short answer, with
        # the same id length, prompt length and token count as the real request.
        short = list(dev.ask({"id": calibrate, "prompt": "calibrate x", "stream": False},
                             idle_timeout=TIMEOUT))
        recorder.wait_terminal(f"llm/reply/dev-size/{calibrate}", 30)
        envelope = len(recorder.on_topic(f"llm/reply/dev-size/{calibrate}")[-1].payload) - \
            len(answers["calibrate"])
        # Halfway into the window (timings vary by a few bytes from request to request)
        size = MAX_MESSAGE - len(topic) // 2
        answers["boundary"] = "y" * (size - envelope)
        msgs = list(dev.ask({"id": boundary, "prompt": "boundary x", "stream": False},
                            idle_timeout=30))
        recorder.wait_terminal(topic, 30)
        check_bridge_messages(recorder, published, bridge.cfg, v5=True)
    assert short[-1].content == answers["calibrate"]
    assert MAX_MESSAGE - len(topic) < size < MAX_MESSAGE
    _check_chunked_reply(msgs, answers["boundary"], [p.payload for p in recorder.on_topic(topic)])


@pytest.mark.parametrize("broker", ["mosquitto-v5"], indirect=True)
def test_tool_calls_too_big_for_one_message_get_a_too_large_error(
    broker: Any, recorder: Recorder, published: PublishLog
) -> None:
    """``tool_calls`` cannot be chunked: when they alone exceed the bound, the device gets
    a ``too_large`` error saying what to change (not silence), and the bridge serves on."""
    huge = [{"id": "call-1", "type": "function",
             "function": {"name": "get_time", "arguments": json.dumps({"pad": "x" * 2000})}}]

    def tool_calls(body: dict[str, Any]) -> list[dict[str, Any]] | None:
        return huge if "huge" in body["messages"][-1]["content"] else None

    with FakeLlama(answer_with(tool_calls=tool_calls)) as fake, \
            running_bridge(broker.host, broker.port, [fake.url], protocol="5",
                           **SIZES) as bridge, \
            bridge_client(broker, "dev-size", published=published) as dev:
        big = list(dev.ask({"id": "huge", "tools": TOOLS, "messages": [
            {"role": "user", "content": "huge tool call"}]}, idle_timeout=TIMEOUT))
        after = list(dev.ask({"id": "small", "tools": TOOLS, "messages": [
            {"role": "user", "content": "hello"}]}, idle_timeout=TIMEOUT))
        recorder.wait_terminal("llm/reply/dev-size/small", 30)
        check_bridge_messages(recorder, published, bridge.cfg, v5=True)
        assert len(fake.wait_bodies(2)) == 2
    check_reply_stream(big)
    end = big[-1]
    assert end.type == "error" and end.code == "too_large" and not end.retryable, end
    assert "tool_calls" in end.message and "max_message_bytes" in end.message
    check_reply_stream(after)
    assert after[-1].type == "reply" and after[-1].content == "Hello from the fake."


@pytest.mark.parametrize("broker", ["mosquitto-v5"], indirect=True)
def test_long_reply_from_llama_server_matches_its_own_answer(
    broker: Any, llama_server: str, recorder: Recorder, published: PublishLog
) -> None:
    """Against the real llama.cpp server: the chunks concatenate to exactly the
    ``content`` llama-server answered for that very request (recorded by a tap)."""
    # ~5 bytes a token: 240 tokens make a reply well over 1 KiB (llama.cpp on 2 busy
    # cores makes few tokens a second, so not more)
    request = {"prompt": "Count from one to one thousand: one, two,", "stream": False,
               "max_tokens": 240, "temperature": 0, "seed": 42}
    with HttpTap(llama_server) as tap, \
            running_bridge(broker.host, broker.port, [tap.url], protocol="5",
                           max_tokens_cap=240, **SIZES) as bridge, \
            bridge_client(broker, "dev-size", published=published) as dev:
        msgs = list(dev.ask(request, idle_timeout=TIMEOUT))
        topic = f"llm/reply/dev-size/{msgs[0].id}"
        recorder.wait_terminal(topic, 30)
        check_bridge_messages(recorder, published, bridge.cfg, v5=True)
    gens = tap.generations()
    assert len(gens) == 1 and gens[0].complete, gens
    assert gens[0].json()["stream"] is False
    answer = json.loads(gens[0].response)["choices"][0]["text"]
    # the precondition: llama-server's answer does not fit in one message
    assert len(json.dumps(answer).encode()) > MAX_MESSAGE, f"answer too short: {answer!r}"
    _check_chunked_reply(msgs, answer, [p.payload for p in recorder.on_topic(topic)])
    assert msgs[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("broker", ["mosquitto-v5"], indirect=True)
def test_a_resend_with_a_smaller_max_packet_gets_an_error_not_the_larger_messages(
    broker: Any, recorder: Recorder
) -> None:
    """A resend of an answered id is sent the kept messages again, unless one of them
    exceeds the resend's ``max_packet``: then one ``bad_request`` that fits it."""
    topic = "llm/reply/dev-mp/big"
    request = {"id": "big", "prompt": "x", "stream": False, "max_packet": 2000}

    def received() -> list[bytes]:
        return [m.payload for m in recorder.on_topic(topic)]

    with FakeLlama(answer_with(lambda body: ["word "] * 200)) as fake, \
            running_bridge(broker.host, broker.port, [fake.url], protocol="5"), \
            bridge_client(broker, "dev-mp") as dev:
        dev.send(request)
        recorder.wait_terminal(topic, TIMEOUT)
        first = received()
        assert max(map(len, first)) > 600  # the premise: too big for the next max_packet
        dev.send({**request, "max_packet": 600})
        dev.send(request)  # the first max_packet again: the kept answer
        assert recorder.wait_for(lambda _: len(received()) >= 2 * len(first) + 1, TIMEOUT)
        assert len(fake.generations) == 1  # answered once
    error, *replayed = received()[len(first):]
    assert replayed == first
    message = decode_reply(error)
    assert (message.type, message.seq, message.code) == ("error", 0, "bad_request"), message
    assert "max_packet" in message.message and "new id" in message.message, message
    assert packet_bytes(topic, len(error), None) <= 600
