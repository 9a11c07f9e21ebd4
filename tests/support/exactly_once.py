"""Checks that a request was answered exactly once, as a device received it.

"Exactly once" on the wire: one ``start``, one terminal message and it is the last,
``seq`` 0..n-1 with no duplicate and no gap -- as received, before any
de-duplication (for streams that may legitimately be redelivered, use
:class:`tests.support.replies.StreamView`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge.protocol.messages import TERMINAL_TYPES, decode_reply
from tests.support.device import Device

__all__ = ["assert_exactly_once", "replies_on"]


def assert_exactly_once(replies: Sequence[Any]) -> None:
    """One start, one terminal at the end, seq 0..n-1 with no duplicate or gap.

    Args:
        replies: decoded reply messages of one request, in arrival order.

    Raises:
        AssertionError: naming what was wrong.
    """
    seqs = [r.seq for r in replies]
    assert seqs == list(range(len(replies))), f"seq not 0..n-1 exactly once: {seqs}"
    assert [r.type for r in replies].count("start") == 1, [r.type for r in replies]
    assert sum(r.type in TERMINAL_TYPES for r in replies) == 1, [r.type for r in replies]
    assert replies[-1].type in TERMINAL_TYPES, replies[-1]


def replies_on(device: Device, topic: str) -> list[Any]:
    """The decoded reply messages ``device`` received on ``topic``, in arrival order."""
    with device.cond:
        payloads = list(device.by_topic.get(topic, ()))
    return [decode_reply(p) for p in payloads]
