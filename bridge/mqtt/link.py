"""The bridge's MQTT connection: connect, subscribe, flow-controlled publish.

One paho 2 client in its own network thread. What this module guarantees:

* MQTT 5 when the broker accepts it, else 3.1.1 (amqtt speaks only 3.1.1);
* persistent session (replies queued during a broker outage are delivered after it)
  and re-subscription on every reconnect;
* a retained status topic with a Last Will that marks the bridge offline;
* publishes never exceed the broker's Maximum Packet Size (paho 2.2 loops
  reconnecting on an oversized publish) nor ``max_message_bytes``;
* flow control: at most ``max_queued`` replies are waiting for the broker; a
  worker that publishes more blocks, so a slow broker slows generation down
  instead of growing memory. At QoS 1 and 2 a message waits until the broker
  acknowledged it (``on_publish``); at QoS 0 until paho wrote it to the socket,
  seen through its ``MQTTMessageInfo`` -- paho's ``on_publish`` for QoS 0 builds a
  ``ReasonCode`` and a ``Properties`` per message, a quarter of the bridge's CPU in
  per-token mode, and is not called for messages a reconnect discards.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.config.settings import DeploymentConfig
from bridge.mqtt.refusals import (
    RefusalDetector,
    RefusedStreams,
    StreamKey,
    delivered,
    drop_messages,
)
from bridge.protocol.packet import PACKET_OVERHEAD, payload_room, topic_bytes

log = logging.getLogger("bridge.mqtt")

JSON_CONTENT_TYPE = "application/json"

_QOS0_POLL_S = 0.005  # how often a publisher waiting for room looks again, at QoS 0
_V5_PROBE_S = 3.0  # how long `protocol = "auto"` waits for a v5 CONNACK before trying 3.1.1

# Session expiry of a bridge in a shared group when none is configured. The broker keeps
# giving a dead member its share of requests until its session ends (Mosquitto 2.0 does
# not skip disconnected members), so a group member keeps its session only briefly.
SHARED_SESSION_EXPIRY_S = 30


class _PackedProperties(Properties):  # type: ignore[misc]  # paho is untyped
    """MQTT 5 PUBLISH properties, packed once.

    paho calls ``pack()`` on every send, and ``Properties.pack`` walks every known
    property name (~20 µs); building a ``Properties`` costs as much again. A reply
    stream sends the same properties on every message, so they are built and packed
    once (:func:`_publish_props`) and never changed afterwards.
    """

    _packed: bytes

    def __init__(self, correlation_data: bytes | None) -> None:
        super().__init__(PacketTypes.PUBLISH)
        self.ContentType = JSON_CONTENT_TYPE
        if correlation_data is not None:
            self.CorrelationData = correlation_data
        # object.__setattr__: Properties.__setattr__ accepts only MQTT property names.
        object.__setattr__(self, "_packed", Properties.pack(self))

    def pack(self) -> bytes:
        return self._packed


def no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send every packet at once (paho leaves Nagle's algorithm on).

    With Nagle, a small packet waits for the ACK of the previous one, and the broker's
    kernel delays that ACK by up to 40 ms when it has nothing to send back: the PUBACK
    of a request followed by its ``start`` cost 40 ms, as did a chunk after a chunk.
    """
    with contextlib.suppress(OSError, AttributeError):  # not TCP (e.g. a unix socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@functools.lru_cache(maxsize=1024)
def _publish_props(correlation_data: bytes | None) -> _PackedProperties:
    """The (shared, immutable) properties of a reply message with this Correlation Data."""
    return _PackedProperties(correlation_data)


class PublishError(Exception):
    """A message could not be handed to the broker (too large, or the link is closing)."""


class StreamRefused(PublishError):
    """The broker closed the connection on a message of this reply stream: nothing more
    is published on it (see :mod:`bridge.mqtt.refusals`)."""


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message received on a subscribed topic.

    Attributes:
        topic: the topic it arrived on.
        payload: raw bytes, not yet decoded or trusted.
        response_topic: MQTT 5 Response Topic, if set.
        correlation_data: MQTT 5 Correlation Data, echoed on every reply.
        expires_at: ``time.monotonic()`` when its Message Expiry Interval ends, if set.
        received_at: ``time.monotonic()`` at arrival.
    """

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    expires_at: float | None
    received_at: float


class MqttLink:
    """The bridge's connection to the broker.

    Args:
        config: the deployment configuration (``[mqtt]`` and topics).
        on_message: called in paho's network thread for each inbound message;
            must not block on publishing (hand the work to another thread).
        will_payload: retained payload the broker publishes on the status topic
            if the bridge disappears.
    """

    def __init__(
        self,
        config: DeploymentConfig,
        on_message: Callable[[Inbound], None],
        *,
        will_payload: bytes,
        subscriptions: list[str],
        on_connected: Callable[[], None] | None = None,
        on_refused: Callable[[StreamKey], None] | None = None,
    ) -> None:
        self._cfg = config
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_refused = on_refused
        self._refusals = RefusalDetector()
        self.refused = RefusedStreams()
        self._refused_keys = self.refused.keys  # checked on every publish
        self._to_drop: list[tuple[StreamKey, list[int]]] = []  # paho's thread only
        self._will = will_payload
        self._subscriptions = subscriptions
        self._shared = any(t.startswith("$share/") for t in subscriptions)
        self._status_topic = config.topics.status(config.bridge_id)
        # Messages handed to paho and not yet acknowledged (QoS 1, 2) ...
        self._outstanding = 0
        # ... or not yet written to the socket (QoS 0: oldest first, as paho writes them).
        self._unwritten: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        self._qos0 = config.mqtt.qos == 0
        self._window = threading.Condition()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._sub_failure: str | None = None
        self._first_connack = threading.Event()
        self._connack_failure: str | None = None
        self._closing = False
        self._no_wait = False  # set while stopping: never wait for the window again
        self.is_v5 = False
        self.broker_max_packet: int | None = None
        self.published = 0
        self.published_bytes = 0  # both counted under _window: workers publish concurrently
        self._unsubscribed = threading.Event()
        self._client: mqtt.Client | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect (trying MQTT 5 first when ``protocol = "auto"``) and start the network thread.

        Raises:
            ConnectionError: the broker refused or could not be reached within
                ``connect_timeout_s`` (the message names host, port and reason).
        """
        wanted = self._cfg.mqtt.protocol
        if wanted == "3.1.1":
            self._connect(v5=False, timeout=self._cfg.mqtt.connect_timeout_s)
            return
        # A v3-only broker may refuse a v5 CONNECT, close the connection, or (amqtt 0.12
        # with a Will) wait forever for bytes it mis-parsed: probe with a short timeout.
        probe = self._cfg.mqtt.connect_timeout_s if wanted == "5" else \
            min(self._cfg.mqtt.connect_timeout_s, _V5_PROBE_S)
        try:
            self._connect(v5=True, timeout=probe)
            return
        except ConnectionError as exc:
            if wanted == "5":
                raise
            log.info("MQTT 5 connection failed (%s); trying MQTT 3.1.1", exc)
        self._connect(v5=False, timeout=self._cfg.mqtt.connect_timeout_s)

    def _connect(self, *, v5: bool, timeout: float) -> None:
        m = self._cfg.mqtt
        host = m.host or "127.0.0.1"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._cfg.mqtt_client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # 3.1.1 cannot bound a session's life: in a shared group a persistent session
            # would keep swallowing requests after a crash (persistent_client_expiration).
            clean_session=None if v5 else self.shared,
        )
        # paho's own queue is unbounded here because _window bounds it for us.
        client.max_inflight_messages_set(m.max_inflight)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(int(max(1, m.reconnect_min_s)), int(m.reconnect_max_s))
        if m.username:
            secret = m.password.get_secret_value() if m.password else None
            client.username_pw_set(m.username, secret)
        if m.tls:
            client.tls_set(
                ca_certs=str(m.ca_file) if m.ca_file else None,
                certfile=str(m.cert_file) if m.cert_file else None,
                keyfile=str(m.key_file) if m.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        will_props = None
        if v5:
            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.ContentType = JSON_CONTENT_TYPE
            if self.shared:  # "offline" once the broker stops routing requests to us
                will_props.WillDelayInterval = self.session_expiry_s
        client.will_set(self._status_topic, self._will, qos=1, retain=True, properties=will_props)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        if not self._qos0:
            client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_socket_open = no_delay

        self._first_connack.clear()
        self._connack_failure = None
        self.is_v5 = v5
        self._client = client
        extra: dict[str, Any] = {}
        if v5:  # 3.1.1 gets persistence from clean_session=False above (unless shared)
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            extra = {"clean_start": False, "properties": props}
        try:
            client.connect(host, m.port, keepalive=m.keepalive_s, **extra)
        except OSError as exc:
            raise ConnectionError(
                f"cannot reach MQTT broker at {host}:{m.port}: {exc}; "
                "check --mqtt-host/--mqtt-port and that the broker runs"
            ) from exc
        client.loop_start()
        if not self._first_connack.wait(timeout) or self._connack_failure:
            reason = self._connack_failure or f"no CONNACK within {timeout:g} s"
            client.loop_stop()
            client.disconnect()
            raise ConnectionError(f"MQTT broker {host}:{m.port} refused the bridge: {reason}")
        # Only subscribed is ready: a request published before the SUBACK would be lost.
        if not self._subscribed.wait(m.connect_timeout_s) or self._sub_failure:
            reason = self._sub_failure or f"no SUBACK within {m.connect_timeout_s:g} s"
            client.loop_stop()
            client.disconnect()
            raise ConnectionError(f"MQTT broker {host}:{m.port} refused the bridge's "
                                  f"subscriptions {self._subscriptions}: {reason}")

    def close(self, offline_payload: bytes, timeout: float = 5.0) -> None:
        """Publish the offline status (retained), wait for it, disconnect and stop the thread."""
        client = self._client
        if client is None:
            return
        self._closing = True
        try:
            if self._connected.is_set():
                info = client.publish(self._status_topic, offline_payload, qos=1, retain=True,
                                      properties=self._props(None))
                info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            log.warning("could not publish offline status: %s", exc)
        finally:
            client.disconnect()
            client.loop_stop()
            with self._window:  # wake any worker waiting for room
                self._window.notify_all()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def shared(self) -> bool:
        """Whether requests come through a shared subscription (``$share/...``)."""
        return self._shared

    @property
    def session_expiry_s(self) -> int:
        """MQTT 5 Session Expiry Interval: as configured, else short in a shared group."""
        m = self._cfg.mqtt
        if self.shared and "session_expiry_s" not in m.model_fields_set:
            return min(m.session_expiry_s, SHARED_SESSION_EXPIRY_S)
        return m.session_expiry_s

    def leave_shared(self, timeout: float = 5.0) -> None:
        """Unsubscribe the shared filters, so the broker gives new requests to the group's
        other bridges (a clean shutdown); waits for the UNSUBACK at most ``timeout``."""
        client = self._client
        shared = [t for t in self._subscriptions if t.startswith("$share/")]
        if client is None or not shared:
            return
        self._subscriptions = [t for t in self._subscriptions if t not in shared]
        if not self._connected.is_set():
            return
        client.on_unsubscribe = lambda *_: self._unsubscribed.set()
        rc, _ = client.unsubscribe(shared)
        if rc != mqtt.MQTT_ERR_SUCCESS or not self._unsubscribed.wait(timeout):
            log.warning("could not leave %s within %g s: the broker may still route requests "
                        "here until this session ends", shared, timeout)

    # ------------------------------------------------------------------ publishing

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload this link will publish (config and broker limit)."""
        limit = self._cfg.max_message_bytes
        if self.broker_max_packet:
            limit = min(limit, self.broker_max_packet - PACKET_OVERHEAD)
        return limit

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation_data: bytes | None = None,
        retain: bool = False,
        flow_controlled: bool = True,
        deadline: float | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Hand one message to paho at the configured QoS.

        Args:
            topic: where to publish.
            payload: the encoded message.
            correlation_data: MQTT 5 Correlation Data to echo (ignored at 3.1.1).
            retain: set the retain flag (status only).
            flow_controlled: wait for room in the publish window. Only the
                request intake passes False: it must never wait on the network thread.
            deadline: ``time.monotonic()`` after which waiting gives up.
        Returns:
            paho's handle of the message (see :meth:`delivered`).
        Raises:
            StreamRefused: the broker refused an earlier message of this reply stream.
            PublishError: payload too large for the broker, or the link is closing
                / the deadline passed while waiting for room.
        """
        client = self._client
        if client is None or self._closing:
            raise PublishError("MQTT link is closed")
        if self._refused_keys and (topic, correlation_data) in self._refused_keys:
            raise StreamRefused(f"the broker refused an earlier message on {topic[:100]!r}")
        if len(payload) > payload_room(self.max_payload_bytes, topic):
            raise PublishError(
                f"message of {len(payload)} bytes on a topic of {topic_bytes(topic)} bytes "
                f"exceeds the limit of {self.max_payload_bytes} for both together"
            )
        with self._window:
            if flow_controlled:
                limit = self._cfg.mqtt.max_queued
                while self._outstanding_locked() >= limit:
                    if self._closing or self._no_wait or (
                            deadline is not None and time.monotonic() > deadline):
                        raise PublishError("gave up waiting for the broker to accept messages")
                    # QoS 0: nothing notifies a write; a short poll finds many written.
                    self._window.wait(_QOS0_POLL_S if self._qos0 else 0.5)
            # Intake messages (start/error) count but never wait: they come from the
            # thread that must not depend on the network thread's progress.
            if not self._qos0:
                self._outstanding += 1
            # Counted before the publish (one lock per message), taken back on refusal.
            self.published += 1
            self.published_bytes += len(payload)
        # Not under _window: paho calls on_publish (which takes it) holding its own lock.
        info = client.publish(
            topic, payload, qos=self._cfg.mqtt.qos, retain=retain,
            properties=self._props(correlation_data),
        )
        if self._qos0 and info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._unwritten.append(info)  # deque.append is atomic
        # NO_CONN at QoS 0: paho dropped it (nothing to wait for); at QoS>0 paho queues
        # it and resends after reconnecting.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            with self._window:
                if not self._qos0:
                    self._outstanding -= 1
                    self._window.notify()
                self.published -= 1
                self.published_bytes -= len(payload)
            raise PublishError(f"paho refused the publish: {mqtt.error_string(info.rc)}")
        return info

    def delivered(self, info: mqtt.MQTTMessageInfo, timeout: float) -> bool | None:
        """Whether a message :meth:`publish` returned reached the broker: True once
        acknowledged (QoS 1, 2) or written (QoS 0), False if refused or discarded, None
        if still pending after ``timeout`` seconds (a broker outage: paho resends it)."""
        return delivered(info, self._cfg.mqtt.qos, 0 if self._no_wait else timeout)

    def forget_refused(self, key: StreamKey) -> None:
        """Allow publishing on a refused stream again (its request has ended)."""
        self.refused.discard(key)

    def stop_waiting(self) -> None:
        """From now on a publish that would wait for the window fails instead (shutdown):
        messages that fit still go out, so a normal stop still answers every request."""
        self._no_wait = True
        with self._window:
            self._window.notify_all()

    def has_room(self) -> bool:
        """Whether a flow-controlled publish would go out without waiting."""
        return self.outstanding < self._cfg.mqtt.max_queued

    @property
    def outstanding(self) -> int:
        """Messages handed to paho and not yet acknowledged by the broker (QoS 1, 2)
        or not yet written to its socket (QoS 0)."""
        with self._window:
            return self._outstanding_locked()

    def _outstanding_locked(self) -> int:
        if not self._qos0:
            return self._outstanding
        unwritten = self._unwritten
        # Written in order; a reconnect discards the rest and sets their rc (CONN_LOST).
        while unwritten and (unwritten[0].rc != mqtt.MQTT_ERR_SUCCESS
                             or unwritten[0].is_published()):
            unwritten.popleft()
        return len(unwritten)

    def _release(self) -> None:
        with self._window:
            self._outstanding -= 1
            self._window.notify()

    def _props(self, correlation_data: bytes | None) -> Properties | None:
        if not self.is_v5:
            return None
        return _publish_props(correlation_data)

    # ------------------------------------------------------------------ paho callbacks

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            self._connack_failure = str(reason)
            self._first_connack.set()
            log.error("broker refused connection: %s", reason)
            return
        if self.is_v5 and props is not None and hasattr(props, "MaximumPacketSize"):
            self.broker_max_packet = int(props.MaximumPacketSize)
        qos: int = self._cfg.mqtt.qos or 1
        if self.is_v5:
            # A request a device published with the retain flag would otherwise be handed
            # over (and run again) on every (re)subscription. 3.1.1 has no such option.
            options = SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            _, self._sub_mid = client.subscribe([(t, options) for t in self._subscriptions])
        else:
            filters: list[tuple[str, int]] = [(topic, qos) for topic in self._subscriptions]
            _, self._sub_mid = client.subscribe(filters)
        self._refusals.connected()
        self._drop_refused(client)  # before paho resends its session's messages
        self._connected.set()
        self._first_connack.set()
        log.info(
            "connected to MQTT broker (MQTT %s, session present: %s)",
            "5" if self.is_v5 else "3.1.1",
            getattr(flags, "session_present", None),
        )
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected.clear()
        if not self._first_connack.is_set():  # closed before CONNACK: the broker said no
            self._connack_failure = f"connection closed before CONNACK ({reason})"
            self._first_connack.set()
            return
        if not self._closing:
            log.warning("MQTT connection lost (%s); paho reconnects by itself", reason)
            if not self._qos0:
                self._note_refused(client)

    def _note_refused(self, client: mqtt.Client) -> None:
        """Break the reconnect loop of a message the broker keeps refusing: stop publishing
        on its stream now, drop its queued messages at the next CONNACK."""
        found = self._refusals.disconnected(client)
        if found is None:
            return
        key, mids = found
        self.refused.add(key)
        self._to_drop.append((key, mids))
        log.error("the broker closed the connection twice on the same message (topic %r): "
                  "its reply stream (%d queued messages) is dropped and its request ended",
                  key[0][:200], len(mids))
        if self._on_refused is not None:
            try:
                self._on_refused(key)
            except Exception:  # never kill paho's network thread
                log.exception("error handling the refused stream %r", key[0][:200])

    def _drop_refused(self, client: mqtt.Client) -> None:
        while self._to_drop:
            key, mids = self._to_drop.pop()
            dropped = drop_messages(client, mids)
            with self._window:  # they will never be acknowledged
                self._outstanding -= len(dropped)
                self._window.notify_all()
            log.info("dropped %d refused messages on %r", len(dropped), key[0][:200])

    def _handle_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        if mid != self._sub_mid:
            return
        refused = [f"{topic}: {reason}" for topic, reason in zip(self._subscriptions, reasons,
                                                                 strict=False)
                   if getattr(reason, "is_failure", False)]
        if refused:
            self._sub_failure = "; ".join(refused)
            log.error("broker refused subscriptions: %s", self._sub_failure)
        self._subscribed.set()

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self._release()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        response_topic = correlation = expires = None
        props = getattr(msg, "properties", None)
        if self.is_v5 and props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
            interval = getattr(props, "MessageExpiryInterval", None)
            if interval is not None:
                expires = now + float(interval)
        try:
            self._on_message(
                Inbound(msg.topic, bytes(msg.payload), response_topic, correlation, expires, now)
            )
        except Exception:  # a bug in a handler must not kill paho's network thread
            log.exception("error handling message on %r", msg.topic)
