"""Every PUBLISH a small device receives fits its ``max_packet`` (docs/protocol.md, *Message size*).

A device with Arduino PubSubClient's default 256-byte buffer, a 32-character client name
and 32-character ids, on a raw socket that counts each packet's bytes as they arrive
(not a client library's accounting), over MQTT 3.1.1 and 5 (with Correlation Data):
streamed, non-streamed, session, queued (heartbeats), cancelled and failed requests
against the real bridge, Mosquitto and llama.cpp. No packet exceeds 256 bytes, the sizes
are exactly what :func:`bridge.protocol.packet.packet_bytes` says, and the text is exactly
llama-server's own (recorded between bridge and llama-server by a tap).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.protocol.messages import TERMINAL_TYPES
from bridge.protocol.packet import packet_bytes, reply_properties_bytes
from tests.support.bridge_proc import running_bridge
from tests.support.processes import MosquittoProcess
from tests.support.prompts import SEED
from tests.support.raw_mqtt import Publish, RawDevice
from tests.support.tap import Exchange, HttpTap
from tests.support.waiting import REPLY_TIMEOUT

MAX_PACKET = 256  # Arduino PubSubClient's default buffer, for the whole packet
CLIENT = "d" * 32
CORRELATION = b"c" * 16
COLOURS = '{}: List five colours, with quotes "like" this.'  # escapes in the text


@dataclass(frozen=True)
class Setup:
    version: int  # the device's MQTT version: 4 is 3.1.1
    bridge_protocol: str
    correlation: bytes | None


SETUPS = [Setup(4, "3.1.1", None), Setup(5, "5", CORRELATION)]


def rid(name: str) -> str:
    """A 32-character request id."""
    return name.ljust(32, "x")


class Device:
    """The raw device, its bridge and the tap, and what one request got."""

    def __init__(self, raw: RawDevice, tap: HttpTap, setup: Setup) -> None:
        self.raw, self.tap, self.setup = raw, tap, setup

    def ask(self, request_id: str, **fields: Any) -> None:
        body = {"id": request_id, "max_packet": MAX_PACKET, "max_tokens": 40,
                "temperature": 0, "seed": SEED, **fields}
        self.raw.publish(f"llm/request/{CLIENT}", json.dumps(body).encode(),
                         correlation_data=self.setup.correlation)

    def messages(self, request_id: str) -> list[dict[str, Any]]:
        return [json.loads(p.payload) for p in self.raw.on_topic(self.topic(request_id))]

    def topic(self, request_id: str) -> str:
        return f"llm/reply/{CLIENT}/{request_id}"

    def answer(self, request_id: str) -> list[dict[str, Any]]:
        """Wait for the request's terminal message; its messages in seq order."""
        topic = self.topic(request_id)

        def ended(publishes: list[Publish]) -> bool:
            return any(p.topic == topic and json.loads(p.payload)["type"] in TERMINAL_TYPES
                       for p in publishes)

        assert self.raw.wait_for(ended, REPLY_TIMEOUT), self.messages(request_id)
        msgs = self.messages(request_id)
        assert [m["seq"] for m in msgs] == list(range(len(msgs))), msgs
        assert [m["type"] in TERMINAL_TYPES for m in msgs].count(True) == 1, msgs
        return msgs

    def generation(self, marker: str) -> Exchange:
        """llama-server's own answer to the request whose last message contains ``marker``
        (the one that got to its end: a call the bridge retried has an earlier, cut one)."""
        found = [g for g in self.tap.generations()
                 if marker in json.dumps(g.json()["messages"][-1], ensure_ascii=False)
                 and g.finished]
        assert len(found) == 1, [(g.body, g.response[-200:]) for g in self.tap.generations()]
        return found[0]


@pytest.fixture(params=SETUPS, ids=["mqtt3.1.1", "mqtt5"])
def device(request: pytest.FixtureRequest, mosquitto: MosquittoProcess,
           llama_server: str) -> Iterator[Device]:
    setup: Setup = request.param
    with HttpTap(llama_server) as tap, \
            running_bridge(mosquitto.host, mosquitto.port, [tap.url],
                           protocol=setup.bridge_protocol, max_concurrent=1, heartbeat_s=0.2,
                           max_tokens_cap=200):
        raw = RawDevice(mosquitto.host, mosquitto.port, f"{CLIENT}-raw", version=setup.version)
        try:
            raw.subscribe(f"llm/reply/{CLIENT}/+", qos=1)
            yield Device(raw, tap, setup)
        finally:
            check_every_packet(raw, setup)
            raw.close()


def check_every_packet(raw: RawDevice, setup: Setup) -> None:
    """No PUBLISH exceeds MAX_PACKET, and each is exactly the size the bridge counted."""
    assert raw.publishes
    for p in raw.publishes:
        assert p.size <= MAX_PACKET, (p.size, p.payload)
        expected = packet_bytes(p.topic, len(p.payload), setup.correlation)
        if setup.version == 4:  # no property section at all in MQTT 3.1.1
            expected -= reply_properties_bytes(setup.correlation)
        else:
            assert CORRELATION in p.properties
        assert p.size == expected, (p.size, expected, p.properties)


def chunk_text(msgs: list[dict[str, Any]]) -> str:
    return "".join(m.get("text", "") for m in msgs if m["type"] == "chunk")


def test_streamed_non_streamed_and_session_answers_fit_and_are_llama_servers_own(
        device: Device) -> None:
    streamed = rid("streamed")
    device.ask(streamed, messages=[{"role": "user", "content": COLOURS.format("streamed")}])
    msgs = device.answer(streamed)
    assert msgs[-1]["type"] == "done", msgs[-1]
    text = chunk_text(msgs)
    assert text == device.generation("streamed: List").sse_text()
    assert sum(m["type"] == "chunk" for m in msgs) > 2
    # the whole done (usage and timings) is about 300 bytes here: fields had to go
    assert "timings" not in msgs[-1] or len(msgs[-1]["timings"]) < 4, msgs[-1]
    assert "finish_reason" in msgs[-1]

    whole = rid("whole")
    device.ask(whole, stream=False,
               messages=[{"role": "user", "content": COLOURS.format("whole")}])
    msgs = device.answer(whole)
    assert msgs[-1]["type"] == "reply" and msgs[-1]["finish_reason"], msgs[-1]
    own = json.loads(device.generation("whole: List").response)["choices"][0]["message"]
    assert chunk_text(msgs) + msgs[-1].get("content", "") == own["content"]

    session = "s" * 32
    for turn, prompt in enumerate(["turn one: My name is Ada.", "turn two: What is my name?"]):
        request_id = rid(f"turn{turn}")
        device.ask(request_id, session=session, messages=[{"role": "user", "content": prompt}])
        msgs = device.answer(request_id)
        assert msgs[-1]["type"] == "done", msgs[-1]
        assert chunk_text(msgs) == device.generation(prompt).sse_text()
    history = device.generation("turn two").json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]


def test_queued_cancelled_and_failed_requests_fit(device: Device) -> None:
    # One worker: the second request waits and gets heartbeats meanwhile.
    running, queued = rid("running"), rid("queued")
    device.ask(running, max_tokens=200,
               messages=[{"role": "user", "content": "running: Count to one hundred."}])
    device.ask(queued, messages=[{"role": "user", "content": "queued: Say hello."}])
    assert device.raw.wait_for(lambda _: any(m["type"] == "chunk"
                                             for m in device.messages(running)), REPLY_TIMEOUT)
    assert device.raw.wait_for(lambda _: any(m["type"] == "progress"
                                             for m in device.messages(queued)), REPLY_TIMEOUT)
    device.raw.publish(f"llm/cancel/{CLIENT}", json.dumps({"id": running}).encode())
    cancelled = device.answer(running)
    assert cancelled[-1]["type"] == "done" and cancelled[-1]["finish_reason"] == "cancelled"
    waited = device.answer(queued)
    assert waited[0]["type"] == "start" and waited[-1]["type"] == "done"
    assert chunk_text(waited) == device.generation("queued: Say").sse_text()

    # Refused at intake with a long message, and refused by llama-server itself.
    invalid = rid("invalid")
    device.ask(invalid, temperature=99, messages=[{"role": "user", "content": "x"}])
    (error,) = device.answer(invalid)
    assert error["code"] == "bad_request" and error["retryable"] is False
    # cut to fit, and still naming the field
    assert error["message"].startswith("temperature") and len(error["message"]) < 40, error

    broken = rid("broken")
    device.ask(broken, messages=[
        {"role": "user", "content": "broken: hi"},
        {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f",
                                                                      "arguments": "{}"}}]},
        {"role": "user", "content": "and?"}])
    failed = device.answer(broken)
    assert failed[-1]["type"] == "error" and failed[-1]["code"] == "backend_error", failed

    # Too small for this topic: refused, within the packet it names as too small.
    tiny = rid("tiny")
    least = packet_bytes(device.topic(tiny), 133, device.setup.correlation)
    device.ask(tiny, max_packet=least - 1, messages=[{"role": "user", "content": "x"}])
    (refusal,) = device.answer(tiny)
    assert refusal["code"] == "bad_request" and refusal["message"] == f"max_packet>={least}"
    sizes = [p.size for p in device.raw.on_topic(device.topic(tiny))]
    assert sizes[0] <= least - 1
