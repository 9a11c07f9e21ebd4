"""``ReplyChannel`` tells its caller when buffered text has a new flush deadline, once per
coalescing period: the service then wakes the ticker for it (and not for every token).

With the real link against a real Mosquitto; what the subscriber receives is the
text in order, in chunks with contiguous ``seq``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bridge.config.settings import load_config
from bridge.mqtt.link import MqttLink
from bridge.protocol.messages import ChunkMsg, decode_reply
from bridge.service.reply import ReplyChannel
from tests.support.device import Device
from tests.support.processes import MosquittoProcess
from tests.support.waiting import poll_until

pytestmark = pytest.mark.timeout(60)

TOPIC = "rchan/reply/dev/r1"


@pytest.fixture
def received(mosquitto: MosquittoProcess) -> Iterator[Device]:
    """A subscriber collecting the payloads published on ``rchan/#``."""
    with Device.bare(mosquitto.host, mosquitto.port, "rchan-sub") as device:
        device.subscribe("rchan/#")
        yield device


@pytest.fixture
def link(mosquitto: MosquittoProcess) -> Iterator[MqttLink]:
    cfg = load_config(mqtt={"host": mosquitto.host, "port": mosquitto.port, "qos": 1,
                            "protocol": "5"}, bridge_id="rchan")
    mqtt_link = MqttLink(cfg, lambda msg: None, will_payload=b"{}",
                         subscriptions=[cfg.topics.cancel_filter()])
    mqtt_link.start()
    try:
        yield mqtt_link
    finally:
        mqtt_link.close(b"{}")


def test_a_new_flush_deadline_is_reported_once_per_period(
        link: MqttLink, received: Device) -> None:
    channel = ReplyChannel(link, TOPIC, "r1", correlation_data=None, chunk_bytes=256,
                           flush_s=0.02)
    assert channel.text("first") is False  # published at once: nothing buffered
    assert channel.text(" a") is True  # buffered: a new deadline
    due = channel.due()
    assert due is not None
    assert channel.text(" b") is False and channel.due() == due  # same period
    assert poll_until(time.monotonic, lambda now: now >= due, 5, 0.005) >= due
    channel.poll()  # the ticker's flush
    assert channel.due() is None
    assert channel.text(" c") is True  # a new period
    assert channel.text("x" * 300) is True  # overflow: flushed, the rest buffered anew
    channel.poll()  # not due yet: nothing happens
    with channel.lock:
        channel._flush_all()  # what the terminal message does first
    sent = "first a b c" + "x" * 300

    def text() -> str:
        return "".join(m.text or "" for m in map(decode_reply, received.payloads())
                       if isinstance(m, ChunkMsg))

    assert received.wait(lambda d: len(text()) >= len(sent), 10), received.payloads()
    got = [decode_reply(p) for p in received.payloads()]
    assert [m.seq for m in got] == list(range(len(got)))
    assert text() == sent
