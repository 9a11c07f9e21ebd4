"""A device-side client: publish a request, iterate over its reply messages in ``seq`` order.

Used by ``llamacpp-mqtt-bridge ask``, the tests and the benchmarks; it is also the
reference for how a device should read replies: subscribe to the reply topic
*before* publishing the request, drop messages whose ``seq`` was already seen
(QoS 1 may deliver twice), and stop at the terminal message.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt

from bridge.config.settings import MqttSettings
from bridge.mqtt.paho_client import broker_host, new_client
from bridge.protocol.messages import TERMINAL_TYPES, decode_reply
from bridge.protocol.topics import Topics

ReplyMessage = Any  # one of bridge.protocol.messages's reply models


class ReplyTimeout(TimeoutError):
    """No reply message arrived within the idle timeout."""


class SequenceError(Exception):
    """A reply message arrived out of order (a gap in ``seq``)."""


class BridgeClient:
    """Talk to a bridge over MQTT as a device would.

    Args:
        mqtt_settings: broker address, credentials, TLS and protocol.
        prefix: topic prefix of the bridge.
        client: this device's name (``{client}`` topic level and MQTT client id).
    """

    def __init__(self, mqtt_settings: MqttSettings, *, prefix: str = "llm",
                 client: str | None = None) -> None:
        self.settings = mqtt_settings
        self.topics = Topics(prefix)
        self.client_name = client or f"dev-{secrets.token_hex(4)}"
        # Without TCP_NODELAY (set by new_client) a request waits up to 40 ms for the
        # broker's delayed ACK of this device's previous packet (docs/performance.md).
        self._mqtt = new_client(mqtt_settings, self.client_name,
                                v5=mqtt_settings.protocol == "5")
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=100_000)
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
        host = broker_host(self.settings)
        try:
            self._mqtt.connect(host, self.settings.port, keepalive=30)
        except OSError as exc:
            raise ConnectionError(f"cannot reach MQTT broker at {host}:{self.settings.port}: "
                                  f"{exc}; is the bridge (or its broker) running?") from exc
        self._mqtt.loop_start()
        if not self._connected.wait(timeout) or self._connect_error:
            self._mqtt.loop_stop()
            raise ConnectionError(f"MQTT broker {host}:{self.settings.port} did not accept us: "
                                  f"{self._connect_error or 'timeout'}")
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
        if isinstance(request, dict):
            request = dict(request)
            request.setdefault("id", request_id or secrets.token_hex(6))
            request_id = str(request["id"])
            payload = json.dumps(request).encode()
        else:
            payload = request.encode() if isinstance(request, str) else request
        if subscribe:
            target = self.topics.reply(self.client_name, request_id) if request_id else \
                self.topics.reply_namespace(self.client_name) + "+"
            self.subscribe(target)
        info = self._mqtt.publish(self.topics.request(self.client_name), payload, qos=1)
        info.wait_for_publish(10.0)
        return request_id or ""

    def cancel(self, request_id: str) -> None:
        self._mqtt.publish(self.topics.cancel(self.client_name),
                           json.dumps({"id": request_id}), qos=1).wait_for_publish(10.0)

    def replies(self, request_id: str | None = None, *,
                idle_timeout: float = 60.0) -> Iterator[ReplyMessage]:
        """Yield reply messages in ``seq`` order until the terminal one.

        Args:
            request_id: only messages of this request (None: the first request seen).
            idle_timeout: give up when nothing arrives for this long.
        Raises:
            ReplyTimeout: nothing arrived for ``idle_timeout`` seconds.
            SequenceError: a ``seq`` was skipped (a message was lost).
        """
        expected = 0
        namespace = self.topics.reply_namespace(self.client_name)
        while True:
            try:
                topic, payload = self._inbox.get(timeout=idle_timeout)
            except queue.Empty:
                raise ReplyTimeout(f"no reply for {idle_timeout} s (request {request_id}); "
                                   "is the bridge running? see `llamacpp-mqtt-bridge status`"
                                   ) from None
            if not topic.startswith(namespace):
                continue  # amqtt delivers retained messages of other topics too freely
            try:
                msg = decode_reply(payload)
            except ValueError:
                self.undecodable += 1
                continue
            if request_id is None:
                request_id = msg.id
            if msg.id != request_id or msg.seq < expected:
                continue  # another request's message, or a QoS 1 duplicate
            if msg.seq > expected:
                raise SequenceError(f"expected seq {expected}, got {msg.seq}: messages were lost")
            expected += 1
            yield msg
            if msg.type in TERMINAL_TYPES:
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

