"""The shipped Mosquitto ACL with the real bridge: a device can ask only as itself and read
only its own replies (SPEC §4). Devices use TLS + passwords; the bridge its own account."""

from __future__ import annotations

import json
from typing import Any

from bridge.client import BridgeClient
from bridge.config import MqttSettings
from tests.support.bridge_proc import running_bridge
from tests.support.processes import MosquittoProcess

TIMEOUT = 120.0


def _device(broker: MosquittoProcess, name: str) -> BridgeClient:
    info = broker.info("5", name, tls=True)
    settings = MqttSettings(host=info.host, port=info.port, protocol="5", username=name,
                            password=info.password, tls=True, ca_file=broker.ca_file)
    return BridgeClient(settings, client=name).connect()


def test_devices_can_only_ask_as_themselves_and_read_their_own_replies(
    mosquitto_secure: MosquittoProcess, llama_server: str
) -> None:
    bridge_login = mosquitto_secure.info("5", "bridge@1")
    with running_bridge(bridge_login.host, bridge_login.port, [llama_server], protocol="5",
                        bridge_id="bridge-1", mqtt={"username": "bridge@1",
                                                    "password": bridge_login.password}) as bridge:
        dev_a, dev_b = _device(mosquitto_secure, "dev-a"), _device(mosquitto_secure, "dev-b")
        try:
            dev_b.subscribe("llm/reply/dev-b/#")
            dev_a.subscribe("llm/reply/#")  # granted, but only dev-a's replies are delivered

            # dev-a forges a request in dev-b's name: the broker drops it (PUBACK "not
            # authorized" at v5), so the bridge never sees it.
            forged = {"id": "forged", "prompt": "x", "max_tokens": 4}
            dev_a._mqtt.publish("llm/request/dev-b", json.dumps(forged), qos=1
                                ).wait_for_publish(10)

            # dev-b asks; dev-a must not see any of it even though it subscribed to llm/reply/#
            b_msgs = list(dev_b.ask({"id": "b1", "prompt": "Hello", "max_tokens": 8},
                                    idle_timeout=TIMEOUT))
            # dev-a asks as itself, after the forgery: when its answer is complete, anything
            # the forgery could have caused would have arrived already (one QoS, in order).
            a_msgs = list(dev_a.ask({"id": "a1", "prompt": "Hello", "max_tokens": 8},
                                    idle_timeout=TIMEOUT))
            seen_by_a: list[tuple[str, bytes]] = []
            while (got := dev_a.next_message(timeout=0.2)) is not None:
                seen_by_a.append(got)
            seen_by_b: list[tuple[str, bytes]] = []
            while (got := dev_b.next_message(timeout=0.2)) is not None:
                seen_by_b.append(got)
        finally:
            dev_a.close()
            dev_b.close()
        accepted = bridge.stats["accepted"]

    assert b_msgs[-1].type == "done" and a_msgs[-1].type == "done"
    assert accepted == 2, "the forged request reached the bridge"
    assert all(m.id != "forged" for m in b_msgs)
    assert not any(t.startswith("llm/reply/dev-b/") for t, _ in seen_by_a)
    assert not any(b'"forged"' in p for _, p in seen_by_b)


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
