"""A paho subscriber that collects the payloads on a topic filter, for tests that check
what a component published (the link, a reply channel) without a whole bridge."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


@contextlib.contextmanager
def collecting_subscriber(host: str, port: int, topic_filter: str, client_id: str
                          ) -> Iterator[tuple[list[bytes], threading.Condition]]:
    """Subscribe (QoS 1) and yield ``(payloads, condition)`` once the SUBACK is in.

    The condition is notified after each payload is appended: wait on it with
    ``cond.wait_for(...)`` while holding it.
    """
    got: list[bytes] = []
    cond = threading.Condition()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with cond:
            got.append(msg.payload)
            cond.notify_all()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    sub.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = on_message
    sub.connect(host, port, keepalive=30)
    sub.loop_start()
    try:
        assert subscribed.wait(10), f"{client_id} never subscribed to {topic_filter}"
        yield got, cond
    finally:
        sub.disconnect()
        sub.loop_stop()
