"""The text API's answers: typed deltas and results in; text, tool calls and ``debug_info`` out.

A llama-server client has two APIs over one implementation. The *typed* API
(``stream_chat``, ``stream_completion``, ``chat``, ``completion``) yields
:data:`~bridge.llama.types.Delta` values ending in one
:class:`~bridge.llama.types.StreamEnd`, or returns a :class:`~bridge.llama.types.Generation`;
the bridge uses it. The *text* API of the original deployment script
(``generate_stream``, ``generate``, ``complete_stream``, ``complete``) yields ``str``
chunks, returns the text (or the tool calls), and fills a ``debug_info`` dict the caller
passes in. This module is the shaping between the two.

It does no I/O and reads no clock (callers pass ``time.monotonic()`` values), so the
synchronous client (:mod:`bridge.llama.text_api`) and an asyncio client share it. A
streamed call uses it like this::

    answer = StreamedAnswer(backend=base_url, started_at=time.monotonic())
    error = None
    try:
        for delta in stream:                       # or: async for delta in stream
            text = answer.text(delta, time.monotonic())
            if text is not None:
                yield text
    except Exception as exc:
        error = exc
        raise
    finally:
        fill_debug_info(debug_info, answer.debug(time.monotonic(), error=error,
                                                 usage_so_far=stream.usage_so_far()))

and a non-streamed one::

    gen = client.chat(...)                        # timed and guarded the same way
    fill_debug_info(debug_info, generation_debug(gen, base_url, started, ended))
    return generation_answer(gen)

``debug_info`` keys (each one is always set; ``None`` where it does not apply):

- ``backend``: the base URL of the llama-server that answered, e.g. ``http://host:8080``.
- ``finish_reason``: llama-server's reason (``stop``, ``length``, ``tool_calls``...);
  ``None`` if the answer did not end: an error (see ``error``), or the caller stopped
  reading the stream.
- ``usage``: ``{"prompt_tokens", "completion_tokens", "total_tokens"}``; for a stream
  that did not end, what was generated until then.
- ``timings``: llama-server's own ``timings`` object (``prompt_n``, ``prompt_ms``,
  ``predicted_n``, ``predicted_ms``, ``predicted_per_second``...).
- ``ttft_s``: seconds from the call to the first generated token (streams only).
- ``elapsed_s``: seconds from the call to its end (or its failure).
- ``tool_calls``: the tool calls the model made, OpenAI-style (a stream's fragments
  joined).
- ``reasoning``: a reasoning model's thinking (``reasoning_content``).
- ``error``: ``"ExceptionClass: message"`` if the call failed.

Nothing of ``debug_info`` is sent to llama-server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bridge.llama.types import (
    Delta,
    Generation,
    ReasoningDelta,
    StreamEnd,
    TextDelta,
    ToolCallDelta,
)
from bridge.protocol.messages import Usage

__all__ = [
    "DEBUG_KEYS",
    "StreamedAnswer",
    "debug_record",
    "delta_text",
    "error_text",
    "fill_debug_info",
    "generation_answer",
    "generation_debug",
    "generation_text",
    "join_tool_calls",
    "usage_dict",
]

DEBUG_KEYS = ("backend", "finish_reason", "usage", "timings", "ttft_s", "elapsed_s",
              "tool_calls", "reasoning", "error")
"""The keys the text API sets in a caller's ``debug_info`` (see the module doc)."""


def delta_text(delta: Delta) -> str | None:
    """The answer text a delta carries, for ``generate_stream`` to yield.

    Args:
        delta: any delta of a typed stream.

    Returns:
        The text of a non-empty :class:`TextDelta`; None for every other delta
        (reasoning, tool-call fragments, the end), which are not part of the answer text.
    """
    return delta.text if isinstance(delta, TextDelta) and delta.text else None


def join_tool_calls(fragments: Iterable[ToolCallDelta]) -> list[dict[str, Any]]:
    """Whole tool calls from the fragments a stream delivered.

    Fragments with the same ``index`` belong to one call: its ``id`` and function
    ``name`` are the first ones given, its ``arguments`` the concatenation of every
    fragment's, in order.

    Args:
        fragments: the stream's :class:`ToolCallDelta` values, in arrival order.

    Returns:
        OpenAI-style calls, ordered by index:
        ``{"id": ..., "type": "function", "function": {"name": ..., "arguments": "..."}}``
        (the shape :attr:`Generation.tool_calls` has for a non-streamed answer).
    """
    calls: dict[int, dict[str, Any]] = {}
    for fragment in fragments:
        call = calls.setdefault(fragment.index, {
            "id": None, "type": "function", "function": {"name": None, "arguments": ""}})
        function = call["function"]
        if call["id"] is None and fragment.id is not None:
            call["id"] = fragment.id
        if function["name"] is None and fragment.name is not None:
            function["name"] = fragment.name
        if fragment.arguments:
            function["arguments"] += fragment.arguments
    return [calls[index] for index in sorted(calls)]


def generation_answer(gen: Generation) -> str | list[dict[str, Any]]:
    """What ``generate`` returns for a non-streamed chat answer.

    Args:
        gen: the typed answer.

    Returns:
        The tool calls (OpenAI-style dicts, as llama-server sent them) when the model
        made some, else the text (``""`` when there is none).
    """
    if gen.tool_calls:
        return gen.tool_calls
    return generation_text(gen)


def generation_text(gen: Generation) -> str:
    """What ``complete`` returns: the answer's text (``""`` when there is none)."""
    return gen.content or ""


def usage_dict(usage: Usage | None) -> dict[str, int] | None:
    """Token counts as the OpenAI API spells them (with ``total_tokens``); None stays None."""
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def error_text(exc: BaseException) -> str:
    """``"ExceptionClass: message"``: how ``debug_info["error"]`` names a failure."""
    return f"{type(exc).__name__}: {exc}"


def debug_record(backend: str, *, started_at: float, ended_at: float,
                 finish_reason: str | None = None, usage: Usage | None = None,
                 timings: Mapping[str, Any] | None = None,
                 first_token_at: float | None = None,
                 tool_calls: list[dict[str, Any]] | None = None, reasoning: str | None = None,
                 error: BaseException | None = None) -> dict[str, Any]:
    """Everything :data:`DEBUG_KEYS` names, for one call.

    Args:
        backend: the base URL of the llama-server that was called.
        started_at: ``time.monotonic()`` when the call began.
        ended_at: ``time.monotonic()`` when it ended or failed.
        finish_reason: llama-server's reason; None if the answer did not end.
        usage: token counts, if known.
        timings: llama-server's ``timings`` object, if sent.
        first_token_at: ``time.monotonic()`` of the first generated token (streams).
        tool_calls: the tool calls the model made.
        reasoning: the model's thinking.
        error: what the call raised.

    Returns:
        A new dict with exactly the keys of :data:`DEBUG_KEYS`.
    """
    return {
        "backend": backend,
        "finish_reason": finish_reason,
        "usage": usage_dict(usage),
        "timings": dict(timings) if timings is not None else None,
        "ttft_s": first_token_at - started_at if first_token_at is not None else None,
        "elapsed_s": ended_at - started_at,
        "tool_calls": tool_calls or None,
        "reasoning": reasoning or None,
        "error": error_text(error) if error is not None else None,
    }


def generation_debug(gen: Generation | None, backend: str, started_at: float, ended_at: float,
                     error: BaseException | None = None) -> dict[str, Any]:
    """The :func:`debug_record` of a non-streamed call.

    Args:
        gen: the answer; None when the call failed.
        backend: the llama-server base URL.
        started_at: ``time.monotonic()`` when the call began.
        ended_at: ``time.monotonic()`` when it returned or failed.
        error: what the call raised, if it failed.

    Returns:
        The record (``ttft_s`` is None: nothing is streamed).
    """
    if gen is None:
        return debug_record(backend, started_at=started_at, ended_at=ended_at, error=error)
    return debug_record(backend, started_at=started_at, ended_at=ended_at,
                        finish_reason=gen.finish_reason, usage=gen.usage, timings=gen.timings,
                        tool_calls=gen.tool_calls, reasoning=gen.reasoning, error=error)


def fill_debug_info(debug_info: dict[str, Any] | None, record: Mapping[str, Any]) -> None:
    """Put a :func:`debug_record` into the caller's ``debug_info`` (nothing if it is None).

    Only :data:`DEBUG_KEYS` are replaced, all of them, so a dict reused for several calls
    shows the last call alone, and keys the caller put there themselves stay.
    """
    if debug_info is not None:
        debug_info.update((key, record.get(key)) for key in DEBUG_KEYS)


class StreamedAnswer:
    """One streamed answer as the text API sees it: text out, everything else noted.

    Feed it every delta of a typed stream with :meth:`text`; afterwards (however the
    stream ended) :meth:`debug` gives its :func:`debug_record`.

    Args:
        backend: the llama-server base URL.
        started_at: ``time.monotonic()`` when the call began.

    Attributes:
        end: the stream's :class:`StreamEnd`, once it arrived.
        first_token_at: ``time.monotonic()`` of the first generated text, reasoning or
            tool-call delta.
    """

    def __init__(self, backend: str, started_at: float) -> None:
        self.backend = backend
        self.started_at = started_at
        self.end: StreamEnd | None = None
        self.first_token_at: float | None = None
        self._tool_fragments: list[ToolCallDelta] = []
        self._reasoning: list[str] = []

    def text(self, delta: Delta, now: float) -> str | None:
        """The answer text in ``delta`` (see :func:`delta_text`); notes everything else.

        Args:
            delta: the next delta of the stream.
            now: ``time.monotonic()`` when it arrived.

        Returns:
            The text to hand to the caller, or None when the delta carries none.
        """
        if isinstance(delta, StreamEnd):
            self.end = delta
            return None
        if self.first_token_at is None:
            self.first_token_at = now
        if isinstance(delta, ToolCallDelta):
            self._tool_fragments.append(delta)
        elif isinstance(delta, ReasoningDelta):
            self._reasoning.append(delta.text)
        return delta_text(delta)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls streamed so far, joined (see :func:`join_tool_calls`)."""
        return join_tool_calls(self._tool_fragments)

    def debug(self, ended_at: float, *, usage_so_far: Usage | None = None,
              error: BaseException | None = None) -> dict[str, Any]:
        """The :func:`debug_record` of the stream.

        Args:
            ended_at: ``time.monotonic()`` when it ended, failed or was abandoned.
            usage_so_far: the usage to report when the stream did not end (llama-server
                sends usage only in its last event); ignored once the end arrived
                with usage.
            error: what reading the stream raised, if anything.

        Returns:
            The record.
        """
        end = self.end
        usage = end.usage if end is not None and end.usage is not None else usage_so_far
        return debug_record(
            self.backend, started_at=self.started_at, ended_at=ended_at,
            finish_reason=end.finish_reason if end is not None else None, usage=usage,
            timings=end.timings if end is not None else None,
            first_token_at=self.first_token_at, tool_calls=self.tool_calls(),
            reasoning="".join(self._reasoning), error=error)
