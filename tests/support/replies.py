"""A reply stream as a device received it: de-duplicated by ``seq``, checked for gaps.

QoS 1 may deliver a message twice (same ``seq``, same payload: harmless); a ``seq``
received again with another payload, a gap, a missing or second terminal message are
what the fault scenarios count as lost or duplicated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bridge.protocol.messages import TERMINAL_TYPES


@dataclass
class StreamView:
    """What a device received on one reply topic, de-duplicated by ``seq``."""

    topic: str
    deliveries: int = 0
    by_seq: dict[int, bytes] = field(default_factory=dict)
    conflicts: int = 0  # a seq received again with a different payload

    def add(self, payload: bytes) -> None:
        self.deliveries += 1
        try:
            seq = int(json.loads(payload)["seq"])
        except (ValueError, KeyError, TypeError):
            seq = -1 - self.deliveries  # not a reply message: keep it, it counts as a conflict
            self.conflicts += 1
        old = self.by_seq.get(seq)
        if old is None:
            self.by_seq[seq] = payload
        elif old != payload:
            self.conflicts += 1

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The distinct messages in ``seq`` order."""
        return [json.loads(self.by_seq[s]) for s in sorted(self.by_seq) if s >= 0]

    @property
    def redelivered(self) -> int:
        return self.deliveries - len(self.by_seq) - self.conflicts

    @property
    def terminals(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") in TERMINAL_TYPES]

    @property
    def terminal(self) -> dict[str, Any] | None:
        ends = self.terminals
        return ends[0] if ends else None

    @property
    def missing(self) -> int:
        """Messages known to be missing: ``seq`` gaps, plus one if no terminal arrived."""
        seqs = [s for s in self.by_seq if s >= 0]
        top = max(seqs) if seqs else -1
        gaps = (top + 1) - len(seqs)
        return gaps + (0 if self.terminals else 1)

    @property
    def complete(self) -> bool:
        """``seq`` 0..n without gaps, exactly one terminal message, and it is the last."""
        msgs = self.messages
        return (bool(msgs) and [m["seq"] for m in msgs] == list(range(len(msgs)))
                and len(self.terminals) == 1 and msgs[-1].get("type") in TERMINAL_TYPES
                and self.conflicts == 0)

    @property
    def text(self) -> str:
        return "".join(m.get("text") or "" for m in self.messages if m.get("type") == "chunk")

    def types(self) -> list[str]:
        return [str(m.get("type")) for m in self.messages]
