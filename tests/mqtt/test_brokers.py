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
import time
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.mqtt.brokers.amqtt import EmbeddedBroker, EmbeddedBrokerError
from tests.support.device import Device
from tests.support.processes import (
    MOSQUITTO_ACL,
    SECURE_USERS,
    MosquittoProcess,
    free_port,
    wait_for_port,
)
from tests.support.waiting import LOOPBACK_TIMEOUT as TIMEOUT


@pytest.fixture
def clients() -> Any:
    """Factory of bare :class:`Device` clients (MQTT 3.1.1, clean session unless told);
    every client is closed at teardown."""
    made: list[Device] = []

    def make(*args: Any, **kwargs: Any) -> Device:
        client = Device.bare(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _roundtrip(make: Any, host: str, port: int, protocol: Literal["3.1.1", "5"]) -> None:
    """QoS 1 pub/sub and a retained message, as every broker must do them."""
    sub = make(host, port, protocol=protocol).connect()
    assert sub.subscribe("rig/+/x", qos=1) == [1]  # granted QoS 1
    pub = make(host, port, protocol=protocol).connect()
    pub.publish("rig/a/x", b"hello", qos=1)
    msg, _ = sub.wait_for("rig/a/x")
    assert (msg.payload, msg.qos, msg.retain) == (b"hello", 1, False)

    pub.publish("rig/retained", b"status", qos=1, retain=True)
    late = make(host, port, protocol=protocol).connect()
    late.subscribe("rig/retained", qos=1)
    msg, _ = late.wait_for("rig/retained")
    assert msg.payload == b"status" and msg.retain


# ============================================================================ amqtt


def test_amqtt_pubsub_qos1_and_retained(amqtt_broker: EmbeddedBroker, clients: Any) -> None:
    _roundtrip(clients, amqtt_broker.host, amqtt_broker.port, "3.1.1")


def test_amqtt_keeps_persistent_sessions(amqtt_broker: EmbeddedBroker, clients: Any) -> None:
    """Our auth plugin keeps clean_session=False sessions (stock amqtt would not)."""
    host, port = amqtt_broker.host, amqtt_broker.port
    dev = clients(host, port, "persistent-dev", clean=False).connect()
    dev.subscribe("llm/reply/persistent-dev/#", qos=1)
    dev.close()
    pub = clients(host, port).connect()
    pub.publish("llm/reply/persistent-dev/r1", b"queued while offline", qos=1)
    # Same session again: the message queued while it was away is delivered...
    again = clients(host, port, "persistent-dev", clean=False)
    rc, present = again.try_connect()
    assert not rc.is_failure and present
    msg, _ = again.wait_for("llm/reply/persistent-dev/r1")
    # ...with the retain flag set: an amqtt quirk (the retain flag is no staleness signal).
    assert msg.payload == b"queued while offline" and msg.qos == 1 and msg.retain


def test_amqtt_refuses_mqtt5(amqtt_broker: EmbeddedBroker, clients: Any) -> None:
    rc, _ = clients(amqtt_broker.host, amqtt_broker.port, protocol="5").try_connect()
    assert rc.is_failure and rc.value == 132, rc  # "Unsupported protocol version"


def test_amqtt_quirk_shared_subscription_never_matches(
    amqtt_broker: EmbeddedBroker, clients: Any
) -> None:
    """Pin the amqtt 0.12 behaviour the bridge must cope with (see embedded_broker.py).

    If this fails after an amqtt upgrade, the quirk is gone: update the docs.
    """
    host, port = amqtt_broker.host, amqtt_broker.port
    # A $share filter is accepted but is a literal filter: it never matches.
    shared = clients(host, port).connect()
    assert shared.subscribe("$share/g/llm/request/+", qos=1) == [1]
    shared.subscribe("marker", qos=1)
    device = clients(host, port).connect()
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
        first = clients("127.0.0.1", port, "same-id", clean=False).connect()
        first.subscribe("a/#", qos=1)
        first.close()
        pub = clients("127.0.0.1", port).connect()
        pub.publish("a/queued", b"1", qos=1)
        retrying_v5.connect("127.0.0.1", port)
        retrying_v5.loop_start()
        again = clients("127.0.0.1", port, "same-id", clean=False).connect()
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
    watcher = clients(host, port).connect()
    watcher.subscribe("llm/status/#", qos=1)
    bridge = clients(host, port)
    bridge.client.will_set("llm/status/b9", b'{"state":"offline"}', qos=1, retain=True)
    bridge.connect()
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
    dev.connect()
    dev.subscribe("llm/reply/dev-persist/#", qos=1)
    dev.close()

    pub = clients(host, port, protocol=protocol).connect()
    pub.publish("llm/reply/dev-persist/r1", b"survives", qos=1)
    pub.close()

    pid = mosquitto.pid
    mosquitto.restart()  # SIGTERM: Mosquitto writes its database on the way out
    assert mosquitto.pid != pid and mosquitto.port == port

    again = clients(
        host, port, "dev-persist", protocol=protocol, clean=False, session_expiry=expiry
    )
    rc, present = again.try_connect()
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
    clients(host, port).connect()

    mosquitto.kill()
    with pytest.raises(OSError):
        wait_for_port(host, port, deadline=0.2)  # nothing listens any more
    mosquitto.restart()
    clients(host, port).connect()


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
) -> Device:
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
    rc, _ = _secure(clients, mosquitto_secure, None).try_connect()
    assert rc.is_failure, "anonymous client accepted"
    rc, _ = _secure(clients, mosquitto_secure, "dev-a", "wrong").try_connect()
    assert rc.is_failure, "wrong password accepted"
    rc, _ = _secure(clients, mosquitto_secure, "dev-a", protocol="3.1.1").try_connect()
    assert not rc.is_failure


def test_secure_plaintext_listener_has_the_same_auth(
    mosquitto_secure: MosquittoProcess, clients: Any
) -> None:
    host, port = mosquitto_secure.host, mosquitto_secure.plain_port
    rc, _ = clients(host, port).try_connect()
    assert rc.is_failure
    clients(host, port, username="bridge@1", password=SECURE_USERS["bridge@1"]).connect()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_device_cannot_ask_in_another_devices_name(
    mosquitto_secure: MosquittoProcess, clients: Any, protocol: Literal["3.1.1", "5"]
) -> None:
    bridge = _secure(clients, mosquitto_secure, "bridge@1").connect()
    bridge.subscribe("llm/request/+", qos=1)
    bridge.subscribe("llm/cancel/+", qos=1)
    dev_a = _secure(clients, mosquitto_secure, "dev-a", protocol=protocol).connect()

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
    dev_a = _secure(clients, mosquitto_secure, "dev-a", protocol=protocol).connect()
    # Mosquitto grants the wildcard subscription; the ACL is applied per message.
    dev_a.subscribe("llm/reply/#", qos=1)
    dev_a.subscribe("llm/reply/dev-b/#", qos=1)
    bridge = _secure(clients, mosquitto_secure, "bridge@1").connect()
    bridge.publish("llm/reply/dev-b/x", b"secret", qos=1)
    bridge.publish("llm/reply/dev-a/r1", b"yours", qos=1)  # marker, same connection

    msg, before = dev_a.wait_for("llm/reply/dev-a/r1")
    assert msg.payload == b"yours"
    assert [m.topic for m in before] == [], "dev-a read dev-b's reply"


def test_device_reads_status_and_cannot_write_it(
    mosquitto_secure: MosquittoProcess, clients: Any
) -> None:
    bridge = _secure(clients, mosquitto_secure, "bridge@1").connect()
    bridge.subscribe("llm/status/#", qos=1)
    dev_a = _secure(clients, mosquitto_secure, "dev-a").connect()
    dev_a.publish("llm/status/bridge-1", b'{"state":"offline"}', qos=1, retain=True)  # denied
    bridge.publish("llm/status/bridge-1", b'{"state":"online"}', qos=1, retain=True)
    msg, before = bridge.wait_for("llm/status/bridge-1")
    assert msg.payload == b'{"state":"online"}' and before == []

    late = _secure(clients, mosquitto_secure, "dev-b").connect()
    late.subscribe("llm/status/#", qos=1)
    msg, _ = late.wait_for("llm/status/bridge-1")
    assert msg.payload == b'{"state":"online"}' and msg.retain


def test_bridge_accounts_read_requests_and_write_replies(
    mosquitto_secure: MosquittoProcess, clients: Any
) -> None:
    bridge = _secure(clients, mosquitto_secure, "bridge@1").connect()
    bridge.subscribe("llm/request/+", qos=1)
    dev_a = _secure(clients, mosquitto_secure, "dev-a").connect()
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
    b1 = _secure(clients, mosquitto_secure, "bridge@1").connect()
    b2 = _secure(clients, mosquitto_secure, "bridge@2").connect()
    for b in (b1, b2):
        codes = b.subscribe("$share/bridges/llm/request/+", qos=1)
        assert not codes[0].is_failure, codes
        b.subscribe("llm/cancel/+", qos=1)  # not shared: both get the marker
    dev_a = _secure(clients, mosquitto_secure, "dev-a").connect()
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
