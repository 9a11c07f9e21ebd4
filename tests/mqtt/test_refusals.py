"""The two-disconnects rule of bridge/mqtt/refusals.py on a real (unconnected) paho client.

A paho client that is not connected keeps every QoS 1 publish in its session, exactly
as it does for unacknowledged messages when a connection drops: these tests look at the
rule's decisions and at what it drops, without a broker. The broker cases (Mosquitto
refusing a 202-level topic) are in tests/faults/test_hostile_input.py.
"""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.mqtt.refusals import (
    RefusalDetector,
    RefusedStreams,
    delivered,
    drop_messages,
    stream_mids,
)


def _client() -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id="refusals-test",
                       protocol=mqtt.MQTTv5)


def _publish(client: mqtt.Client, topic: str, correlation: bytes | None = None
             ) -> mqtt.MQTTMessageInfo:
    props = Properties(PacketTypes.PUBLISH)
    if correlation is not None:
        props.CorrelationData = correlation
    info = client.publish(topic, b"{}", qos=1, properties=props)
    assert info.rc == mqtt.MQTT_ERR_NO_CONN  # kept for sending after a (re)connect
    return info


def test_oldest_message_at_two_disconnects_with_a_reconnect_between_is_dropped() -> None:
    client = _client()
    poison = _publish(client, "llm/reply/a/1", b"c1")
    same_stream = _publish(client, "llm/reply/a/1", b"c1")
    other_corr = _publish(client, "llm/reply/a/1", b"c2")
    other_topic = _publish(client, "llm/reply/b/2")
    detector = RefusalDetector()

    detector.connected()
    assert detector.disconnected(client) is None  # first time: only a suspect
    detector.connected()
    found = detector.disconnected(client)

    assert found is not None
    key, mids = found
    assert key == ("llm/reply/a/1", b"c1")
    assert mids == [poison.mid, same_stream.mid]
    assert len(client._out_messages) == 4  # nothing dropped while paho may be iterating
    later = _publish(client, "llm/reply/a/1", b"c1")  # e.g. the error that ends the request
    dropped = drop_messages(client, mids)  # what the link does at the next CONNACK
    assert [m.mid for m in dropped] == [poison.mid, same_stream.mid]
    assert sorted(client._out_messages) == sorted([other_corr.mid, other_topic.mid, later.mid])
    assert delivered(poison, 1, 0.0) is False and delivered(same_stream, 1, 0.0) is False
    assert delivered(other_topic, 1, 0.0) is None  # still waiting to be sent


def test_no_drop_without_a_reconnect_between_disconnects() -> None:
    """A broker that cannot be reached at all: the message was never sent again."""
    client = _client()
    _publish(client, "llm/reply/a/1")
    detector = RefusalDetector()
    detector.connected()
    assert detector.disconnected(client) is None
    assert detector.disconnected(client) is None  # no CONNACK in between
    assert len(client._out_messages) == 1


def test_no_drop_when_the_oldest_message_was_acknowledged_in_between() -> None:
    """A broker restart: the resent message got its PUBACK, the next loss is another's."""
    client = _client()
    first = _publish(client, "llm/reply/a/1")
    _publish(client, "llm/reply/a/2")
    detector = RefusalDetector()
    detector.connected()
    assert detector.disconnected(client) is None
    del client._out_messages[first.mid]  # what a PUBACK does
    detector.connected()
    assert detector.disconnected(client) is None
    assert len(client._out_messages) == 1


def test_a_stream_s_messages_are_found_and_dropped_once() -> None:
    client = _client()
    keep = _publish(client, "llm/reply/a/keep")
    gone = _publish(client, "llm/reply/a/gone")
    mids = stream_mids(client, ("llm/reply/a/gone", None))
    assert mids == [gone.mid]
    assert [m.mid for m in drop_messages(client, mids)] == [gone.mid]
    assert drop_messages(client, mids) == []  # already gone (e.g. acknowledged meanwhile)
    assert list(client._out_messages) == [keep.mid]


def test_refused_streams_are_bounded_and_forgettable() -> None:
    refused = RefusedStreams()
    assert not refused.keys
    for i in range(1100):
        refused.add((f"t/{i}", None))
    assert ("t/0", None) not in refused and ("t/1099", None) in refused
    refused.discard(("t/1099", None))
    assert ("t/1099", None) not in refused
