"""Sizes on the wire (bridge/protocol/packet.py), checked against the MQTT encoding rules.

The end-to-end check against what a device really receives is
tests/service/test_device_packets.py (a raw socket, every PUBLISH counted).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol.packet import (
    MAX_PACKET,
    REPLY_CONTENT_TYPE,
    packet_bytes,
    packet_payload_room,
    reply_properties_bytes,
    varint_bytes,
)
from tests.support.raw_mqtt import encode_varint


@pytest.mark.parametrize(("value", "size"), [
    (0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4),
    (268_435_455, 4),
])
def test_varint_sizes_at_every_boundary(value: int, size: int) -> None:
    assert varint_bytes(value) == size == len(encode_varint(value))


@pytest.mark.parametrize("value", [-1, 268_435_456])
def test_varint_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match="Variable Byte Integer"):
        varint_bytes(value)


def test_reply_properties_are_content_type_and_correlation_data() -> None:
    content_type = 1 + 2 + len(REPLY_CONTENT_TYPE)
    assert reply_properties_bytes(None) == 1 + content_type
    assert reply_properties_bytes(b"") == 1 + content_type + 3
    assert reply_properties_bytes(b"x" * 16) == 1 + content_type + 3 + 16
    # 256 bytes of Correlation Data make the property section need a 2-byte length
    assert reply_properties_bytes(b"x" * 256) == 2 + content_type + 3 + 256


def test_packet_counts_header_topic_packet_id_properties_and_payload() -> None:
    topic = "llm/reply/dev/r1"
    # 1 header byte, 1 length byte, 2 + topic, 2 packet id, properties, payload
    assert packet_bytes(topic, 50, None) == 1 + 1 + 2 + len(topic) + 2 + 20 + 50
    # the Remaining Length takes a second byte from 128 bytes on
    rest = 2 + len(topic) + 2 + 20
    assert packet_bytes(topic, 127 - rest, None) == 2 + 127
    assert packet_bytes(topic, 128 - rest, None) == 3 + 128


@given(max_packet=st.integers(1, 70_000), topic_len=st.integers(1, 300),
       correlation=st.none() | st.binary(max_size=300))
def test_room_is_the_largest_payload_that_fits(max_packet: int, topic_len: int,
                                                correlation: bytes | None) -> None:
    topic = "t" * topic_len
    room = packet_payload_room(max_packet, topic, correlation)
    if room >= 0:
        assert packet_bytes(topic, room, correlation) <= max_packet
    else:
        assert packet_bytes(topic, 0, correlation) > max_packet
    assert packet_bytes(topic, max(room + 1, 0), correlation) > max_packet or room < 0


def test_room_across_a_remaining_length_step() -> None:
    """Where one more payload byte makes the Remaining Length one byte longer, the packet
    grows by two bytes: the room stops one short of the naive subtraction."""
    topic = "llm/reply/dev/r1"
    fixed = 2 + len(topic) + 2 + 20
    max_packet = 2 + 127 + 1  # the naive room would make Remaining Length 128: 3 + 128 bytes
    room = packet_payload_room(max_packet, topic, None)
    assert room == 127 - fixed
    assert packet_bytes(topic, room, None) == max_packet - 1


def test_the_largest_packet_has_room() -> None:
    assert packet_payload_room(MAX_PACKET, "t", None) > 268_000_000
