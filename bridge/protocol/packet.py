"""What fits in one MQTT PUBLISH: the one place that counts a message's bytes on the wire.

Two bounds apply to a reply message:

* the **broker's**: brokers bound a whole packet (Mosquitto's ``max_packet_size``, a v5
  CONNACK's Maximum Packet Size), not a payload. The bridge bounds *payload plus topic*
  by ``max_message_bytes`` and keeps :data:`PACKET_OVERHEAD` free for the rest
  (:func:`payload_room`);
* the **device's**: a request's ``max_packet`` is the largest PUBLISH packet the device
  can receive, counted exactly as the broker sends it (:func:`packet_bytes`,
  :func:`packet_payload_room`; docs/protocol.md, *Message size*).
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

REPLY_CONTENT_TYPE = "application/json"
"""The MQTT 5 Content Type of every message the bridge publishes."""

_MAX_REMAINING = 268_435_455  # the largest Remaining Length
_PROPERTY_ID = 1  # each property starts with a one-byte identifier
_BINARY_LENGTH = 2  # UTF-8 strings and binary data carry a two-byte length


def topic_bytes(topic: str) -> int:
    """The topic's size on the wire (UTF-8; lone surrogates counted as a broker would)."""
    return len(topic.encode("utf-8", "surrogatepass"))


def payload_room(max_message_bytes: int, topic: str) -> int:
    """Bytes left for the payload of a message on ``topic`` under the broker's bound.

    Args:
        max_message_bytes: the bound on payload and topic together.
        topic: the topic the message is published on.

    Returns:
        The largest payload that fits; negative when the topic alone is too long.
    """
    return max_message_bytes - topic_bytes(topic)


def varint_bytes(value: int) -> int:
    """Size of ``value`` as an MQTT Variable Byte Integer (1 to 4 bytes).

    Raises:
        ValueError: ``value`` is negative or above 268,435,455.
    """
    if not 0 <= value <= _MAX_REMAINING:
        raise ValueError(f"{value} is not a Variable Byte Integer (0 to 268435455)")
    return 1 if value < 128 else 2 if value < 16_384 else 3 if value < 2_097_152 else 4


def reply_properties_bytes(correlation_data: bytes | None) -> int:
    """Size of the MQTT 5 property section of a reply as a device receives it.

    The bridge sends Content Type and, when the request had one, Correlation Data; the
    broker forwards both. They are counted whatever MQTT version the bridge and the device
    speak, so one ``max_packet`` is safe for either: a 3.1.1 device gets fewer bytes.
    A Subscription Identifier that a v5 device asked for is added by the broker and is
    not counted (docs/protocol.md, *Message size*).
    """
    body = _PROPERTY_ID + _BINARY_LENGTH + len(REPLY_CONTENT_TYPE)
    if correlation_data is not None:
        body += _PROPERTY_ID + _BINARY_LENGTH + len(correlation_data)
    return varint_bytes(body) + body


def packet_bytes(topic: str, payload_len: int, correlation_data: bytes | None) -> int:
    """Size of the PUBLISH packet that carries a reply of ``payload_len`` bytes to a device.

    Fixed header (1 byte and the Remaining Length), topic with its length, a packet id
    (present at QoS 1 and 2; counted always, the device's QoS is not known), the property
    section (:func:`reply_properties_bytes`) and the payload.
    """
    rest = _fixed_rest(topic, correlation_data) + payload_len
    return 1 + varint_bytes(rest) + rest


def _fixed_rest(topic: str, correlation_data: bytes | None) -> int:
    """The Remaining Length of a reply's PUBLISH without its payload."""
    return _BINARY_LENGTH + topic_bytes(topic) + 2 + reply_properties_bytes(correlation_data)


def packet_payload_room(max_packet: int, topic: str, correlation_data: bytes | None) -> int:
    """The largest payload whose PUBLISH packet (:func:`packet_bytes`) is at most ``max_packet``.

    Returns:
        the payload bytes; negative when not even an empty payload fits.
    """
    fixed = _fixed_rest(topic, correlation_data)
    room = min(max_packet - 1 - varint_bytes(fixed) - fixed, _MAX_REMAINING - fixed)
    # A longer Remaining Length takes up to 3 more header bytes: step down until it fits.
    while room > 0 and packet_bytes(topic, room, correlation_data) > max_packet:
        room -= 1
    return room
