"""The shipped Mosquitto ACL with the real bridge: a device can ask only as itself and read
only its own replies. Devices use TLS + passwords; the bridge its own account."""

from __future__ import annotations

import json
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.protocol.messages import TERMINAL_TYPES, decode_reply
from tests.support.bridge_proc import running_bridge
from tests.support.processes import MosquittoProcess
from tests.support.recorder import check_reply_stream

TIMEOUT = 120.0
ACK_TIMEOUT = 10.0


class RawDevice:
    """A device as a bare paho client (MQTT 5, TLS, its own account): no client-side
    filtering, so every message the broker delivers to it is kept and can be checked.

    The secure listener sets ``use_username_as_clientid``: the client id is ``name``.
    """

    def __init__(self, broker: MosquittoProcess, name: str) -> None:
        info = broker.info("5", name, tls=True)
        self.name = name
        self.received: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._acks: dict[int, Any] = {}  # mid -> SUBACK reason codes or PUBACK reason code
        self._connack: list[Any] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(name, info.password)
        self.client.tls_set(ca_certs=str(broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.connect(info.host, info.port, keepalive=30)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self._connack, ACK_TIMEOUT), f"{name}: no CONNACK"
        assert not self._connack[0].is_failure, f"{name}: refused: {self._connack[0]}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        with self._cond:
            self._connack.append(reason)
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any,
                      props: Any) -> None:
        with self._cond:
            self._acks[mid] = list(codes)
            self._cond.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    props: Any) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _ack(self, mid: int | None) -> Any:
        assert mid is not None
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, ACK_TIMEOUT), \
                f"{self.name}: no acknowledgement of packet {mid}"
            return self._acks.pop(mid)

    def subscribe(self, topic: str) -> list[Any]:
        """Subscribe at QoS 1; returns the SUBACK's reason codes."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(rc)
        codes: list[Any] = self._ack(mid)
        return codes

    def publish(self, topic: str, payload: dict[str, Any]) -> Any:
        """Publish at QoS 1; returns the PUBACK's reason code."""
        info = self.client.publish(topic, json.dumps(payload), qos=1)
        return self._ack(info.mid)

    def ask(self, request: dict[str, Any]) -> list[Any]:
        """Publish a request as this device and wait for its terminal message.

        Returns:
            The request's reply messages, decoded, as received.
        """
        reason = self.publish(f"llm/request/{self.name}", request)
        assert not reason.is_failure, f"{self.name} may not ask as itself: {reason}"
        topic = f"llm/reply/{self.name}/{request['id']}"

        def ended() -> bool:
            return any(t == topic and decode_reply(p).type in TERMINAL_TYPES
                       for t, p in self.received)

        with self._cond:
            assert self._cond.wait_for(ended, TIMEOUT), f"no terminal message on {topic}"
            return [decode_reply(p) for t, p in self.received if t == topic]

    def topics(self) -> set[str]:
        with self._cond:
            return {t for t, _ in self.received}


def test_devices_can_only_ask_as_themselves_and_read_their_own_replies(
    mosquitto_secure: MosquittoProcess, llama_server: str
) -> None:
    bridge_login = mosquitto_secure.info("5", "bridge@1")
    with running_bridge(bridge_login.host, bridge_login.port, [llama_server], protocol="5",
                        bridge_id="bridge-1", mqtt={"username": "bridge@1",
                                                    "password": bridge_login.password}) as bridge:
        dev_a, dev_b = RawDevice(mosquitto_secure, "dev-a"), RawDevice(mosquitto_secure, "dev-b")
        try:
            # Both subscribe to every reply topic and the broker grants it (QoS 1): what
            # keeps the other device's replies away is the read ACL at delivery time.
            granted = {d.name: [c.value for c in d.subscribe("llm/reply/#")]
                       for d in (dev_a, dev_b)}

            # dev-a forges a request in dev-b's name: the broker refuses it (PUBACK "not
            # authorized" at v5) and drops it, so the bridge never sees it.
            forged = dev_a.publish("llm/request/dev-b",
                                   {"id": "forged", "prompt": "x", "max_tokens": 4})

            # The bridge publishes b1, then a1, then b2, each after the previous one ended,
            # and Mosquitto delivers one publisher's messages to a subscriber in order:
            # when a1 has ended at dev-a, a leak of b1 would have arrived there already,
            # and when b2 has ended at dev-b, so would a leak of a1 (or of the forgery).
            b1 = dev_b.ask({"id": "b1", "prompt": "Hello", "max_tokens": 8})
            a1 = dev_a.ask({"id": "a1", "prompt": "Hello", "max_tokens": 8})
            b2 = dev_b.ask({"id": "b2", "prompt": "Hi", "max_tokens": 2})
            seen_by_a, seen_by_b = dev_a.topics(), dev_b.topics()
        finally:
            dev_a.close()
            dev_b.close()
        accepted = bridge.stats["accepted"]

    assert granted == {"dev-a": [1], "dev-b": [1]}, granted
    assert forged.is_failure and forged.value == 0x87, f"forged request: PUBACK {forged}"
    assert accepted == 3, "the forged request reached the bridge"
    for msgs in (b1, a1, b2):
        check_reply_stream(msgs)
        assert msgs[-1].type == "done", msgs[-1]
    # each device received its own replies through llm/reply/# ...
    assert seen_by_a == {"llm/reply/dev-a/a1"}, seen_by_a
    # ... and none of the other's (nor anything the forgery could have caused)
    assert seen_by_b == {"llm/reply/dev-b/b1", "llm/reply/dev-b/b2"}, seen_by_b


def test_bridge_account_cannot_be_used_without_password(
    mosquitto_secure: MosquittoProcess, llama_server: str
) -> None:
    info: Any = mosquitto_secure.info("5", "bridge@1")
    try:
        with running_bridge(info.host, info.port, [llama_server], protocol="5",
                            mqtt={"username": "bridge@1", "password": "wrong",
                                  "connect_timeout_s": 5}):
            raise AssertionError("the bridge connected with a wrong password")
    except ConnectionError as exc:
        assert "refused" in str(exc)
