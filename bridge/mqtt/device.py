"""A device-side client: publish a request, iterate over its reply messages in ``seq`` order.

Used by ``llamacpp-mqtt-bridge ask``, the tests and the benchmarks; it is also the
reference for how a device should read replies: subscribe to the reply topic
*before* publishing the request, drop messages whose ``seq`` was already seen
(QoS 1 may deliver twice), stop at the terminal message, and resend the request with
the same id when the bridge falls silent. The protocol logic is
:class:`~bridge.mqtt.exchange.Exchange`, shared with the asyncio client.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt

from bridge.config.settings import MqttSettings
from bridge.mqtt.exchange import (
    IDLE_TIMEOUT_S,
    MAX_RESENDS,
    RESEND_AFTER_S,
    Exchange,
    Publish,
    cancel_message,
    new_client_name,
    request_message,
)
from bridge.mqtt.paho_client import (
    DEVICE_KEEPALIVE_S,
    broker_host,
    device_v5,
    new_client,
    refused,
    unreachable,
)
from bridge.protocol.errors import ReplyTimeout, SequenceError
from bridge.protocol.messages import ReplyMessage
from bridge.protocol.topics import Topics

__all__ = ["BridgeClient", "ReplyTimeout", "SequenceError"]

INBOX_SIZE = 100_000
"""Messages received and not yet read, at most (beyond it they are dropped and counted)."""
REMEMBERED_REQUESTS = 256
"""Requests sent and kept for a resend until their replies are read, at most."""


class BridgeClient:
    """Talk to a bridge over MQTT as a device would.

    Args:
        mqtt_settings: broker address, credentials, TLS and protocol.
        prefix: topic prefix of the bridge.
        client: this device's name (``{client}`` topic level and MQTT client id).
        resend_after_s: while reading replies, resend the request (same id) after this
            much silence; the bridge sends a heartbeat every ``heartbeat_s`` (5 s).
        max_resends: resends in a row without an answer in between, at most.
    """

    def __init__(self, mqtt_settings: MqttSettings, *, prefix: str = "llm",
                 client: str | None = None, resend_after_s: float = RESEND_AFTER_S,
                 max_resends: int = MAX_RESENDS) -> None:
        self.settings = mqtt_settings
        self.topics = Topics(prefix)
        self.client_name = client or new_client_name()
        self.resend_after_s = resend_after_s
        self.max_resends = max_resends
        # Without TCP_NODELAY (set by new_client) a request waits up to 40 ms for the
        # broker's delayed ACK of this device's previous packet (docs/performance.md).
        self._mqtt = new_client(mqtt_settings, self.client_name, v5=device_v5(mqtt_settings))
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=INBOX_SIZE)
        self._sent: OrderedDict[str, Publish] = OrderedDict()  # for resends
        self.resends = 0  # requests published again after silence
        self._connected = threading.Event()
        self._subacks: dict[int, threading.Event] = {}
        self._sub_lock = threading.Lock()
        self.dropped = 0  # messages dropped because the reader fell 100,000 behind
        self.undecodable = 0  # payloads on a reply topic that were not reply messages
        self._connect_error: str | None = None
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_message = self._on_message
        self._mqtt.on_subscribe = self._on_subscribe

    # ------------------------------------------------------------------ connection

    def connect(self, timeout: float = 10.0) -> BridgeClient:
        """Connect to the broker and start the network thread.

        Raises:
            ConnectionError: refused or unreachable within ``timeout``.
        """
        try:
            self._mqtt.connect(broker_host(self.settings), self.settings.port,
                               keepalive=DEVICE_KEEPALIVE_S)
        except OSError as exc:
            raise unreachable(self.settings, exc) from exc
        self._mqtt.loop_start()
        if not self._connected.wait(timeout) or self._connect_error:
            self._mqtt.loop_stop()
            raise refused(self.settings, self._connect_error or "timeout")
        return self

    def close(self) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def __enter__(self) -> BridgeClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe(self, topic: str, timeout: float = 10.0) -> None:
        """Subscribe at QoS 1 and wait for the broker's SUBACK."""
        done = threading.Event()
        with self._sub_lock:  # the SUBACK callback must find the event registered
            rc, mid = self._mqtt.subscribe(topic, qos=1)
            if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
                raise ConnectionError(f"subscribe to {topic!r} failed: {mqtt.error_string(rc)}")
            self._subacks[mid] = done
        if not done.wait(timeout):
            raise ReplyTimeout(f"no SUBACK for {topic!r} within {timeout} s")

    # ------------------------------------------------------------------ requests

    def send(self, request: dict[str, Any] | str | bytes, *, request_id: str | None = None,
             subscribe: bool = True) -> str:
        """Publish one request (QoS 1), subscribing to its reply topic first.

        Args:
            request: a JSON object (an ``id`` is added if missing), plain text, or raw bytes.
            request_id: the id for a dict request without one.
            subscribe: subscribe to ``P/reply/{client}/{id}`` before publishing.
        Returns:
            the request id (for plain text: the id the caller must learn from the reply).
        """
        message = request_message(self.topics, self.client_name, request, request_id)
        request_id = message.request_id or request_id
        if subscribe:
            target = self.topics.reply(self.client_name, request_id) if request_id else \
                self.topics.reply_namespace(self.client_name) + "+"
            self.subscribe(target)
        if message.request_id is not None:
            self._sent[message.request_id] = message
            while len(self._sent) > REMEMBERED_REQUESTS:
                self._sent.popitem(last=False)
        self._publish(message)
        return request_id or ""

    def cancel(self, request_id: str) -> None:
        """Ask the bridge to stop ``request_id`` (its answer ends ``done`` ``cancelled``)."""
        self._publish(cancel_message(self.topics, self.client_name, request_id))

    def _publish(self, message: Publish) -> None:
        self._mqtt.publish(message.topic, message.payload, qos=1).wait_for_publish(10.0)

    def replies(self, request_id: str | None = None, *,
                idle_timeout: float = IDLE_TIMEOUT_S) -> Iterator[ReplyMessage]:
        """Yield reply messages in ``seq`` order until the terminal one.

        A JSON request sent by this client is resent (same id) after ``resend_after_s``
        of silence. If the bridge then answers it anew (it had lost it), the messages
        start again with ``start`` (``seq`` 0): what came before is to be discarded.

        Args:
            request_id: only messages of this request (None: the first request seen).
            idle_timeout: give up when nothing arrives for this long, resends included.
        Raises:
            ReplyTimeout: nothing arrived for ``idle_timeout`` seconds.
            SequenceError: a ``seq`` was skipped (a message was lost).
        """
        exchange = Exchange(self.topics.reply_namespace(self.client_name),
                            self._sent.get(request_id) if request_id else None,
                            request_id=request_id, now=time.monotonic(),
                            resend_after_s=self.resend_after_s, max_resends=self.max_resends,
                            idle_timeout_s=idle_timeout)
        while True:
            try:
                topic, payload = self._inbox.get(
                    timeout=max(0.0, exchange.deadline() - time.monotonic()))
            except queue.Empty:
                if (resend := exchange.on_silence(time.monotonic())) is not None:
                    self.resends += 1
                    self._publish(resend)
                continue
            delivery = exchange.on_message(topic, payload, time.monotonic())
            self.undecodable += delivery.undecodable
            yield from delivery.messages
            if delivery.finished:
                if exchange.request_id is not None:
                    self._sent.pop(exchange.request_id, None)
                return

    def next_message(self, timeout: float) -> tuple[str, bytes] | None:
        """The next raw (topic, payload) received on any subscription, or None on timeout."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def ask(self, request: dict[str, Any] | str, *,
            idle_timeout: float = 60.0) -> Iterator[ReplyMessage]:
        """Send a request and yield its replies (see :meth:`replies`)."""
        request_id = self.send(request)
        return self.replies(request_id or None, idle_timeout=idle_timeout)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
        self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      props: Any) -> None:
        with self._sub_lock:
            event = self._subacks.pop(mid, None)
        if event is not None:
            event.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._inbox.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:  # the reader stopped reading: stay bounded, and count it
            self.dropped += 1

