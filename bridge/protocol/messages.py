"""The wire format, defined once: request payloads and reply messages.

See docs/protocol.md, *Request* and *Reply messages*.

Bridge, client, tests and docs all import these models; nothing else spells the
JSON by hand except the chunker's fast encoder, which is tested against
:class:`ChunkMsg`.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from bridge.protocol.chunks import MIN_CHUNK_BYTES
from bridge.protocol.packet import MAX_PACKET
from bridge.protocol.topics import ID_PATTERN


class ErrorCode(StrEnum):
    """Values of an ``error`` message's ``code`` (docs/protocol.md, *Errors*)."""

    bad_request = "bad_request"
    too_large = "too_large"
    rate_limited = "rate_limited"
    busy = "busy"
    backend_unavailable = "backend_unavailable"
    backend_error = "backend_error"
    timeout = "timeout"
    expired = "expired"
    internal = "internal"


# --------------------------------------------------------------------------- request


class ChatMessage(BaseModel):
    """One OpenAI chat message with text content."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> ChatMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs 'content' (or 'tool_calls' for an assistant)")
        return self


MAX_MESSAGES = 256
"""Most ``messages`` in one request."""
MAX_TOOLS = 128
"""Most ``tools`` in one request or profile."""
MAX_STOP_STRINGS = 16
"""Most ``stop`` strings in one request or profile."""
MAX_MODEL_CHARS = 256
"""Longest ``model`` name."""


Tools = Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)]
"""OpenAI tool definitions, as a request or a profile gives them."""


class Sampling(BaseModel):
    """How llama-server samples the answer and how long the answer may be.

    A request sets these (:class:`BridgeRequest`); a profile may default them
    (:class:`bridge.config.profiles.Profile`). Unset (None) leaves the choice to
    llama-server, or for ``max_tokens`` to the bridge's ``max_tokens_default``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Annotated[float, Field(ge=0, le=5)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = None
    repeat_penalty: Annotated[float, Field(ge=0, le=10)] | None = None

    def sampling(self) -> dict[str, Any]:
        """The llama-server sampling parameters set here (unset ones omitted)."""
        return {n: getattr(self, n) for n in Sampling.model_fields
                if getattr(self, n) is not None}


class _RequestHead(BaseModel):
    """The fields a request lists before its :class:`Sampling` settings.

    A class of its own only to keep :class:`BridgeRequest`'s fields in their wire order:
    pydantic puts a base's fields first, and a ``bad_request`` lists the errors it reports
    in field order.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: Annotated[str, Field(pattern=ID_PATTERN)] | None = None
    messages: Annotated[list[ChatMessage],
                        Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    prompt: str | None = None
    session: Annotated[str, Field(pattern=ID_PATTERN)] | None = None
    clear: bool = False
    profile: Annotated[str, Field(pattern=ID_PATTERN)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_CHARS)] | None = None


class BridgeRequest(Sampling, _RequestHead):
    """A request published by a device on ``P/request/{client}`` as a JSON object.

    A payload whose first non-whitespace character is ``{`` is parsed as JSON and must be
    a valid JSON object of these fields; any other payload (``[1]``, ``"hi"`` or ``hello``
    alike) becomes ``BridgeRequest(messages=[one user message with the payload as text])``
    (:func:`bridge.service.intake.parse_request`). Unknown fields are rejected
    (``extra="forbid"``) so a typo is reported, not ignored.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    tools: Tools | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = True
    chunk_bytes: int | None = None
    max_packet: Annotated[int, Field(ge=1, le=MAX_PACKET)] | None = None
    think: bool | None = None
    reasoning: bool = False

    @field_validator("chunk_bytes")
    @classmethod
    def _chunk_bytes_floor(cls, value: int | None) -> int | None:
        # Below the floor a device could not be served safely: every chunk would exceed
        # the buffer it announced. Above max_chunk_bytes it is lowered (always safe).
        if value is not None and value < MIN_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be at least {MIN_CHUNK_BYTES} (the smallest chunk the "
                f"bridge sends), got {value}; values above the bridge's max_chunk_bytes "
                "are lowered to it")
        return value

    @model_validator(mode="after")
    def _exactly_one_input(self) -> BridgeRequest:
        given = (self.messages is not None) + (self.prompt is not None)
        if given > 1:
            raise ValueError("send exactly one of 'messages' or 'prompt', not both")
        if self.clear:
            if self.session is None:
                raise ValueError("'clear' needs 'session': name the session to clear")
            return self
        if given != 1:
            raise ValueError("send exactly one of 'messages' or 'prompt'")
        if self.prompt is not None and self.tools is not None:
            raise ValueError("'tools' needs 'messages', not 'prompt'")
        return self

    @property
    def wants_single_reply(self) -> bool:
        """``tools`` or ``"stream": false`` ⇒ one non-streamed call and a single ``reply``."""
        return self.tools is not None or not self.stream


# --------------------------------------------------------------------------- replies


class Usage(BaseModel):
    """Token counts as llama-server reports them."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(BaseModel):
    """Times measured by the bridge for one request, in milliseconds, and llama-server's
    prompt cache use: ``cache_n`` prompt tokens reused from the slot's cache, ``prompt_n``
    prompt tokens read anew (present when llama-server reports them)."""

    model_config = ConfigDict(frozen=True)

    queue_ms: float = 0.0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    tokens_per_s: float | None = None
    cache_n: int | None = None
    prompt_n: int | None = None


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    seq: Annotated[int, Field(ge=0)]


class StartMsg(_Reply):
    """The request was accepted: validated and queued or running."""

    type: Literal["start"] = "start"
    model: str | None = None
    queue: int = 0


class ChunkMsg(_Reply):
    """A piece of generated text (``text``) or of reasoning (``reasoning``)."""

    type: Literal["chunk"] = "chunk"
    text: str | None = None
    reasoning: str | None = None


class ProgressMsg(_Reply):
    """Heartbeat: nothing else was sent for ``heartbeat_s``."""

    type: Literal["progress"] = "progress"
    queued_ms: float | None = None
    prompt_progress: dict[str, Any] | None = None


class DoneMsg(_Reply):
    """Terminal: the stream ended."""

    type: Literal["done"] = "done"
    finish_reason: str
    usage: Usage = Usage()
    timings: Timings = Timings()


class ReplyMsg(_Reply):
    """Terminal: the answer of a non-streamed request (``tools`` or ``stream: false``)."""

    type: Literal["reply"] = "reply"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str
    usage: Usage = Usage()
    timings: Timings = Timings()


class ErrorMsg(_Reply):
    """Terminal: the request failed; ``message`` says what to change."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    retryable: bool = False
    retry_after_ms: int | None = None
    backend_type: str | None = None


ReplyMessage = Annotated[
    StartMsg | ChunkMsg | ProgressMsg | DoneMsg | ReplyMsg | ErrorMsg,
    Field(discriminator="type"),
]
"""Any reply message; its ``type`` says which."""
TERMINAL_TYPES = frozenset({"done", "reply", "error"})

_reply_adapter: TypeAdapter[ReplyMessage] = TypeAdapter(ReplyMessage)


def encode(message: BaseModel) -> bytes:
    """Serialise a reply message as compact UTF-8 JSON, leaving out unset optional fields."""
    return message.model_dump_json(exclude_none=True).encode()


def decode_reply(payload: bytes | str) -> ReplyMessage:
    """Parse one reply payload (raises ``pydantic.ValidationError`` if it is not one)."""
    return _reply_adapter.validate_json(payload)


def json_text(value: Any) -> str:
    """Compact JSON as the bridge writes it (UTF-8, not ASCII-escaped)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
