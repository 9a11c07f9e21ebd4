"""Devices for the tests: a bare MQTT client that keeps what the broker delivers, and the
device library's client.

* :class:`Device` -- a paho client as a device (or any MQTT client a test needs): it
  records every message as it came (no client-side filtering), reassembles replies
  by ``seq`` (:class:`StreamView`), and has blocking, bounded calls for CONNECT,
  SUBSCRIBE and PUBLISH that return the broker's reason codes. By default it is a
  device as the protocol advises: fixed client id, persistent session, subscribed at
  QoS 1 to its whole reply namespace on every connection; :meth:`Device.bare` is a
  plain client (clean session, no subscription of its own).
* :func:`bridge_client` and :func:`ask` -- :class:`~bridge.mqtt.device.BridgeClient`
  (what devices use) for tests of the whole path, and one checked request with it.

Waiting is on a Condition or Event with a timeout, never a sleep.
"""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config.settings import MqttSettings
from bridge.mqtt.device import BridgeClient
from bridge.protocol.messages import TERMINAL_TYPES, decode_reply
from tests.support.processes import BrokerInfo
from tests.support.recorder import PublishLog, check_reply_stream
from tests.support.replies import StreamView
from tests.support.waiting import DEADLINE, REPLY_TIMEOUT

ACK_S = 30.0  # bound on a CONNACK, SUBACK or PUBACK (fault scenarios pause brokers)


class Device:
    """An MQTT client as a device, recording everything it receives.

    Args:
        host, port: the broker.
        name: client id and ``{client}`` topic level (a unique one if None).
        protocol: ``"5"`` or ``"3.1.1"``.
        prefix: the topic prefix of the bridge's namespace.
        clean: clean session (3.1.1) / clean start (5).
        session_expiry: MQTT 5 Session Expiry Interval in seconds (None: not sent).
        replies: subscribe (QoS 1) to ``P/reply/{name}/#`` on every connection: harmless
            when the session survived, needed when the broker lost it.
        will: ``(topic, payload)`` Last Will, published by the broker if the device vanishes.
        username, password, ca_file: credentials and TLS (verify the broker with this CA).
        inbox: also queue every message as paho delivered it (retain flag, QoS) in
            :attr:`messages`, to be taken one at a time (:meth:`wait_for`).
    """

    def __init__(self, host: str, port: int, name: str | None = None, *,
                 protocol: Literal["5", "3.1.1"] = "5", prefix: str = "llm",
                 clean: bool = False, session_expiry: int | None = 3600,
                 replies: bool = True, will: tuple[str, bytes] | None = None,
                 username: str | None = None, password: str | None = None,
                 ca_file: Path | None = None, inbox: bool = False) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.name = name or f"t-{uuid.uuid4().hex[:10]}"
        self.v5 = protocol == "5"
        self.clean = clean
        self.session_expiry = session_expiry
        self.namespace = f"{prefix}/reply/{self.name}/"
        self._replies = replies
        self._inbox = inbox
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name,
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                                  clean_session=None if self.v5 else clean)
        self.client.reconnect_delay_set(1, 2)
        self.client.max_queued_messages_set(0)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.cond = threading.Condition()
        self.received: list[tuple[str, bytes]] = []  # (topic, payload), in arrival order
        self.by_topic: dict[str, list[bytes]] = {}
        self.terminal_topics: set[str] = set()  # topics on which a terminal message arrived
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()  # see ``inbox``
        self.connacks: list[tuple[Any, bool]] = []  # every CONNACK: (reason, session present)
        self.drops = 0  # connections lost or closed
        self._pubacks: dict[int, Any] = {}
        self._acks: dict[int, threading.Event] = {}
        self._codes: dict[int, list[Any]] = {}
        self._ack_lock = threading.Lock()
        self._subscribed = threading.Event()
        self._connack = threading.Event()

    @classmethod
    def bare(cls, host: str, port: int, name: str | None = None, *,
             protocol: Literal["5", "3.1.1"] = "3.1.1", **kwargs: Any) -> Self:
        """A plain client: clean session, no subscription of its own, an inbox."""
        settings: dict[str, Any] = {"clean": True, "session_expiry": None, "replies": False,
                                    "inbox": True, **kwargs}
        return cls(host, port, name, protocol=protocol, **settings)

    @classmethod
    def at(cls, broker: BrokerInfo, name: str | None = None, **kwargs: Any) -> Self:
        """A plain client with ``broker``'s address, protocol, credentials and TLS."""
        return cls.bare(broker.host, broker.port, name, protocol=broker.protocol,
                        username=broker.username, password=broker.password,
                        ca_file=broker.ca_file, **kwargs)

    # ------------------------------------------------------------------ connection

    def try_connect(self, timeout: float = ACK_S) -> tuple[Any, bool]:
        """Connect and wait for the CONNACK; a refusal stops the client.

        Returns:
            (reason code, session present).
        """
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self.session_expiry is not None:
                props.SessionExpiryInterval = self.session_expiry
            kwargs = {"clean_start": self.clean, "properties": props}
        self.client.connect(self.host, self.port, keepalive=30, **kwargs)
        self.client.loop_start()
        if not self._connack.wait(timeout):
            self.close()
            raise TimeoutError(f"{self.name}: no CONNACK from {self.host}:{self.port} "
                               f"within {timeout} s")
        reason, present = self.connacks[-1]
        if reason.is_failure:
            self.close()
        return reason, present

    def connect(self, timeout: float = ACK_S) -> Self:
        """Connect, and subscribe to the reply namespace (``replies``); returns self.

        Raises:
            ConnectionRefusedError: the broker refused the connection.
            TimeoutError: no CONNACK or SUBACK within ``timeout``.
        """
        reason, _ = self.try_connect(timeout)
        if reason.is_failure:
            raise ConnectionRefusedError(f"{self.name}: {reason}")
        if self._replies and not self._subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"{self.name}: no SUBACK within {timeout} s")
        return self

    def close(self) -> None:
        """Disconnect (cleanly) and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT (crash, power cut): the broker publishes the Will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            with suppress(OSError):
                sock.close()

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connects(self) -> int:
        """Connections the broker accepted."""
        with self.cond:
            return sum(not reason.is_failure for reason, _ in self.connacks)

    @property
    def session_present(self) -> list[bool]:
        """Session Present of every accepted connection."""
        with self.cond:
            return [present for reason, present in self.connacks if not reason.is_failure]

    def barrier(self, timeout: float = ACK_S) -> None:
        """A SUBSCRIBE/SUBACK round trip once connected: what the broker had queued for
        us before it is delivered by the time this returns."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.client.is_connected() and self._subscribed.is_set():
                break
            self._subscribed.wait(0.2)
        self.subscribe(self.namespace + "#", timeout=max(1.0, end - time.monotonic()))

    def subscribe(self, topic: str, qos: int = 1, timeout: float = ACK_S) -> list[Any]:
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        done = threading.Event()
        codes: list[Any] = []
        with self._ack_lock:
            rc, mid = self.client.subscribe(topic, qos=qos)
            assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None, f"subscribe failed: {rc}"
            self._acks[mid] = done
            self._codes[mid] = codes
        assert done.wait(timeout), f"{self.name}: no SUBACK for {topic} within {timeout} s"
        return codes

    # ------------------------------------------------------------------ publishing

    def publish(self, topic: str, payload: dict[str, Any] | bytes | str, qos: int = 1,
                retain: bool = False, props: Properties | None = None,
                timeout: float = ACK_S) -> Any:
        """Publish (a dict as JSON) and wait until it is sent (QoS 0) or acknowledged;
        returns the PUBACK's reason code (MQTT 5: a failure is a refusal)."""
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=qos, retain=retain, properties=props)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"{topic}: not acknowledged within {timeout} s"
        return self.puback_reason(info.mid)

    def puback_reason(self, mid: int) -> Any:
        """The PUBACK reason code of publish ``mid`` (MQTT 5: failure = refused)."""
        with self.cond:
            return self._pubacks.get(mid)

    def request(self, payload: dict[str, Any] | str | bytes, *, topic: str | None = None,
                props: Properties | None = None, wait: bool = True) -> mqtt.MQTTMessageInfo:
        """Publish one request at QoS 1 (on ``P/request/{name}`` unless ``topic``)."""
        data = json.dumps(payload).encode() if isinstance(payload, dict) else \
            payload.encode() if isinstance(payload, str) else payload
        info = self.client.publish(topic or f"{self.prefix}/request/{self.name}", data, qos=1,
                                   properties=props)
        if wait:
            info.wait_for_publish(ACK_S)
        return info

    def request_as(self, client: str, payload: dict[str, Any]) -> mqtt.MQTTMessageInfo:
        """Publish a request in ``client``'s name (on ``P/request/{client}``)."""
        return self.request(payload, topic=f"{self.prefix}/request/{client}")

    def cancel(self, request_id: str) -> None:
        self.client.publish(f"{self.prefix}/cancel/{self.name}", json.dumps({"id": request_id}),
                            qos=1).wait_for_publish(ACK_S)

    def ask(self, request: dict[str, Any], timeout: float = REPLY_TIMEOUT) -> list[Any]:
        """Ask as this device (``request`` has an ``id``) and wait for the terminal message.

        Returns:
            The request's reply messages, decoded, as received.
        """
        reason = self.publish(f"{self.prefix}/request/{self.name}", request)
        assert not reason.is_failure, f"{self.name} may not ask as itself: {reason}"
        topic = self.topic(request["id"])
        assert self.wait(lambda d: topic in d.terminal_topics, timeout), \
            f"no terminal message on {topic}"
        with self.cond:
            return [decode_reply(p) for t, p in self.received if t == topic]

    def topic(self, request_id: str) -> str:
        return f"{self.namespace}{request_id}"

    # ------------------------------------------------------------------ what arrived

    def view(self, topic: str) -> StreamView:
        view = StreamView(topic)
        with self.cond:
            payloads = list(self.by_topic.get(topic, ()))
        for payload in payloads:
            view.add(payload)
        return view

    def views(self) -> dict[str, StreamView]:
        """Every topic a message arrived on, with what arrived on it."""
        with self.cond:
            topics = list(self.by_topic)
        return {topic: self.view(topic) for topic in topics}

    def topics(self) -> set[str]:
        with self.cond:
            return set(self.by_topic)

    def payloads(self) -> list[bytes]:
        """Every payload received, in arrival order."""
        with self.cond:
            return [payload for _, payload in self.received]

    def wait(self, predicate: Callable[[Device], bool], timeout: float = DEADLINE) -> bool:
        """Wait until ``predicate(self)`` holds (re-checked on every message)."""
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    def has_terminal(self, topic: str) -> bool:
        return topic in self.terminal_topics

    def wait_terminal(self, topic: str, timeout: float = DEADLINE) -> StreamView:
        self.wait(lambda d: topic in d.terminal_topics, timeout)
        return self.view(topic)

    def wait_for(self, topic: str, timeout: float = ACK_S
                 ) -> tuple[mqtt.MQTTMessage, list[mqtt.MQTTMessage]]:
        """Take messages from :attr:`messages` until one on ``topic`` arrives.

        Returns:
            That message and every message taken before it.
        """
        assert self._inbox, f"{self.name} keeps no inbox"
        before: list[mqtt.MQTTMessage] = []
        while True:
            try:
                msg = self.messages.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{self.name}: nothing on {topic} within {timeout} s "
                                     f"(got {[m.topic for m in before]}, "
                                     f"drops: {self.drops})") from None
            if msg.topic == topic:
                return msg, before
            before.append(msg)

    def received_before_marker(self) -> list[str]:
        """Publish a marker to itself; the topics of everything that came before it.

        "Never arrives", shown: the broker sends anything it would send for the CONNECT
        or a SUBSCRIBE before the marker.
        """
        marker = f"marker/{self.name}/{uuid.uuid4().hex[:6]}"
        assert self.subscribe(marker) == [1]
        self.publish(marker, b"m")
        _, before = self.wait_for(marker)
        return [msg.topic for msg in before]

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        with self.cond:
            self.connacks.append((reason, bool(flags.session_present)))
        if not reason.is_failure and self._replies:
            self._subscribed.clear()
            _, mid = client.subscribe(self.namespace + "#", qos=1)
            if mid is not None:
                with self._ack_lock:
                    self._acks[mid] = self._subscribed
        self._connack.set()

    def _on_disconnect(self, *args: Any) -> None:
        self._subscribed.clear()
        with self.cond:
            self.drops += 1

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any,
                      props: Any) -> None:
        with self._ack_lock:
            event = self._acks.pop(mid, None)
            target = self._codes.pop(mid, None)
        if target is not None:
            target.extend(codes)
        if event is not None:
            event.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    props: Any) -> None:
        with self.cond:
            self._pubacks[mid] = reason

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        try:
            body = json.loads(payload)
            terminal = isinstance(body, dict) and body.get("type") in TERMINAL_TYPES
        except ValueError:
            terminal = False
        with self.cond:
            self.received.append((msg.topic, payload))
            self.by_topic.setdefault(msg.topic, []).append(payload)
            if terminal:
                self.terminal_topics.add(msg.topic)
            self.cond.notify_all()
        if self._inbox:
            self.messages.put(msg)


# --------------------------------------------------------------------------- BridgeClient


def bridge_client(broker: Any, name: str, *, protocol: Literal["3.1.1", "5"] | None = None,
                  published: PublishLog | None = None) -> BridgeClient:
    """The device library's client as ``name``, on ``broker`` (anything with ``host`` and
    ``port``), unstarted (use it in a ``with``).

    Args:
        protocol: the MQTT version; by default that of ``broker`` (a :class:`BrokerInfo`).
        published: a log to register its publishes with (for :func:`check_bridge_messages`).
    """
    if protocol is None:
        assert isinstance(broker, BrokerInfo), "say which protocol to use with this broker"
        protocol = broker.protocol
    settings = MqttSettings.model_validate({"host": broker.host, "port": broker.port,
                                            "protocol": protocol})
    client = BridgeClient(settings, client=name)
    return published.track(client) if published is not None else client


def ask(dev: BridgeClient, request: dict[str, Any], timeout: float = REPLY_TIMEOUT
        ) -> list[Any]:
    """One request with ``dev``: its messages, checked against the protocol's invariants."""
    msgs = list(dev.ask(request, idle_timeout=timeout))
    check_reply_stream(msgs)
    return msgs
