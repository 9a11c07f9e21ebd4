"""Value types of the llama-server client: settings, stream deltas and results.

Kept apart from :mod:`bridge.llama.client` so that code which only consumes
deltas (the bridge's publisher, tests) imports no HTTP machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from bridge.protocol.messages import Usage


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Timeouts for talking to llama-server, in seconds.

    Attributes:
        connect: opening the TCP connection.
        first_byte: from sending a streamed request to the response headers.
            llama-server queues a request while every slot is busy and sends *nothing*
            (not even headers) until a slot frees and the prompt is processed, so
            this must cover queueing plus prompt processing.
        idle: longest gap between two data events mid-stream. Keep-alive pings
            (``:`` comments) do not count as data: a server that only pings for
            longer than this is considered stuck.
        request: the wait for each read of a small call (``/health``, ``/props``,
            ``/slots``, ``/v1/models``).
        non_streamed: read timeout of a non-streamed call (``chat``, ``completion``,
            and the text API's ``generate``, ``complete``), which receives no byte
            before the whole answer is ready: queueing + prompt + the entire generation.
    """

    connect: float = 5.0
    first_byte: float = 120.0
    idle: float = 60.0
    request: float = 10.0
    non_streamed: float = 300.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"Timeouts.{f.name} must be > 0 seconds")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failures *before the first byte* are retried (exponential backoff + jitter).

    Only connection refused/reset before any response, connect timeouts and HTTP 503
    (model loading) are retried; nothing is retried once a response body is read.

    Attributes:
        attempts: total attempts, including the first (1 disables retries).
        initial_backoff: wait before the second attempt; doubles on each retry.
        max_backoff: cap on one wait.
        jitter: up to this many seconds of random extra wait, so that many bridges
            do not hammer a restarting server in lockstep.
    """

    attempts: int = 3
    initial_backoff: float = 0.25
    max_backoff: float = 4.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.jitter < 0:
            raise ValueError("RetryPolicy backoff and jitter must be >= 0")


# --------------------------------------------------------------------------- deltas


# Not frozen: one is made per token, and a frozen dataclass's __init__ costs twice as
# much (object.__setattr__ per field). Treat it as immutable all the same.
@dataclass(slots=True)
class TextDelta:
    """A piece of generated text (``delta.content``, or ``text`` for completions)."""

    text: str


# Not frozen: one is made per token, and a frozen dataclass's __init__ costs twice as
# much (object.__setattr__ per field). Treat it as immutable all the same.
@dataclass(slots=True)
class ReasoningDelta:
    """A piece of a reasoning model's thinking (``delta.reasoning_content``)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a tool call; fragments with the same ``index`` concatenate.

    Attributes:
        index: which tool call of the answer this fragment belongs to.
        id: the call id (usually only on the first fragment).
        name: the function name (usually only on the first fragment).
        arguments: a piece of the JSON arguments string.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The stream ended normally; always the last delta, exactly once.

    Attributes:
        finish_reason: llama-server's reason (``stop``, ``length``, ``tool_calls``...).
        usage: token counts, when the server sent them.
        timings: llama-server's own ``timings`` object (prompt/predicted ms, rates).
    """

    finish_reason: str
    usage: Usage | None = None
    timings: dict[str, Any] | None = None


Delta = TextDelta | ReasoningDelta | ToolCallDelta | StreamEnd


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Generation:
    """The answer of one non-streamed call.

    Attributes:
        content: the text (``None`` when the model only called tools).
        tool_calls: OpenAI-style tool calls, as llama-server sent them.
        finish_reason: llama-server's reason.
        usage: token counts, when sent.
        timings: llama-server's ``timings`` object, when sent.
        reasoning: a reasoning model's thinking (``reasoning_content``), when sent.
    """

    content: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str
    usage: Usage | None = None
    timings: dict[str, Any] | None = None
    reasoning: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Result of ``GET /health``.

    Attributes:
        ok: the server answers requests (HTTP 200).
        status: the server's ``status`` text (``ok``, ``loading model``...) or the HTTP code.
        http_status: the HTTP status code.
    """

    ok: bool
    status: str
    http_status: int


@dataclass(frozen=True, slots=True)
class Props:
    """The parts of ``GET /props`` the bridge uses.

    Attributes:
        total_slots: parallel sequences the server runs (``--parallel``).
        model: the model alias, else its path, else ``None``.
        n_ctx: context size per slot (``default_generation_settings.n_ctx``), if sent.
        chat_template_caps: what the chat template supports (``supports_tools``...).
        raw: the whole decoded object.
    """

    total_slots: int
    model: str | None
    n_ctx: int | None
    chat_template_caps: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


PROPS_MODEL_KEYS = ("model_alias", "model_path")
"""The ``/props`` fields that name the server's model, the preferred first."""
