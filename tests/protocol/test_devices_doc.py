"""docs/devices.md's table of the smallest ``max_packet`` is what the bridge computes."""

from __future__ import annotations

import re

from bridge.protocol.chunks import smallest_chunk_bytes
from bridge.protocol.fit import smallest_payload
from bridge.protocol.packet import packet_bytes, packet_payload_room
from tests.support.processes import REPO

ROW = re.compile(r"\| (\d+) characters \| (\d+) characters \| (\d+) \| (refused|\d+ B) \| "
                 r"(\d+) B \|")


def text_room(max_packet: int, topic: str, request_id: str) -> int | None:
    """Escaped text a chunk holds at a seq below 1000; None when the bridge refuses."""
    if max_packet < packet_bytes(topic, smallest_payload(request_id), None):
        return None
    envelope = smallest_chunk_bytes(request_id) - 10 - 6  # less the 10-digit seq, 1 char
    return packet_payload_room(max_packet, topic, None) - envelope - 3


def test_smallest_max_packet_table() -> None:
    text = (REPO / "docs" / "devices.md").read_text(encoding="utf-8")
    rows = ROW.findall(text)
    assert len(rows) == 4, rows
    for client_len, id_len, least, at_256, at_1024 in rows:
        client, request_id = "c" * int(client_len), "i" * int(id_len)
        topic = f"llm/reply/{client}/{request_id}"
        assert int(least) == packet_bytes(topic, smallest_payload(request_id), None), rows
        shown_256 = None if at_256 == "refused" else int(at_256.removesuffix(" B"))
        assert shown_256 == text_room(256, topic, request_id)
        assert int(at_1024) == text_room(1024, topic, request_id)
