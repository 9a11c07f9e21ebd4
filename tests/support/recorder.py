"""A ``#`` subscriber that records everything published on a broker, for assertions.

Tests use it to check the wire contract from the outside: sizes, UTF-8 JSON,
contiguous ``seq``, one terminal message, and that nothing is published outside
the topics a request may use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.wire import TERMINAL_TYPES, decode_reply


@dataclass(frozen=True)
class Recorded:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None
    content_type: str | None


class Recorder:
    """Subscribes to ``#`` (QoS 1) and keeps every message, in arrival order.

    Args:
        host, port: the broker.
        v5: connect with MQTT 5 (to see properties).
        topic_filter: what to record.
    """

    def __init__(self, host: str, port: int, *, v5: bool = False, topic_filter: str = "#",
                 username: str | None = None, password: str | None = None) -> None:
        self.messages: list[Recorded] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=f"recorder-{time.monotonic_ns() % 10**9}",
                                   protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        if username:
            self._client.username_pw_set(username, password)
        self._filter = topic_filter
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._ready.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        if not self._ready.wait(10):
            self.close()
            raise TimeoutError("recorder could not subscribe within 10 s")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(self._filter, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        rec = Recorded(msg.topic, bytes(msg.payload), bool(msg.retain),
                       getattr(props, "CorrelationData", None),
                       getattr(props, "ContentType", None))
        with self._cond:
            self.messages.append(rec)
            self._cond.notify_all()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def wait_for(self, predicate: Callable[[list[Recorded]], bool], timeout: float) -> bool:
        """Wait until ``predicate(messages)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def on_topic(self, topic: str) -> list[Recorded]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_terminal(self, topic: str, timeout: float) -> list[Any]:
        """Wait for a terminal message on ``topic``; return its decoded messages by seq.

        Raises:
            AssertionError: no terminal message within ``timeout``.
        """
        def ended(msgs: list[Recorded]) -> bool:
            return any(m.topic == topic and decode_reply(m.payload).type in TERMINAL_TYPES
                       for m in msgs)

        assert self.wait_for(ended, timeout), f"no terminal message on {topic} in {timeout} s"
        return [decode_reply(m.payload) for m in self.on_topic(topic)]


def check_reply_stream(messages: list[Any]) -> None:
    """Assert the SPEC §6 invariants of one request's messages (as received, in order)."""
    assert messages, "no messages"
    seqs = [m.seq for m in messages]
    assert seqs == list(range(len(messages))), f"seq not contiguous from 0: {seqs}"
    terminals = [m for m in messages if m.type in TERMINAL_TYPES]
    assert len(terminals) == 1, f"expected one terminal message, got {terminals}"
    assert messages[-1].type in TERMINAL_TYPES, "something followed the terminal message"
    assert len({m.id for m in messages}) == 1, "messages of one topic carry different ids"


def text_of(messages: list[Any]) -> str:
    return "".join(m.text for m in messages if m.type == "chunk" and m.text is not None)
