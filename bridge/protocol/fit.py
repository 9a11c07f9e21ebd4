"""Make a reply message fit a device's packet by leaving out what it can do without.

See docs/protocol.md, *Message size*.

A request's ``max_packet`` bounds every message the bridge sends it. ``chunk`` messages are
sized to it by the chunker; every other type is encoded whole and, when it is too large,
loses optional fields in :data:`DROP_ORDER` until it fits. What a device needs to act on
is never dropped: ``type``, ``id``, ``seq``, ``code``, ``finish_reason``, ``retryable`` (and a
``reply``'s ``content`` and ``tool_calls``: the bridge sends too long a content as chunks
first, and too long tool calls as a ``too_large`` error). An ``error``'s ``message`` is
shortened, down to ``""``, before ``retry_after_ms`` goes; a message whose first clause
(before ``": "``) fits whole keeps at least that, so a refusal can say what to change in
a dozen bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from bridge.protocol.chunks import MAX_SEQ, smallest_chunk_bytes
from bridge.protocol.messages import (
    DoneMsg,
    ErrorCode,
    ProgressMsg,
    ReplyMsg,
    StartMsg,
    encode,
    json_text,
)

_SPENT = ("timings.cache_n", "timings.prompt_n", "timings.tokens_per_s", "timings.ttft_ms",
          "timings.queue_ms", "timings.total_ms", "usage.prompt_tokens", "usage.completion_tokens")

DROP_ORDER: Mapping[str, tuple[str, ...]] = {
    "start": ("model", "queue"),
    "progress": ("prompt_progress", "queued_ms"),
    "done": _SPENT,
    "reply": _SPENT,
    "error": ("backend_type", "message", "retry_after_ms"),
}
"""Per message type, the optional fields a message loses, first to last, until it fits.
``a.b`` is field ``b`` of object ``a`` (an object left empty goes too); ``message`` is
shortened (ending in ``…``) before it is emptied."""

FINISH_REASONS = ("stop", "length", "tool_calls", "cancelled", "cleared")
"""Every ``finish_reason`` the bridge sends: the longest sizes the smallest ``done``."""

_ELLIPSIS = "…"


class DoesNotFit(ValueError):
    """Even with every optional field left out, the message exceeds the room it has.

    Attributes:
        smallest: the size of its smallest form, in bytes.
    """

    def __init__(self, message_type: str, smallest: int, room: int) -> None:
        super().__init__(f"the smallest {message_type} message is {smallest} bytes; "
                         f"{room} are available")
        self.smallest = smallest


def fit(message: BaseModel, room: int | None) -> bytes:
    """``message`` encoded, without as few optional fields as it takes to be ``room`` bytes.

    Args:
        message: a reply message (``chunk`` messages are returned as encoded: the chunker
            sizes them).
        room: the largest payload the device takes; None for no bound.
    Returns:
        the payload (``encode(message)`` when it fits as it is: the usual case).
    Raises:
        DoesNotFit: not even its smallest form fits.
    """
    payload = encode(message)
    if room is None or len(payload) <= room:
        return payload
    data: dict[str, Any] = message.model_dump(mode="json", exclude_none=True)
    kind = str(data["type"])
    for path in DROP_ORDER.get(kind, ()):
        if path == "message":
            if _shorten_message(data, room):
                return _dump(data)
            continue
        _drop(data, path)
        payload = _dump(data)
        if len(payload) <= room:
            return payload
    raise DoesNotFit(kind, len(_smallest_form(message)), room)


def smallest_error(request_id: str, seq: int, code: ErrorCode, *, retryable: bool) -> bytes:
    """The smallest ``error`` there is: what a device gets when nothing else fits."""
    return _dump({"type": "error", "id": request_id, "seq": seq, "code": code.value,
                  "message": "", "retryable": retryable})


def smallest_payload(request_id: str, *, reasoning: bool = True) -> int:
    """The payload size every message of a request with this id can be brought down to.

    The largest of: a ``chunk`` with one character (six bytes escaped) of ``text`` (or of
    ``reasoning``, if the request asks for it),
    and ``start``, ``progress``, ``done``, ``reply`` and ``error`` with every optional field
    left out, the longest ``finish_reason`` and ``code``; ``seq`` at :data:`MAX_SEQ`.
    """
    seq = MAX_SEQ
    longest_reason = max(FINISH_REASONS, key=len)
    longest_code = max(ErrorCode, key=lambda c: len(c.value))
    forms: list[BaseModel] = [
        StartMsg(id=request_id, seq=seq),
        ProgressMsg(id=request_id, seq=seq),
        DoneMsg(id=request_id, seq=seq, finish_reason=longest_reason),
        ReplyMsg(id=request_id, seq=seq, finish_reason=longest_reason),
    ]
    return max(smallest_chunk_bytes(request_id, "reasoning" if reasoning else "text"),
               *(len(_smallest_form(form)) for form in forms),
               len(smallest_error(request_id, seq, longest_code, retryable=False)))


def _smallest_form(message: BaseModel) -> bytes:
    """``message`` without any field :data:`DROP_ORDER` lists (``message`` emptied)."""
    data: dict[str, Any] = message.model_dump(mode="json", exclude_none=True)
    for path in DROP_ORDER.get(str(data["type"]), ()):
        if path == "message":
            data["message"] = ""
        else:
            _drop(data, path)
    return _dump(data)


def _dump(data: dict[str, Any]) -> bytes:
    # A lone surrogate in a message (from a backend's error text) cannot be UTF-8; "?" is
    # shorter than the U+FFFD a JSON encoder would write, so the size can only go down.
    return json_text(data).encode("utf-8", "replace")


def _drop(data: dict[str, Any], path: str) -> None:
    parent_name, _, name = path.rpartition(".")
    if not parent_name:
        data.pop(name, None)
        return
    parent = data.get(parent_name)
    if isinstance(parent, dict):
        parent.pop(name, None)
        if not parent:
            del data[parent_name]


def _shorten_message(data: dict[str, Any], room: int) -> bool:
    """Cut ``data["message"]`` to the longest head (with ``…``) that lets ``data`` fit, or to
    its first clause (up to the first ``": "``) when that is as long and fits whole.

    Returns:
        True if it fits now; False with ``message`` emptied if even ``""`` does not.
    """
    text = str(data.get("message", ""))
    lo, hi = 0, len(text)  # the longest fitting head is text[:k] + "…" with lo <= k < hi
    data["message"] = ""
    if len(_dump(data)) > room:
        return False
    while lo < hi:
        mid = (lo + hi + 1) // 2
        data["message"] = text[:mid] + _ELLIPSIS
        if len(_dump(data)) <= room:
            lo = mid
        else:
            hi = mid - 1
    clause = text.split(": ", 1)[0]
    if len(clause) >= lo and clause != text:
        data["message"] = clause  # the gist, whole, rather than a longer cut of the rest
        if len(_dump(data)) <= room:
            return True
    data["message"] = text[:lo] + _ELLIPSIS if lo else ""
    return True


__all__ = ["DROP_ORDER", "FINISH_REASONS", "DoesNotFit", "fit", "smallest_error",
           "smallest_payload"]
