"""What fits in one MQTT PUBLISH: the one place that counts a topic against a size limit.

Brokers bound a whole packet (Mosquitto's ``max_packet_size``, a v5 CONNACK's Maximum
Packet Size), not a payload. The bridge therefore bounds *payload plus topic* by
``max_message_bytes`` and keeps :data:`PACKET_OVERHEAD` free for the rest of the packet.
"""

from __future__ import annotations

MAX_PACKET = 268_435_460
"""The largest MQTT packet there is: a 1-byte header, a 4-byte Remaining Length and
268,435,455 bytes (MQTT 3.1.1 and 5, *Remaining Length*)."""

MIN_DEVICE_PACKET = 64
"""Smallest ``[device] max_packet`` a configuration may set; whether a request can be served
within its ``max_packet`` depends on its reply topic and is decided at intake."""

PACKET_OVERHEAD = 5 + 2 + 2 + 400
"""Fixed header + topic length + packet id + a generous allowance for MQTT 5 properties
(content type, Correlation Data up to 256 bytes): what a broker's packet limit must
leave beyond payload and topic."""


def topic_bytes(topic: str) -> int:
    """The topic's size on the wire (UTF-8; lone surrogates counted as a broker would)."""
    return len(topic.encode("utf-8", "surrogatepass"))


def payload_room(max_message_bytes: int, topic: str) -> int:
    """Bytes left for the payload of a message on ``topic``.

    Args:
        max_message_bytes: the bound on payload and topic together.
        topic: the topic the message is published on.

    Returns:
        The largest payload that fits; negative when the topic alone is too long.
    """
    return max_message_bytes - topic_bytes(topic)
