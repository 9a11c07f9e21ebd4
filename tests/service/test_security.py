"""The shipped Mosquitto ACL with the real bridge: a device can ask only as itself and read
only its own replies. Devices use TLS + passwords; the bridge its own account."""

from __future__ import annotations

from typing import Any

from tests.support.bridge_proc import running_bridge
from tests.support.device import Device
from tests.support.processes import MosquittoProcess
from tests.support.recorder import check_reply_stream


def test_devices_can_only_ask_as_themselves_and_read_their_own_replies(
    mosquitto_secure: MosquittoProcess, llama_server: str
) -> None:
    bridge_login = mosquitto_secure.info("5", "bridge@1")
    with running_bridge(bridge_login.host, bridge_login.port, [llama_server], protocol="5",
                        bridge_id="bridge-1", mqtt={"username": "bridge@1",
                                                    "password": bridge_login.password}) as bridge:
        # Bare clients with their own accounts (the secure listener sets
        # use_username_as_clientid): every message the broker delivers is kept.
        dev_a, dev_b = (Device.at(mosquitto_secure.info("5", name, tls=True), name).connect()
                        for name in ("dev-a", "dev-b"))
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
