"""The bridge's MQTT connection: connect, subscribe, hand replies to the publish window.

One paho 2 client in its own network thread. What this module guarantees:

* MQTT 5 when the broker accepts it, else 3.1.1 (amqtt speaks only 3.1.1);
* persistent session (replies queued during a broker outage are delivered after it)
  and re-subscription on every reconnect;
* a retained status topic with a Last Will that marks the bridge offline;
* publishes never exceed the broker's Maximum Packet Size (paho 2.2 loops
  reconnecting on an oversized publish) nor ``max_message_bytes``;
* flow control through :class:`~bridge.mqtt.window.PublishWindow`: a slow broker
  slows generation down instead of growing memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from bridge.config.settings import DeploymentConfig
from bridge.mqtt.inbound import Inbound
from bridge.mqtt.paho_client import broker_host, new_client
from bridge.mqtt.paho_client import no_delay as no_delay
from bridge.mqtt.properties import (
    connect_properties,
    publish_properties,
    subscriptions,
    will_properties,
)
from bridge.mqtt.refusals import RefusedStreams, StreamKey
from bridge.mqtt.window import PublishError, PublishWindow, StreamRefused
from bridge.protocol.packet import PACKET_OVERHEAD, payload_room, topic_bytes

__all__ = [
    "SHARED_SESSION_EXPIRY_S",
    "Inbound",
    "MqttLink",
    "PublishError",
    "StreamRefused",
    "no_delay",
]

# The cached reply properties under the name the hot-path test knows them by.
_publish_props = publish_properties

log = logging.getLogger("bridge.mqtt")

_V5_PROBE_S = 3.0  # how long `protocol = "auto"` waits for a v5 CONNACK before trying 3.1.1
_SHARED_PREFIX = "$share/"

# Session expiry of a bridge in a shared group when none is configured. The broker keeps
# giving a dead member its share of requests until its session ends (Mosquitto 2.0 does
# not skip disconnected members), so a group member keeps its session only briefly.
SHARED_SESSION_EXPIRY_S = 30


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
        self._window = PublishWindow(config.mqtt.qos, config.mqtt.max_queued, on_refused)
        self._will = will_payload
        self._subscriptions = subscriptions
        self._shared = any(t.startswith(_SHARED_PREFIX) for t in subscriptions)
        self._status_topic = config.topics.status(config.bridge_id)
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._sub_failure: str | None = None
        self._first_connack = threading.Event()
        self._connack_failure: str | None = None
        self.is_v5 = False
        self.broker_max_packet: int | None = None
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
        host = broker_host(m)
        # 3.1.1 cannot bound a session's life: in a shared group a persistent session
        # would keep swallowing requests after a crash (persistent_client_expiration).
        client = new_client(m, self._cfg.mqtt_client_id, v5=v5,
                            clean_session=None if v5 else self.shared)
        # paho's own queue is unbounded here because the publish window bounds it for us.
        client.max_inflight_messages_set(m.max_inflight)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(int(max(1, m.reconnect_min_s)), int(m.reconnect_max_s))
        will_props = None
        if v5:  # in a shared group: "offline" once the broker stops routing requests to us
            will_props = will_properties(self.session_expiry_s if self.shared else None)
        client.will_set(self._status_topic, self._will, qos=1, retain=True, properties=will_props)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        if m.qos != 0:  # at QoS 0 the window watches the writes instead (module docstring)
            client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe

        self._first_connack.clear()
        self._connack_failure = None
        self.is_v5 = v5
        self._client = client
        extra: dict[str, Any] = {}
        if v5:  # 3.1.1 gets persistence from clean_session=False above (unless shared)
            extra = {"clean_start": False,
                     "properties": connect_properties(self.session_expiry_s)}
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
        self._window.closing = True
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
            self._window.wake()  # a worker waiting for room gives up

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
        shared = [t for t in self._subscriptions if t.startswith(_SHARED_PREFIX)]
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
        window = self._window
        if client is None or window.closing:
            raise PublishError("MQTT link is closed")
        window.check_stream(topic, correlation_data)
        if len(payload) > payload_room(self.max_payload_bytes, topic):
            raise PublishError(
                f"message of {len(payload)} bytes on a topic of {topic_bytes(topic)} bytes "
                f"exceeds the limit of {self.max_payload_bytes} for both together"
            )
        window.admit(len(payload), flow_controlled=flow_controlled, deadline=deadline)
        # Not under the window's lock: paho calls on_publish (which takes it) holding its own.
        info = client.publish(
            topic, payload, qos=self._cfg.mqtt.qos, retain=retain,
            properties=self._props(correlation_data),
        )
        window.handed(info, len(payload))
        return info

    def delivered(self, info: mqtt.MQTTMessageInfo, timeout: float) -> bool | None:
        """Whether a message :meth:`publish` returned reached the broker: True once
        acknowledged (QoS 1, 2) or written (QoS 0), False if refused or discarded, None
        if still pending after ``timeout`` seconds (a broker outage: paho resends it)."""
        return self._window.delivered(info, timeout)

    def forget_refused(self, key: StreamKey) -> None:
        """Allow publishing on a refused stream again (its request has ended)."""
        self._window.forget_refused(key)

    def stop_waiting(self) -> None:
        """From now on a publish that would wait for the window fails instead (shutdown):
        messages that fit still go out, so a normal stop still answers every request."""
        self._window.stop_waiting()

    def has_room(self) -> bool:
        """Whether a flow-controlled publish would go out without waiting."""
        return self._window.has_room()

    @property
    def outstanding(self) -> int:
        """Messages handed to paho and not yet acknowledged by the broker (QoS 1, 2)
        or not yet written to its socket (QoS 0)."""
        return self._window.outstanding

    @property
    def published(self) -> int:
        """Messages handed to paho."""
        return self._window.published

    @property
    def published_bytes(self) -> int:
        """Payload bytes handed to paho."""
        return self._window.published_bytes

    @property
    def refused(self) -> RefusedStreams:
        """The reply streams the broker refused."""
        return self._window.refused

    def _props(self, correlation_data: bytes | None) -> Properties | None:
        if not self.is_v5:
            return None
        return publish_properties(correlation_data)

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
        _, self._sub_mid = client.subscribe(
            subscriptions(self._subscriptions, qos, v5=self.is_v5))
        self._window.connected(client)  # drops refused messages before paho resends
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
        if not self._window.closing:
            log.warning("MQTT connection lost (%s); paho reconnects by itself", reason)
            self._window.connection_lost(client)

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
        self._window.acknowledged()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._on_message(Inbound.of(msg, v5=self.is_v5))
        except Exception:  # a bug in a handler must not kill paho's network thread
            log.exception("error handling message on %r", msg.topic)
