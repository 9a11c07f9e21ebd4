"""The local broker's WebSocket listener for the page, on its own (no bridge): who may
connect, on which addresses, what a taken port says -- Mosquitto and amqtt.

Mosquitto 2.0.11 binds a websockets listener on every interface whatever its address,
so the generated one takes a password made for the run; amqtt binds the address given.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from bridge.mqtt.brokers.amqtt import EmbeddedBroker
from bridge.mqtt.brokers.local import EmbeddedMosquitto, LocalBrokerError, describe
from tests.support.local_broker import non_loopback_ipv4, require_mosquitto
from tests.support.waiting import LOOPBACK_TIMEOUT


class WsClient:
    """A paho client over WebSockets that records its CONNACK and the messages it gets."""

    def __init__(self, host: str, port: int, protocol: MQTTProtocolVersion,
                 account: tuple[str, str] | None = None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, transport="websockets",
                                  protocol=protocol, client_id=f"ws-test-{id(self)}")
        if account is not None:
            self.client.username_pw_set(*account)
        self.connack = threading.Event()
        self.reason: ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.got = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        self.reason = reason
        self.connack.set()
        if not reason.is_failure:
            client.subscribe("llm/status/+", qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.got:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.got.notify_all()

    def accepted(self) -> bool:
        assert self.connack.wait(LOOPBACK_TIMEOUT), "no CONNACK"
        assert self.reason is not None
        return not self.reason.is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mosquitto_ws() -> Iterator[EmbeddedMosquitto]:
    """The local Mosquitto with a WebSocket listener; folder in /tmp, as for ``run``."""
    with EmbeddedMosquitto(require_mosquitto(), port=0, ws_port=0) as broker:
        yield broker


def publish_status(port: int, payload: bytes) -> None:
    """Publish a retained ``llm/status/b1`` over plain TCP, as the bridge does."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish("llm/status/b1", payload, qos=1, retain=True).wait_for_publish(
            LOOPBACK_TIMEOUT)
    finally:
        client.disconnect()
        client.loop_stop()


def test_mosquitto_ws_listener_needs_the_runs_password(mosquitto_ws: EmbeddedMosquitto) -> None:
    assert mosquitto_ws.folder is not None and mosquitto_ws.ws_port
    conf = (mosquitto_ws.folder / "mosquitto.conf").read_text()
    assert f"listener {mosquitto_ws.ws_port} 127.0.0.1\nprotocol websockets\n" \
           "allow_anonymous false\npassword_file passwd\n" in conf
    assert "per_listener_settings true" in conf
    account = mosquitto_ws.ws_account
    assert account is not None and account[0] == "web"
    assert account[1] not in (mosquitto_ws.folder / "passwd").read_text()  # a hash only
    assert (mosquitto_ws.folder / "passwd").stat().st_mode & 0o077 == 0

    publish_status(mosquitto_ws.port, b'{"state":"online"}')  # TCP stays anonymous
    addresses = ["127.0.0.1", *non_loopback_ipv4()]  # 2.0.11 listens on all of them
    for address in addresses:
        for tried in (None, ("web", "wrong"), ("other", account[1])):
            refused = WsClient(address, mosquitto_ws.ws_port, paho.MQTTv5, tried)
            try:
                assert not refused.accepted(), (address, tried)
            finally:
                refused.close()
    page = WsClient("127.0.0.1", mosquitto_ws.ws_port, paho.MQTTv5, account)
    try:
        assert page.accepted()
        with page.got:
            assert page.got.wait_for(lambda: page.messages, LOOPBACK_TIMEOUT)
        assert page.messages[0] == ("llm/status/b1", b'{"state":"online"}')
    finally:
        page.close()
    assert "WebSocket on 127.0.0.1:" in describe(mosquitto_ws)


def test_amqtt_ws_listener_is_loopback_only_and_open() -> None:
    with EmbeddedBroker(port=0, ws_port=0) as broker:
        assert broker.ws_port and broker.ws_port != broker.port and broker.ws_account is None
        publish_status(broker.port, b'{"state":"online"}')
        page = WsClient("127.0.0.1", broker.ws_port, paho.MQTTv311)
        try:
            assert page.accepted()
            with page.got:
                assert page.got.wait_for(lambda: page.messages, LOOPBACK_TIMEOUT)
            assert page.messages[0][0] == "llm/status/b1"
        finally:
            page.close()
        for address in non_loopback_ipv4():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, broker.ws_port), LOOPBACK_TIMEOUT).close()
        assert "WebSocket on 127.0.0.1:" in describe(broker)


def test_no_ws_listener_unless_asked(tmp_path: Path) -> None:
    broker = EmbeddedMosquitto(require_mosquitto(), port=0)
    assert broker.ws_port is None and broker.ws_account is None
    assert "websockets" not in broker.config() and "per_listener_settings" not in broker.config()
    assert "listeners" in EmbeddedBroker(port=0).config()
    assert list(EmbeddedBroker(port=0).config()["listeners"]) == ["default"]


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_a_taken_ws_port_names_the_flag(kind: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker: EmbeddedMosquitto | EmbeddedBroker = (
            EmbeddedMosquitto(require_mosquitto(), port=0, ws_port=port) if kind == "mosquitto"
            else EmbeddedBroker(port=0, ws_port=port))
        with pytest.raises(LocalBrokerError, match=rf"port {port} on 127\.0\.0\.1, for its "
                                                   r"WebSocket listener, is already in use\. "
                                                   r"Pick a free one with --ws-port"):
            broker.start()
        broker.stop()
