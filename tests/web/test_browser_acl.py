"""The shipped ACL (``mosquitto/acl``, loaded verbatim) keeps a browser to its own
namespace: a device account over the websockets listener, as the web playground logs in.

The rig's ``secure`` Mosquitto (shipped conf, passwords, the ACL) gets a websockets
listener like the shipped one. Mosquitto 2.0.11 binds it on every interface; only the
rig's test accounts can log in, for the few seconds the test runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.local_broker import require_mosquitto
from tests.support.processes import SECURE_USERS, MosquittoProcess, free_port
from tests.support.waiting import LOOPBACK_TIMEOUT


class Client:
    """A logged-in paho client (TCP or WebSockets) that collects what it receives."""

    def __init__(self, port: int, user: str, *, transport: str = "tcp",
                 protocol: MQTTProtocolVersion = paho.MQTTv5) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=user,
                                  transport=transport, protocol=protocol)  # type: ignore[arg-type]
        self.client.username_pw_set(user, SECURE_USERS[user])
        self.connected = threading.Event()
        self.reason: ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(LOOPBACK_TIMEOUT), f"{user}: no CONNACK"
        assert self.reason is not None and not self.reason.is_failure, self.reason

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        self.reason = reason
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(LOOPBACK_TIMEOUT), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(
            LOOPBACK_TIMEOUT)

    def wait_for(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including ``payload`` (a marker sent last)."""
        with self.cond:
            assert self.cond.wait_for(lambda: any(p == payload for _, p in self.messages),
                                      LOOPBACK_TIMEOUT), f"{payload!r} never arrived"
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[MosquittoProcess, int]]:
    """The ``secure`` Mosquitto plus a websockets listener: (broker, websockets port)."""
    require_mosquitto()
    ws_port = free_port()
    # Appended to the global section, so it opens a listener block before the rig's own.
    listener = f"listener {ws_port} 127.0.0.1\nprotocol websockets\nuse_username_as_clientid true"
    proc = MosquittoProcess(tmp_path / "mosquitto", "secure", extra_conf=listener).start()
    try:
        yield proc, ws_port
    finally:
        proc.stop()


def test_a_browser_account_keeps_to_its_own_namespace(
        broker: tuple[MosquittoProcess, int]) -> None:
    mosquitto, ws_port = broker
    bridge = Client(mosquitto.plain_port, "bridge@1")
    page = Client(ws_port, "dev-a", transport="websockets")
    other_page = Client(ws_port, "dev-b", transport="websockets", protocol=paho.MQTTv311)
    try:
        bridge.publish("llm/status/bridge-1", b'{"state":"online"}', retain=True)
        bridge.subscribe("llm/request/+")
        page.subscribe("llm/status/+")
        page.subscribe("llm/reply/#")  # granted, but only its own replies are delivered

        # It asks in its own name only: the request in dev-b's name never arrives.
        page.publish("llm/request/dev-b", b"forged")
        page.publish("llm/request/dev-a", b"mine")
        got = bridge.wait_for(b"mine")
        assert ("llm/request/dev-a", b"mine") in got
        assert b"forged" not in [p for _, p in got]

        # It reads the bridges' status and its own replies, not another account's.
        bridge.publish("llm/reply/dev-b/q1", b"for dev-b")
        bridge.publish("llm/reply/dev-a/q1", b"for dev-a")
        got = page.wait_for(b"for dev-a")
        assert ("llm/status/bridge-1", b'{"state":"online"}') in got
        assert b"for dev-b" not in [p for _, p in got]

        # It cannot mark a bridge offline (a 3.1.1 browser is not even told).
        other_page.publish("llm/status/bridge-1", b'{"state":"offline"}', retain=True)
        other_page.publish("llm/request/dev-b", b"marker")
        bridge.wait_for(b"marker")  # the denied publish was handled before this one
        page.close()  # a new page of the same account: the retained status is unchanged
        late = Client(ws_port, "dev-a", transport="websockets")
        try:
            late.subscribe("llm/status/+")
            with late.cond:
                assert late.cond.wait_for(lambda: late.messages, LOOPBACK_TIMEOUT)
            assert late.messages == [("llm/status/bridge-1", b'{"state":"online"}')]
        finally:
            late.close()
    finally:
        for client in (bridge, page, other_page):
            client.close()
