"""``ReplyChannel`` tells its caller when buffered text has a new flush deadline, once per
coalescing period: the service then wakes the ticker for it (and not for every token).

With the real link against a real Mosquitto; what the subscriber receives is the
text in order, in chunks with contiguous ``seq``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import load_config
from bridge.mqtt_link import MqttLink
from bridge.reply import ReplyChannel
from bridge.wire import AnyReply, ChunkMsg, decode_reply
from tests.support.processes import MosquittoProcess
from tests.support.waiting import poll_until

pytestmark = pytest.mark.timeout(60)

TOPIC = "rchan/reply/dev/r1"


@pytest.fixture
def received(mosquitto: MosquittoProcess) -> Iterator[tuple[list[AnyReply], threading.Condition]]:
    """A subscriber on ``rchan/#`` collecting decoded reply messages."""
    got: list[AnyReply] = []
    cond = threading.Condition()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with cond:
            got.append(decode_reply(msg.payload))
            cond.notify_all()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rchan-sub")
    sub.on_connect = lambda c, *_: c.subscribe("rchan/#", qos=1)
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = on_message
    sub.connect(mosquitto.host, mosquitto.port, keepalive=30)
    sub.loop_start()
    try:
        assert subscribed.wait(10), "the subscriber never subscribed"
        yield got, cond
    finally:
        sub.disconnect()
        sub.loop_stop()


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
        link: MqttLink, received: tuple[list[AnyReply], threading.Condition]) -> None:
    got, cond = received
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
    with cond:
        assert cond.wait_for(lambda: sum(len(m.text or "") for m in got
                                         if isinstance(m, ChunkMsg)) >= len(sent), 10), got
    assert [m.seq for m in got] == list(range(len(got)))
    assert "".join(m.text or "" for m in got if isinstance(m, ChunkMsg)) == sent
