"""A publisher that keeps what it is given: a ``ReplyChannel`` tested without a broker."""

from __future__ import annotations

from dataclasses import dataclass

import paho.mqtt.client as mqtt

from bridge.protocol.messages import ChunkMsg, ReplyMessage, decode_reply


@dataclass(frozen=True)
class Sent:
    """One call of :meth:`RecordingPublisher.publish`."""

    topic: str
    payload: bytes
    correlation_data: bytes | None
    flow_controlled: bool


class RecordingPublisher:
    """The :class:`bridge.service.reply.Publisher` a channel needs, recording every publish."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def publish(self, topic: str, payload: bytes, *, correlation_data: bytes | None = None,
                flow_controlled: bool = True) -> mqtt.MQTTMessageInfo:
        self.sent.append(Sent(topic, payload, correlation_data, flow_controlled))
        return mqtt.MQTTMessageInfo(len(self.sent))

    def has_room(self) -> bool:
        return True

    def messages(self) -> list[ReplyMessage]:
        """The reply messages published so far, decoded."""
        return [decode_reply(s.payload) for s in self.sent]

    def texts(self) -> list[str | None]:
        """The text of each ``chunk`` published so far."""
        return [m.text for m in self.messages() if isinstance(m, ChunkMsg)]
