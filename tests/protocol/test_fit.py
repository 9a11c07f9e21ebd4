"""Reply messages made to fit a device's packet (bridge/protocol/fit.py, docs/protocol.md
*Message size*): what is left out, in which order, and what never is."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from bridge.protocol.chunks import MAX_SEQ
from bridge.protocol.fit import (
    DROP_ORDER,
    FINISH_REASONS,
    DoesNotFit,
    fit,
    smallest_error,
    smallest_payload,
)
from bridge.protocol.messages import (
    DoneMsg,
    ErrorCode,
    ErrorMsg,
    ProgressMsg,
    ReplyMsg,
    StartMsg,
    Timings,
    Usage,
    decode_reply,
    encode,
)
from tests.support.processes import REPO

RID = "i" * 32
KEPT = {"type", "id", "seq", "code", "finish_reason", "retryable", "content", "tool_calls"}


def full_messages(seq: int = 57) -> list[BaseModel]:
    """One message of each type with every optional field set, as large as they get."""
    usage = Usage(prompt_tokens=123456, completion_tokens=4096)
    timings = Timings(queue_ms=1234.56, ttft_ms=9876.54, total_ms=123456.78, tokens_per_s=45.67,
                      cache_n=123000, prompt_n=456)
    return [
        StartMsg(id=RID, seq=seq, model="gemma-3-270m-it-Q4_K_M.gguf", queue=12),
        ProgressMsg(id=RID, seq=seq, queued_ms=2500.0,
                    prompt_progress={"total": 900, "cache": 10, "processed": 450,
                                     "time_ms": 1234.5}),
        DoneMsg(id=RID, seq=seq, finish_reason="length", usage=usage, timings=timings),
        ReplyMsg(id=RID, seq=seq, content="short", finish_reason="stop", usage=usage,
                 timings=timings),
        ErrorMsg(id=RID, seq=seq, code=ErrorCode.backend_error,
                 message="llama-server refused the request: " + "details " * 40,
                 retryable=True, retry_after_ms=2000, backend_type="server_error"),
    ]


def fields(payload: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(payload)
    return data


def test_a_message_that_fits_is_sent_as_encoded() -> None:
    for message in full_messages():
        assert fit(message, None) == encode(message)
        assert fit(message, len(encode(message))) == encode(message)


@pytest.mark.parametrize("message", full_messages(), ids=lambda m: m.type)
def test_fields_go_in_the_documented_order_and_the_rest_stays(message: BaseModel) -> None:
    full = fields(encode(message))
    order = DROP_ORDER[full["type"]]
    seen: list[str] = []
    for room in range(len(encode(message)), 0, -1):
        try:
            payload = fit(message, room)
        except DoesNotFit as exc:
            assert exc.smallest == room + 1  # the last size that fitted
            break
        assert len(payload) <= room
        got = fields(payload)
        decode_reply(payload)  # still a valid reply message
        for name in KEPT & set(full):
            assert got[name] == full[name], name
        gone = [path for path in order if path != "message" and not _has(got, path)]
        # what is gone is a prefix of the order (message shortening aside)
        assert gone == [p for p in order if p != "message"][:len(gone)], gone
        if gone and gone[-1] not in seen:
            seen.append(gone[-1])
    else:
        pytest.fail("never stopped fitting")
    assert seen == [p for p in order if p != "message"]


def _has(data: dict[str, Any], path: str) -> bool:
    parent, _, name = path.rpartition(".")
    holder = data.get(parent, {}) if parent else data
    return isinstance(holder, dict) and name in holder


def test_an_error_message_is_shortened_before_retry_after_ms_goes() -> None:
    message = full_messages()[-1]
    assert isinstance(message, ErrorMsg)
    without_type = fields(encode(message))
    del without_type["backend_type"]
    room = len(json.dumps(without_type, separators=(",", ":")).encode()) - 100
    got = fields(fit(message, room))
    assert got["retry_after_ms"] == 2000 and "backend_type" not in got
    assert got["message"].endswith("…")
    assert message.message.startswith(got["message"][:-1])
    assert len(fit(message, room)) > room - 4  # as long as fits: at most one character short


@given(room=st.integers(0, 600), seq=st.integers(0, MAX_SEQ))
def test_fit_returns_a_message_within_room_or_says_it_cannot(room: int, seq: int) -> None:
    for message in full_messages(seq):
        try:
            payload = fit(message, room)
        except DoesNotFit as exc:
            assert exc.smallest > room
        else:
            assert len(payload) <= room


def test_the_smallest_payload_holds_every_type_at_the_largest_seq() -> None:
    least = smallest_payload(RID)
    for message in full_messages(MAX_SEQ):
        if message.__class__ is ReplyMsg:  # content is not left out: sized without it
            message = ReplyMsg(id=RID, seq=MAX_SEQ, finish_reason=max(FINISH_REASONS, key=len),
                               usage=Usage(prompt_tokens=5), timings=Timings(total_ms=3.0))
        assert len(fit(message, least)) <= least
    for code in ErrorCode:
        assert len(smallest_error(RID, MAX_SEQ, code, retryable=False)) <= least
    for reason in FINISH_REASONS:
        assert len(fit(DoneMsg(id=RID, seq=MAX_SEQ, finish_reason=reason), least)) <= least
    # and it is tight: the longest code's smallest error is exactly that size
    assert len(smallest_error(RID, MAX_SEQ, ErrorCode.backend_unavailable,
                              retryable=False)) == least


def test_smallest_error_is_a_valid_error() -> None:
    msg = decode_reply(smallest_error(RID, 3, ErrorCode.internal, retryable=True))
    assert isinstance(msg, ErrorMsg) and msg.message == "" and msg.retryable and msg.seq == 3


def test_the_protocol_documents_the_order() -> None:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text.split("\n## Message size\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, list[str]] = {}
    for line in section.splitlines():
        match = re.match(r"\| `(\w+)` \| (.*) \|$", line)
        if match:
            documented[match[1]] = re.findall(r"`([\w.]+)`", match[2])
    for kind, order in DROP_ORDER.items():
        if kind == "reply":
            assert documented[kind][0] == "done"  # "as `done`", then content and tool_calls
            continue
        assert documented[kind] == list(order), kind
