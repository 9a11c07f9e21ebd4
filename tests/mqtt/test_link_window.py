"""The MQTT link's publish window at every QoS, against a real Mosquitto.

At QoS 1 and 2 a message leaves the window when the broker acknowledges it; at
QoS 0 when paho has written it to the socket (seen through its MQTTMessageInfo,
not paho's QoS 0 ``on_publish``, which is never called for the messages a
reconnect discards: the window used to leak them and could stay full for good).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bridge.config.settings import load_config
from bridge.mqtt.link import MqttLink, PublishError
from tests.support.device import Device
from tests.support.processes import MosquittoProcess
from tests.support.waiting import poll_until

pytestmark = pytest.mark.timeout(90)

WINDOW = 10  # max_queued: the smallest the configuration allows


def make_link(broker: MosquittoProcess, qos: int) -> MqttLink:
    cfg = load_config(mqtt={"host": broker.host, "port": broker.port, "qos": qos,
                            "max_queued": WINDOW, "protocol": "5"},
                      bridge_id=f"window-q{qos}", max_message_bytes=256 * 1024)
    return MqttLink(cfg, lambda msg: None, will_payload=b"{}",
                    subscriptions=[cfg.topics.cancel_filter()])


@pytest.fixture
def counter(mosquitto: MosquittoProcess) -> Iterator[Device]:
    """A subscriber on ``window/#`` collecting payloads."""
    with Device.bare(mosquitto.host, mosquitto.port, "window-counter") as device:
        device.subscribe("window/#")
        yield device


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_every_message_goes_out_and_the_window_empties(
        mosquitto: MosquittoProcess, counter: Device, qos: int) -> None:
    link = make_link(mosquitto, qos)
    link.start()
    try:
        n = 20 * WINDOW  # passes through the window many times over
        for i in range(n):
            link.publish("window/a", b"%d" % i, deadline=time.monotonic() + 30)
            assert link.outstanding <= WINDOW + 1
        assert counter.wait(lambda d: len(d.received) >= n, 30), \
            f"{len(counter.received)} of {n} arrived"
        assert counter.payloads() == [b"%d" % i for i in range(n)]
        assert poll_until(lambda: link.outstanding, lambda k: k == 0, 10, 0.01) == 0
        assert link.published == n
    finally:
        link.close(b"{}")


@pytest.mark.parametrize("qos", [0, 1])
def test_frozen_broker_fills_the_window_and_a_restart_frees_it(
        mosquitto: MosquittoProcess, qos: int) -> None:
    link = make_link(mosquitto, qos)
    link.start()
    payload = b"x" * (200 * 1024)
    try:
        mosquitto.pause()
        # Socket buffers take megabytes first; then the window fills and a publish
        # that may wait 0.5 s gives up. Bounded: 500 x 200 KiB.
        refused = None
        for _ in range(500):
            try:
                link.publish("window/big", payload, deadline=time.monotonic() + 0.5)
            except PublishError as exc:
                refused = exc
                break
        assert refused is not None, "the window never filled"
        assert "gave up waiting" in str(refused)
        assert WINDOW <= link.outstanding <= WINDOW + 1
        assert not link.has_room()
        # The broker dies with the window full and comes back: at QoS 0 paho discards
        # what it had not written, at QoS 1 it resends it; either way room returns.
        mosquitto.kill()
        mosquitto.restart()
        assert poll_until(lambda: link.connected, bool, 30, 0.05), "no reconnect"
        assert poll_until(lambda: link.outstanding, lambda k: k == 0, 30, 0.05) == 0
        assert link.has_room()
        link.publish("window/after", b"ok", deadline=time.monotonic() + 5)
    finally:
        mosquitto.resume()
        link.close(b"{}")
