"""Where the reply messages of one request go (docs/protocol.md, *Reply messages*)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReplyAddress:
    """The address every reply message of one request carries.

    Attributes:
        topic: ``P/reply/{client}/{id}``, or the request's MQTT 5 Response Topic.
        request_id: the request's id, in every message's ``id``.
        correlation_data: MQTT 5 Correlation Data echoed on every message (None: none).
        max_payload: the largest payload the device takes on ``topic``, from the request's
            ``max_packet`` (:func:`bridge.protocol.packet.packet_payload_room`); None: the
            device set no bound.
    """

    topic: str
    request_id: str
    correlation_data: bytes | None = None
    max_payload: int | None = None

    @property
    def stream(self) -> tuple[str, bytes | None]:
        """``(topic, correlation_data)``: what tells this reply stream from every other one
        on the broker (a refused message names its stream by these two)."""
        return (self.topic, self.correlation_data)


__all__ = ["ReplyAddress"]
