"""A deferred ``start``: a request a worker runs at once gets its ``start`` (seq 0) when
its HTTP request has been sent, off the path to the first token.

Whatever happens to that request, ``start`` must still come first and exactly once:
before any other message of the request, and from the ticker if nothing else sends
it in time (llama-server slow to accept, retries). Checked here with the real link,
channel and ticker against a real Mosquitto; the end-to-end tests check every
answer's ``start`` on every broker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import load_config
from bridge.intake import Accepted
from bridge.job import Job
from bridge.mqtt_link import MqttLink
from bridge.reply import ReplyChannel
from bridge.ticker import Ticker
from bridge.wire import AnyReply, BridgeRequest, ErrorCode, Timings, decode_reply
from tests.support.processes import MosquittoProcess

pytestmark = pytest.mark.timeout(60)

TOPIC = "dstart/reply/dev/r1"


class Inbox:
    """A subscriber on ``dstart/#`` collecting decoded reply messages."""

    def __init__(self) -> None:
        self.got: list[AnyReply] = []
        self.cond = threading.Condition()

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.got.append(decode_reply(msg.payload))
            self.cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[AnyReply]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= count, timeout), self.got
            return list(self.got)


@pytest.fixture
def inbox(mosquitto: MosquittoProcess) -> Iterator[Inbox]:
    box = Inbox()
    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dstart-sub")
    sub.on_connect = lambda c, *_: c.subscribe("dstart/#", qos=1)
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = box.on_message
    sub.connect(mosquitto.host, mosquitto.port, keepalive=30)
    sub.loop_start()
    try:
        assert subscribed.wait(10), "the subscriber never subscribed"
        yield box
    finally:
        sub.disconnect()
        sub.loop_stop()


@pytest.fixture
def link(mosquitto: MosquittoProcess) -> Iterator[MqttLink]:
    cfg = load_config(mqtt={"host": mosquitto.host, "port": mosquitto.port, "qos": 1,
                            "protocol": "5"}, bridge_id="dstart")
    mqtt_link = MqttLink(cfg, lambda msg: None, will_payload=b"{}",
                         subscriptions=[cfg.topics.cancel_filter()])
    mqtt_link.start()
    try:
        yield mqtt_link
    finally:
        mqtt_link.close(b"{}")


def deferred(link: MqttLink, within_s: float) -> ReplyChannel:
    channel = ReplyChannel(link, TOPIC, "r1", correlation_data=None, chunk_bytes=256,
                           flush_s=0.0)
    with channel.lock:
        channel.defer_start_locked("the-model", within_s)
    return channel


def test_any_other_message_sends_the_start_first(link: MqttLink, inbox: Inbox) -> None:
    channel = deferred(link, within_s=3600)  # the ticker plays no part here
    channel.text("Hello")
    channel.send_start()  # already sent with the text: nothing more
    channel.done("stop", None, Timings())
    got = inbox.wait_for(3)
    assert [(m.type, m.seq) for m in got] == [("start", 0), ("chunk", 1), ("done", 2)]
    assert got[0].model_dump(include={"model", "queue"}) == {"model": "the-model", "queue": 0}
    assert channel.record is not None and len(channel.record) == 3  # replayable, start too


def test_send_start_sends_it_once(link: MqttLink, inbox: Inbox) -> None:
    channel = deferred(link, within_s=3600)
    assert channel.due() is not None  # the ticker would send it in time
    channel.send_start()
    assert [(m.type, m.seq) for m in inbox.wait_for(1)] == [("start", 0)]
    assert channel.due() is None
    channel.send_start()
    channel.error(ErrorCode.internal, "boom")
    assert [(m.type, m.seq) for m in inbox.wait_for(2)] == [("start", 0), ("error", 1)]


def test_the_ticker_sends_a_start_nobody_else_sent(link: MqttLink, inbox: Inbox) -> None:
    """Connecting to llama-server hangs: nobody calls send_start, the ticker sends it."""
    channel = deferred(link, within_s=0.05)
    acc = Accepted("dev", BridgeRequest.model_validate({"prompt": "hi"}), "r1", TOPIC, None,
                   None, time.monotonic(), 256, 16)
    job = Job(acc, channel, deadline=time.monotonic() + 3600, state="running")
    ticker = Ticker(lambda: [job], heartbeat_s=3600, periodic=lambda: None, periodic_s=3600)
    ticker.start()
    try:
        assert [(m.type, m.seq) for m in inbox.wait_for(1)] == [("start", 0)]
        assert channel.due() is None
        channel.text("late")  # the first text, long after: no second start
        assert [(m.type, m.seq) for m in inbox.wait_for(2)] == [("start", 0), ("chunk", 1)]
    finally:
        ticker.stop()
