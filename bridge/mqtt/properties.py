"""The MQTT 5 properties and options the bridge sends: on CONNECT, on its Will, on
SUBSCRIBE and on every reply.

At MQTT 3.1.1 none of these exist; callers send None (a bare QoS for a subscription).
"""

from __future__ import annotations

import functools
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.protocol.packet import REPLY_CONTENT_TYPE


class _PackedProperties(Properties):  # type: ignore[misc]  # paho is untyped
    """MQTT 5 PUBLISH properties, packed once.

    paho calls ``pack()`` on every send, and ``Properties.pack`` walks every known
    property name (~20 µs); building a ``Properties`` costs as much again. A reply
    stream sends the same properties on every message, so they are built and packed
    once (:func:`publish_properties`) and never changed afterwards.
    """

    _packed: bytes

    def __init__(self, correlation_data: bytes | None) -> None:
        super().__init__(PacketTypes.PUBLISH)
        self.ContentType = REPLY_CONTENT_TYPE
        if correlation_data is not None:
            self.CorrelationData = correlation_data
        # object.__setattr__: Properties.__setattr__ accepts only MQTT property names.
        object.__setattr__(self, "_packed", Properties.pack(self))

    def pack(self) -> bytes:
        return self._packed


@functools.lru_cache(maxsize=1024)
def publish_properties(correlation_data: bytes | None) -> Properties:
    """The (shared, immutable) properties of a reply message with this Correlation Data."""
    return _PackedProperties(correlation_data)


def will_properties(delay_s: int | None) -> Properties:
    """The Will's properties: JSON, published ``delay_s`` after the connection is lost
    (None: at once)."""
    props = Properties(PacketTypes.WILLMESSAGE)
    props.ContentType = REPLY_CONTENT_TYPE
    if delay_s is not None:
        props.WillDelayInterval = delay_s
    return props


def connect_properties(session_expiry_s: int) -> Properties:
    """CONNECT properties: how long the broker keeps the session after a disconnect."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    return props


def subscriptions(filters: list[str], qos: int, *, v5: bool) -> list[tuple[str, Any]]:
    """What ``Client.subscribe`` takes for ``filters``: MQTT 5 options, or bare QoS at 3.1.1.

    At MQTT 5 the broker sends no retained message on (re)subscribing: a request a device
    published with the retain flag would otherwise be run again on every reconnect.
    3.1.1 has no such option.
    """
    if v5:
        options = SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        return [(topic, options) for topic in filters]
    return [(topic, qos) for topic in filters]
