"""A message the bridge received, as the service layer sees it (no paho types)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message received on a subscribed topic.

    Attributes:
        topic: the topic it arrived on.
        payload: raw bytes, not yet decoded or trusted.
        response_topic: MQTT 5 Response Topic, if set.
        correlation_data: MQTT 5 Correlation Data, echoed on every reply.
        expires_at: ``time.monotonic()`` when its Message Expiry Interval ends, if set.
        received_at: ``time.monotonic()`` at arrival.
    """

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    expires_at: float | None
    received_at: float

    @classmethod
    def of(cls, msg: mqtt.MQTTMessage, *, v5: bool) -> Inbound:
        """The message paho just received (``v5``: read its MQTT 5 properties)."""
        now = time.monotonic()
        response_topic = correlation = expires = None
        props = getattr(msg, "properties", None)
        if v5 and props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
            interval = getattr(props, "MessageExpiryInterval", None)
            if interval is not None:
                expires = now + float(interval)
        return cls(msg.topic, bytes(msg.payload), response_topic, correlation, expires, now)
