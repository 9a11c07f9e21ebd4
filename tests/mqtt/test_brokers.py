"""The broker rig itself, checked with real paho-mqtt 2.2 clients.

* the embedded amqtt broker: QoS 1 pub/sub, retained messages, persistent
  sessions, clean start/stop, a clear error for a taken port -- and the amqtt
  0.12 quirks the bridge has to live with (documented in bridge/mqtt/brokers/amqtt.py);
* Mosquitto started from the shipped ``mosquitto/mosquitto.conf``: plain preset at
  MQTT 3.1.1 and 5, persistence across a restart, pause/resume, kill/restart;
* the ``secure`` preset: TLS, passwords and the shipped ``mosquitto/acl`` -- a
  device can only ask in its own name and read its own replies, bridge accounts
  read requests (also through a shared subscription) and write replies.

Waiting is always on an event or a queue with a timeout. "Never arrives" is
shown with a marker message published after the forbidden one on the same
connection: once the marker is in, the forbidden message would have been too.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.mqtt.brokers.amqtt import EmbeddedBroker, EmbeddedBrokerError
from tests.support.processes import (
    MOSQUITTO_ACL,
    SECURE_USERS,
    MosquittoProcess,
    free_port,
    wait_for_port,
)

TIMEOUT = 10.0  # generous upper bound for anything on loopback


class Client:
    """A paho 2.2 client (VERSION2 callbacks) with blocking, bounded helpers.

    Args:
        host: broker address.
        port: broker port.
        client_id: the MQTT client id (a unique one if None).
        protocol: ``"3.1.1"`` or ``"5"``.
        username: credentials, or None.
        password: see ``username``.
        ca_file: connect with TLS, verifying the broker against this CA.
        clean: clean session (3.1.1) / clean start (5).
        session_expiry: MQTT 5 Session Expiry Interval in seconds.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str | None = None,
        *,
        protocol: Literal["3.1.1", "5"] = "3.1.1",
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        clean: bool = True,
        session_expiry: int | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.v5 = protocol == "5"
        self.clean = clean
        self.session_expiry = session_expiry
        self.client_id = client_id or f"t-{uuid.uuid4().hex[:10]}"
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connacks: queue.Queue[tuple[Any, bool]] = queue.Queue()
        self._subacks: queue.Queue[list[Any]] = queue.Queue()
        self._puback_codes: dict[int, Any] = {}
        self._pubacked = threading.Condition()
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else clean,
        )
        if username is not None:
            self.c.username_pw_set(username, password)
        if ca_file is not None:
            self.c.tls_set(ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.c.on_connect = lambda _c, _u, flags, rc, _p: self._connacks.put(
            (rc, bool(flags.session_present))
        )
        self.c.on_subscribe = lambda _c, _u, _mid, codes, _p: self._subacks.put(list(codes))
        self.c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.c.on_publish = self._on_publish

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._pubacked:
            self._puback_codes[mid] = rc
            self._pubacked.notify_all()

    def connect(self, timeout: float = TIMEOUT) -> tuple[Any, bool]:
        """Connect and wait for the CONNACK.

        Returns:
            (reason code, session present). A refused connection is returned too
            (the client is then stopped), not raised.
        """
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                props.SessionExpiryInterval = self.session_expiry
        self.c.connect(
            self.host,
            self.port,
            keepalive=30,
            clean_start=self.clean if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self.c.loop_start()
        try:
            rc, present = self._connacks.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port} in {timeout} s") from None
        if rc.is_failure:
            self.close()
        return rc, present

    def connect_ok(self) -> Client:
        """Connect and assert it succeeded; returns self."""
        rc, _ = self.connect()
        assert not rc.is_failure, f"{self.client_id}: connection refused: {rc}"
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = TIMEOUT) -> list[Any]:
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        self.c.subscribe(topic, qos)
        return self._subacks.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> Any:
        """Publish and, for QoS 1, wait for the PUBACK; returns its reason code (v5)."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"{topic}: not acknowledged within {TIMEOUT} s"
        with self._pubacked:
            return self._puback_codes.get(info.mid)

    def wait_for(self, topic: str, timeout: float = TIMEOUT) -> tuple[mqtt.MQTTMessage, list[Any]]:
        """Wait for a message on ``topic``.

        Returns:
            That message and every message received before it.
        """
        before: list[mqtt.MQTTMessage] = []
        while True:
            try:
                msg = self.messages.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"{self.client_id}: nothing on {topic} within {timeout} s "
                    f"(got {[m.topic for m in before]})"
                ) from None
            if msg.topic == topic:
                return msg, before
            before.append(msg)

    def close(self) -> None:
        """Disconnect (cleanly) and stop the network thread."""
        self.c.disconnect()
        self.c.loop_stop()

    def drop(self) -> None:
        """Stop without DISCONNECT, like a crashed device (the broker sends the Will)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.close()


@pytest.fixture
def clients() -> Any:
    """Factory of :class:`Client`; every client is closed at teardown."""
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        client = Client(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _roundtrip(make: Any, host: str, port: int, protocol: Literal["3.1.1", "5"]) -> None:
    """QoS 1 pub/sub and a retained message, as every broker must do them."""
    sub = make(host, port, protocol=protocol).connect_ok()
    assert sub.subscribe("rig/+/x", qos=1) == [1]  # granted QoS 1
    pub = make(host, port, protocol=protocol).connect_ok()
    pub.publish("rig/a/x", b"hello", qos=1)
    msg, _ = sub.wait_for("rig/a/x")
    assert (msg.payload, msg.qos, msg.retain) == (b"hello", 1, False)

    pub.publish("rig/retained", b"status", qos=1, retain=True)
    late = make(host, port, protocol=protocol).connect_ok()
    late.subscribe("rig/retained", qos=1)
    msg, _ = late.wait_for("rig/retained")
    assert msg.payload == b"status" and msg.retain


# ============================================================================ amqtt


def test_amqtt_pubsub_qos1_and_retained(amqtt_broker: EmbeddedBroker, clients: Any) -> None:
    _roundtrip(clients, amqtt_broker.host, amqtt_broker.port, "3.1.1")


def test_amqtt_keeps_persistent_sessions(amqtt_broker: EmbeddedBroker, clients: Any) -> None:
    """Our auth plugin keeps clean_session=False sessions (stock amqtt would not)."""
    host, port = amqtt_broker.host, amqtt_broker.port
    dev = clients(host, port, "persistent-dev", clean=False).connect_ok()
    dev.subscribe("llm/reply/persistent-dev/#", qos=1)
    dev.close()
    pub = clients(host, port).connect_ok()
    pub.publish("llm/reply/persistent-dev/r1", b"queued while offline", qos=1)
    # Same session again: the message queued while it was away is delivered...
    again = clients(host, port, "persistent-dev", clean=False)
    rc, present = again.connect()
    assert not rc.is_failure and present
    msg, _ = again.wait_for("llm/reply/persistent-dev/r1")
    # ...with the retain flag set: an amqtt quirk (the retain flag is no staleness signal).
    assert msg.payload == b"queued while offline" and msg.qos == 1 and msg.retain


def test_amqtt_refuses_mqtt5(amqtt_broker: EmbeddedBroker, clients: Any) -> None:
    rc, _ = clients(amqtt_broker.host, amqtt_broker.port, protocol="5").connect()
    assert rc.is_failure and rc.value == 132, rc  # "Unsupported protocol version"


def test_amqtt_quirk_shared_subscription_never_matches(
    amqtt_broker: EmbeddedBroker, clients: Any
) -> None:
    """Pin the amqtt 0.12 behaviour the bridge must cope with (see embedded_broker.py).

    If this fails after an amqtt upgrade, the quirk is gone: update the docs.
    """
    host, port = amqtt_broker.host, amqtt_broker.port
    # A $share filter is accepted but is a literal filter: it never matches.
    shared = clients(host, port).connect_ok()
    assert shared.subscribe("$share/g/llm/request/+", qos=1) == [1]
    shared.subscribe("marker", qos=1)
    device = clients(host, port).connect_ok()
    device.publish("llm/request/dev-a", b"hi", qos=1)
    device.publish("marker", b"after", qos=1)
    _, before = shared.wait_for("marker")
    assert [m.topic for m in before] == [], "amqtt delivered through a $share filter"


def test_amqtt_port_taken_is_a_clear_error(amqtt_broker: EmbeddedBroker) -> None:
    second = EmbeddedBroker("127.0.0.1", amqtt_broker.port)
    with pytest.raises(EmbeddedBrokerError) as err:
        second.start()
    text = str(err.value)
    assert f"port {amqtt_broker.port}" in text and "--mqtt-port" in text
    second.stop()  # harmless on a broker that never started


def test_amqtt_stops_promptly_with_clients_connected(clients: Any) -> None:
    broker = EmbeddedBroker("127.0.0.1", 0, stop_timeout=2.0)
    broker.start()
    port = broker.port
    retrying_v5 = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    try:
        # Connected clients, a persistent session resumed with a queued message, a
        # retained message, a refused v5 client that keeps retrying: the mix in
        # which amqtt's own shutdown was seen to hang now and then.
        first = clients("127.0.0.1", port, "same-id", clean=False).connect_ok()
        first.subscribe("a/#", qos=1)
        first.close()
        pub = clients("127.0.0.1", port).connect_ok()
        pub.publish("a/queued", b"1", qos=1)
        retrying_v5.connect("127.0.0.1", port)
        retrying_v5.loop_start()
        again = clients("127.0.0.1", port, "same-id", clean=False).connect_ok()
        again.wait_for("a/queued")
        pub.publish("a/retained", b"r", qos=1, retain=True)
        again.wait_for("a/retained")
    finally:
        started = time.monotonic()
        broker.stop()
        elapsed = time.monotonic() - started
        retrying_v5.loop_stop()
    assert not broker.running
    assert elapsed < broker.stop_timeout + 1.5, f"stop took {elapsed:.1f} s"
    # The port is free again: a new broker can take it.
    with EmbeddedBroker("127.0.0.1", port) as again:
        assert again.port == port


def test_amqtt_last_will(amqtt_broker: EmbeddedBroker, clients: Any) -> None:
    host, port = amqtt_broker.host, amqtt_broker.port
    watcher = clients(host, port).connect_ok()
    watcher.subscribe("llm/status/#", qos=1)
    bridge = clients(host, port)
    bridge.c.will_set("llm/status/b9", b'{"state":"offline"}', qos=1, retain=True)
    bridge.connect_ok()
    bridge.drop()
    msg, _ = watcher.wait_for("llm/status/b9")
    assert msg.payload == b'{"state":"offline"}'


# ============================================================================ mosquitto


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_mosquitto_plain_roundtrip(
    mosquitto: MosquittoProcess, clients: Any, protocol: Literal["3.1.1", "5"]
) -> None:
    _roundtrip(clients, mosquitto.host, mosquitto.port, protocol)


def test_mosquitto_conf_is_derived_from_the_shipped_one(mosquitto: MosquittoProcess) -> None:
    conf = mosquitto.conf_path.read_text()
    for setting in (
        "max_queued_messages 100000",
        "persistence true",
        "max_packet_size 262144",
        "set_tcp_nodelay true",
    ):
        assert f"\n{setting}\n" in conf, setting
    assert f"listener {mosquitto.port} 127.0.0.1" in conf
    assert "websockets" not in conf  # 2.0.11 would bind it on all interfaces


def test_mosquitto_v5_announces_maximum_packet_size(
    mosquitto: MosquittoProcess,
) -> None:
    got: queue.Queue[Any] = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_connect = lambda _c, _u, _f, _rc, props: got.put(props)
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    try:
        props = got.get(timeout=TIMEOUT)
        assert props.MaximumPacketSize == 262144
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_mosquitto_restart_keeps_queued_qos1(
    mosquitto: MosquittoProcess, clients: Any, protocol: Literal["3.1.1", "5"]
) -> None:
    """Persistence: a message queued for an offline persistent session survives a restart."""
    host, port = mosquitto.host, mosquitto.port
    expiry = 3600 if protocol == "5" else None
    dev = clients(host, port, "dev-persist", protocol=protocol, clean=False, session_expiry=expiry)
    dev.connect_ok()
    dev.subscribe("llm/reply/dev-persist/#", qos=1)
    dev.close()

    pub = clients(host, port, protocol=protocol).connect_ok()
    pub.publish("llm/reply/dev-persist/r1", b"survives", qos=1)
    pub.close()

    pid = mosquitto.pid
    mosquitto.restart()  # SIGTERM: Mosquitto writes its database on the way out
    assert mosquitto.pid != pid and mosquitto.port == port

    again = clients(
        host, port, "dev-persist", protocol=protocol, clean=False, session_expiry=expiry
    )
    rc, present = again.connect()
    assert not rc.is_failure and present, "session lost across the restart"
    msg, _ = again.wait_for("llm/reply/dev-persist/r1")
    assert msg.payload == b"survives" and msg.qos == 1


def test_mosquitto_pause_resume_and_kill_restart(mosquitto: MosquittoProcess, clients: Any) -> None:
    host, port = mosquitto.host, mosquitto.port
    mosquitto.pause()
    frozen = clients(host, port)
    with pytest.raises(TimeoutError):
        frozen.connect(timeout=0.5)  # the TCP handshake completes, the CONNACK cannot
    mosquitto.resume()
    clients(host, port).connect_ok()

    mosquitto.kill()
    with pytest.raises(OSError):
        wait_for_port(host, port, deadline=0.2)  # nothing listens any more
    mosquitto.restart()
    clients(host, port).connect_ok()


def test_mosquitto_fixed_port_in_use_fails_clearly(tmp_path: Path) -> None:
    port = free_port()
    with MosquittoProcess(tmp_path / "a", port=port):
        taken = MosquittoProcess(tmp_path / "b", port=port)
        with pytest.raises(RuntimeError, match="did not start"):
            taken.start(timeout=3)
        assert not taken.running


# ============================================================================ secure preset


def _secure(
    make: Any,
    broker: MosquittoProcess,
    user: str | None,
    password: str | None = None,
    protocol: Literal["3.1.1", "5"] = "5",
    **kwargs: Any,
) -> Client:
    if user is not None and password is None:
        password = SECURE_USERS[user]
    return make(
        broker.host,
        broker.port,
        user,
        protocol=protocol,
        username=user,
        password=password,
        ca_file=broker.ca_file,
        **kwargs,
    )


def test_secure_refuses_anonymous_and_wrong_passwords(
    mosquitto_secure: MosquittoProcess, clients: Any
) -> None:
    rc, _ = _secure(clients, mosquitto_secure, None).connect()
    assert rc.is_failure, "anonymous client accepted"
    rc, _ = _secure(clients, mosquitto_secure, "dev-a", "wrong").connect()
    assert rc.is_failure, "wrong password accepted"
    rc, _ = _secure(clients, mosquitto_secure, "dev-a", protocol="3.1.1").connect()
    assert not rc.is_failure


def test_secure_plaintext_listener_has_the_same_auth(
    mosquitto_secure: MosquittoProcess, clients: Any
) -> None:
    host, port = mosquitto_secure.host, mosquitto_secure.plain_port
    rc, _ = clients(host, port).connect()
    assert rc.is_failure
    clients(host, port, username="bridge@1", password=SECURE_USERS["bridge@1"]).connect_ok()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_device_cannot_ask_in_another_devices_name(
    mosquitto_secure: MosquittoProcess, clients: Any, protocol: Literal["3.1.1", "5"]
) -> None:
    bridge = _secure(clients, mosquitto_secure, "bridge@1").connect_ok()
    bridge.subscribe("llm/request/+", qos=1)
    bridge.subscribe("llm/cancel/+", qos=1)
    dev_a = _secure(clients, mosquitto_secure, "dev-a", protocol=protocol).connect_ok()

    code = dev_a.publish("llm/request/dev-b", b"forged", qos=1)
    if protocol == "5":
        assert code is not None and code.is_failure, f"PUBACK said {code}"  # Not authorized
    dev_a.publish("llm/cancel/dev-b", b"forged-cancel", qos=1)
    dev_a.publish("llm/request/dev-a", b"mine", qos=1)  # the marker, on the same connection

    msg, before = bridge.wait_for("llm/request/dev-a")
    assert msg.payload == b"mine"
    assert [m.topic for m in before] == [], "a forged request/cancel got through"
    dev_a.publish("llm/cancel/dev-a", b"my-cancel", qos=1)
    bridge.wait_for("llm/cancel/dev-a")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_device_reads_only_its_own_replies(
    mosquitto_secure: MosquittoProcess, clients: Any, protocol: Literal["3.1.1", "5"]
) -> None:
    dev_a = _secure(clients, mosquitto_secure, "dev-a", protocol=protocol).connect_ok()
    # Mosquitto grants the wildcard subscription; the ACL is applied per message.
    dev_a.subscribe("llm/reply/#", qos=1)
    dev_a.subscribe("llm/reply/dev-b/#", qos=1)
    bridge = _secure(clients, mosquitto_secure, "bridge@1").connect_ok()
    bridge.publish("llm/reply/dev-b/x", b"secret", qos=1)
    bridge.publish("llm/reply/dev-a/r1", b"yours", qos=1)  # marker, same connection

    msg, before = dev_a.wait_for("llm/reply/dev-a/r1")
    assert msg.payload == b"yours"
    assert [m.topic for m in before] == [], "dev-a read dev-b's reply"


def test_device_reads_status_and_cannot_write_it(
    mosquitto_secure: MosquittoProcess, clients: Any
) -> None:
    bridge = _secure(clients, mosquitto_secure, "bridge@1").connect_ok()
    bridge.subscribe("llm/status/#", qos=1)
    dev_a = _secure(clients, mosquitto_secure, "dev-a").connect_ok()
    dev_a.publish("llm/status/bridge-1", b'{"state":"offline"}', qos=1, retain=True)  # denied
    bridge.publish("llm/status/bridge-1", b'{"state":"online"}', qos=1, retain=True)
    msg, before = bridge.wait_for("llm/status/bridge-1")
    assert msg.payload == b'{"state":"online"}' and before == []

    late = _secure(clients, mosquitto_secure, "dev-b").connect_ok()
    late.subscribe("llm/status/#", qos=1)
    msg, _ = late.wait_for("llm/status/bridge-1")
    assert msg.payload == b'{"state":"online"}' and msg.retain


def test_bridge_accounts_read_requests_and_write_replies(
    mosquitto_secure: MosquittoProcess, clients: Any
) -> None:
    bridge = _secure(clients, mosquitto_secure, "bridge@1").connect_ok()
    bridge.subscribe("llm/request/+", qos=1)
    dev_a = _secure(clients, mosquitto_secure, "dev-a").connect_ok()
    dev_a.subscribe("llm/reply/dev-a/#", qos=1)

    dev_a.publish("llm/request/dev-a", b'{"id":"r1","prompt":"hi"}', qos=1)
    bridge.wait_for("llm/request/dev-a")
    bridge.publish("llm/reply/dev-a/r1", b'{"type":"done","id":"r1","seq":0}', qos=1)
    msg, _ = dev_a.wait_for("llm/reply/dev-a/r1")
    assert msg.payload.startswith(b'{"type":"done"')


def test_bridges_share_requests_through_shared_subscription(
    mosquitto_secure: MosquittoProcess, clients: Any
) -> None:
    """Two bridge instances (own accounts) in one $share group: each request served once."""
    b1 = _secure(clients, mosquitto_secure, "bridge@1").connect_ok()
    b2 = _secure(clients, mosquitto_secure, "bridge@2").connect_ok()
    for b in (b1, b2):
        codes = b.subscribe("$share/bridges/llm/request/+", qos=1)
        assert not codes[0].is_failure, codes
        b.subscribe("llm/cancel/+", qos=1)  # not shared: both get the marker
    dev_a = _secure(clients, mosquitto_secure, "dev-a").connect_ok()
    sent = [f"q{i}".encode() for i in range(20)]
    for payload in sent:
        dev_a.publish("llm/request/dev-a", payload, qos=1)
    dev_a.publish("llm/cancel/dev-a", b"marker", qos=1)

    # Each bridge's share was queued to it before the marker (same publisher).
    shares = [[m.payload for m in b.wait_for("llm/cancel/dev-a")[1]] for b in (b1, b2)]
    assert sorted(shares[0] + shares[1]) == sorted(sent), "a request was lost or duplicated"
    assert shares[0] and shares[1], f"not shared: {len(shares[0])} / {len(shares[1])}"


def test_shipped_acl_has_a_block_per_bridge_account() -> None:
    text = MOSQUITTO_ACL.read_text()
    for name in ("bridge@1", "bridge@2"):
        assert f"user {name}\n" in text
    assert "pattern write llm/request/%u" in text
    assert "pattern read llm/reply/%u/#" in text
