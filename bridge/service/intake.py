"""Turn one inbound MQTT payload into an accepted request or a typed rejection.

See docs/protocol.md, *Request*, *Limits*.

Pure functions, no I/O: everything a hostile or buggy device can send ends here
as either :class:`Accepted` or :class:`Rejected`, never as an exception. An accepted
request that names a profile gets its defaults here too (:func:`apply_profile`).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from bridge.config.profiles import SAMPLING_FIELDS, Profile
from bridge.config.settings import DeploymentConfig
from bridge.mqtt.link import Inbound
from bridge.protocol import safe_json
from bridge.protocol.address import ReplyAddress
from bridge.protocol.chunks import MIN_CHUNK_BYTES
from bridge.protocol.fit import smallest_payload
from bridge.protocol.messages import BridgeRequest, ChatMessage, ErrorCode
from bridge.protocol.packet import (
    MAX_PACKET,
    packet_bytes,
    packet_payload_room,
    payload_room,
    topic_bytes,
)
from bridge.protocol.topics import is_valid_id

_MAX_ERROR_CHARS = 400
MAX_CORRELATION_BYTES = 256
"""Largest MQTT 5 Correlation Data echoed on replies (a device needs a short token)."""
MIN_REPLY_ROOM = 512
"""Bytes a reply topic must leave free in the largest message the link may publish: room
for an ``error`` with its longest message, or a ``done`` with usage and timings."""


def new_request_id() -> str:
    """A fresh request id for requests that did not name one (16 hex chars)."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid request, with everything resolved that the bridge needs to serve it."""

    client: str
    request: BridgeRequest
    reply: ReplyAddress
    expires_at: float | None
    received_at: float
    chunk_bytes: int
    max_tokens: int

    @property
    def request_id(self) -> str:
        return self.reply.request_id

    @property
    def key(self) -> tuple[str, str]:
        """``(client, request id)``: what names one request on this bridge."""
        return (self.client, self.reply.request_id)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request that gets one ``error`` reply at ``reply`` and is not run."""

    client: str
    reply: ReplyAddress
    code: ErrorCode
    message: str

    @property
    def request_id(self) -> str:
        return self.reply.request_id


def parse_request(
    msg: Inbound, client: str, config: DeploymentConfig, max_payload: int
) -> Accepted | Rejected:
    """Validate one request payload published on ``P/request/{client}``.

    Args:
        msg: the inbound message (payload untrusted).
        client: the ``{client}`` level of its topic, already validated.
        config: limits and defaults.
        max_payload: the largest message the MQTT link may publish now.
    Returns:
        :class:`Accepted`, or :class:`Rejected` whose message names the problem.
    """
    topics = config.topics
    fallback_id = new_request_id()
    # A valid MQTT 5 Response Topic is where the device listens: errors go there too.
    # One the broker would refuse (too deep, say) gets the error on the default topic.
    response_problem = None if msg.response_topic is None else \
        topics.response_topic_problem(client, msg.response_topic) or \
        _room_problem(msg.response_topic, max_payload)
    response_ok = msg.response_topic is not None and response_problem is None

    # Every reply echoes the Correlation Data: a large one would make each reply exceed a
    # small broker's Maximum Packet Size (and paho then reconnects and resends forever).
    correlation = msg.correlation_data
    oversized_correlation = correlation is not None and len(correlation) > MAX_CORRELATION_BYTES

    # The device's bound, as far as it is known: a request that cannot be read is answered
    # within the deployment's default, one whose max_packet can be read within its own.
    max_packet = config.device.max_packet

    def reject(code: ErrorCode, message: str, request_id: str = fallback_id) -> Rejected:
        topic = msg.response_topic if response_ok and msg.response_topic else \
            topics.reply(client, request_id)
        echoed = None if oversized_correlation else correlation
        room = None if max_packet is None else packet_payload_room(max_packet, topic, echoed)
        return Rejected(client, ReplyAddress(topic, request_id, echoed, room),
                        code, message[:_MAX_ERROR_CHARS])

    if oversized_correlation:
        return reject(ErrorCode.too_large,
                      f"MQTT 5 Correlation Data of {len(correlation or b'')} bytes; the limit is "
                      f"{MAX_CORRELATION_BYTES} bytes: send a short token")

    size = len(msg.payload)
    if size > config.max_request_bytes:
        return reject(ErrorCode.too_large,
                      f"request is {size} bytes; the limit is {config.max_request_bytes} bytes "
                      "(max_request_bytes): shorten the conversation or use 'session'")
    try:
        text = msg.payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject(ErrorCode.bad_request,
                      f"payload is not valid UTF-8 (bad byte at offset {exc.start}): "
                      "send UTF-8 text or a JSON object")
    stripped = text.strip()
    if not stripped:
        return reject(ErrorCode.bad_request, "empty request: send text or a JSON object")

    data: dict[str, Any]
    if stripped.startswith("{"):
        try:
            parsed = safe_json.loads(stripped)  # depth checked first: see bridge.protocol.safe_json
        except ValueError as exc:
            return reject(ErrorCode.bad_request, f"invalid JSON: {exc}")
        if not isinstance(parsed, dict):  # e.g. '{"a":1} x' never gets here; belt and braces
            return reject(ErrorCode.bad_request, "a JSON request must be an object")
        try:
            # What llama-server will be sent must be JSON: "\ud800" escapes decode to lone
            # surrogates (not encodable), and json.loads accepts NaN/Infinity (not JSON).
            json.dumps(parsed, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except UnicodeEncodeError:
            return reject(ErrorCode.bad_request, "JSON contains a lone surrogate escape "
                          "(\\ud800-\\udfff without its pair): send valid Unicode")
        except ValueError:
            return reject(ErrorCode.bad_request,
                          "JSON contains NaN or Infinity, which is not JSON: send finite numbers")
        except RecursionError:
            return reject(ErrorCode.bad_request, "JSON is nested too deeply")
        data = parsed
    else:
        data = {"messages": [{"role": "user", "content": text}]}

    raw_id = data.get("id")
    request_id = raw_id if isinstance(raw_id, str) and is_valid_id(raw_id) else fallback_id
    asked_packet = data.get("max_packet")
    if type(asked_packet) is int and 1 <= asked_packet <= MAX_PACKET:
        max_packet = asked_packet
    try:
        request = BridgeRequest.model_validate(data)
    except ValidationError as exc:
        return reject(ErrorCode.bad_request, describe_validation_error(exc), request_id)
    except RecursionError:
        return reject(ErrorCode.bad_request, "JSON is nested too deeply", request_id)

    reply_topic = topics.reply(client, request_id)
    if msg.response_topic is not None:
        if not response_ok:
            return reject(ErrorCode.bad_request,
                          f"Response Topic {msg.response_topic[:100]!r} is not allowed: "
                          f"{response_problem}", request_id)
        reply_topic = msg.response_topic

    room = payload_room(max_payload, reply_topic)
    wanted_chunk = request.chunk_bytes or config.chunk_bytes
    chunk_bytes = max(MIN_CHUNK_BYTES, min(wanted_chunk, config.max_chunk_bytes, room))
    device_room = None
    if max_packet is not None:
        least = packet_bytes(reply_topic, smallest_payload(request_id,
                                                           reasoning=request.reasoning),
                             correlation)
        if max_packet < least:
            return reject(ErrorCode.bad_request,
                          f"max_packet>={least}: {max_packet} is too small for the replies "
                          f"on {reply_topic!r}; raise the device's MQTT buffer or use a "
                          "shorter client name, id or Correlation Data", request_id)
        device_room = packet_payload_room(max_packet, reply_topic, correlation)
        chunk_bytes = min(chunk_bytes, device_room)
    max_tokens = min(request.max_tokens or config.max_tokens_default, config.max_tokens_cap)
    return Accepted(client, request,
                    ReplyAddress(reply_topic, request_id, correlation, device_room),
                    msg.expires_at, msg.received_at, chunk_bytes, max_tokens)


def _room_problem(topic: str, max_payload: int) -> str | None:
    """Why ``topic`` leaves too little of a reply message for the message itself, or None."""
    if payload_room(max_payload, topic) >= MIN_REPLY_ROOM:
        return None
    return (f"it takes {topic_bytes(topic)} of the {max_payload} bytes a reply message may have "
            f"(max_message_bytes or the broker's Maximum Packet Size) and {MIN_REPLY_ROOM} "
            "must stay free for the message")


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each offending field and what is wrong with it
    (``temperature: Input should be …; unknown field 'x'``)."""
    parts: list[str] = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "request"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{where}'")
        else:
            parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    suffix = f" (and {more} more)" if more > 0 else ""
    # The field comes first: a device with a small max_packet gets the message cut to
    # its first clause (bridge.protocol.fit), which then still names the field.
    return "; ".join(parts) + suffix


def apply_profile(acc: Accepted, profile: Profile, max_tokens_cap: int) -> Accepted:
    """The request with ``profile``'s defaults filled in (the request's own fields win).

    Applied once, when the request is accepted, so a request keeps the profile it
    started with when the profiles are reloaded (``SIGHUP``) while it is queued or running.

    - ``system``: prepended as a system message to a chat request that has none
      (a ``prompt`` completion has no roles: it gets only the sampling defaults);
    - ``tools``/``tool_choice``, sampling fields and ``think``: used where the request
      leaves them unset (``tools`` only for chat requests);
    - ``max_tokens``: the default when the request sets none, and an upper bound.

    Returns:
        a new :class:`Accepted` (the original is not changed).
    """
    req = acc.request
    update: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        if getattr(req, name) is None and getattr(profile, name) is not None:
            update[name] = getattr(profile, name)
    if req.think is None and profile.think is not None:
        update["think"] = profile.think
    if req.prompt is None:
        if req.tools is None and profile.tools is not None:
            update["tools"] = profile.tools
            if req.tool_choice is None and profile.tool_choice is not None:
                update["tool_choice"] = profile.tool_choice
        has_system = any(m.role == "system" for m in req.messages or ())
        if profile.system is not None and not has_system and req.messages is not None:
            update["messages"] = [ChatMessage(role="system", content=profile.system),
                                  *req.messages]
    max_tokens = acc.max_tokens
    if profile.max_tokens is not None:
        wanted = req.max_tokens if req.max_tokens is not None else profile.max_tokens
        max_tokens = min(wanted, profile.max_tokens, max_tokens_cap)
    merged: BridgeRequest = req.model_copy(update=update) if update else req
    return dataclasses.replace(acc, request=merged, max_tokens=max_tokens)


def parse_cancel(payload: bytes) -> str | None:
    """The request id of a cancel payload (``{"id": "..."}`` or the bare id), or None."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return None
        found = data.get("id") if isinstance(data, dict) else None
        if not isinstance(found, str):
            return None
        text = found
    return text if is_valid_id(text) else None


__all__ = ["Accepted", "Rejected", "apply_profile", "parse_cancel", "parse_request"]
