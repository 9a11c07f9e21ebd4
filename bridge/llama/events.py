r"""llama-server's stream events (OpenAI ``chat.completion.chunk``\s) turned into deltas.

Every token is one JSON object of 150-400 bytes, most of it fields the bridge does
not use (``id``, ``model``, ``created``...): decoding it whole into dicts and walking
them was a quarter of the bridge's CPU in batched mode. The usual event is decoded by
msgspec into the few typed fields that matter, skipping the rest; anything else
(unusual types, malformed JSON, error events) takes the lenient path, plain JSON
checked field by field, which decides every case the typed path declines.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from pydantic import ValidationError

from bridge.llama.failures import stream_error
from bridge.llama.types import (
    Delta,
    Generation,
    ReasoningDelta,
    StreamEnd,
    TextDelta,
    ToolCallDelta,
)
from bridge.protocol import safe_json
from bridge.protocol.errors import BackendProtocolError
from bridge.protocol.messages import Usage

Kind = Literal["chat", "completion"]


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: Any = None
    timings: Any = None
    error: Any = msgspec.UNSET  # present at all: the lenient path reports it


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class EventAccumulator:
    """Turns llama-server's stream events into deltas and remembers how the stream ended.

    Args:
        kind: ``"chat"`` (``delta.content``...) or ``"completion"`` (``text``).
        url: for error messages.
    """

    def __init__(self, kind: Kind, url: str) -> None:
        self.kind = kind
        self.url = url
        self.done = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.timings: dict[str, Any] | None = None

    def event(self, data: str, event: str) -> list[Delta]:
        """The deltas in one event's ``data`` (``event``: the SSE event type).

        Raises:
            BackendStreamError: an error event.
            BackendProtocolError: malformed JSON, or not what llama-server sends.
        """
        # Too deep for msgspec's recursion: the lenient path refuses it as malformed.
        if event == "message" and data[:1] == "{" and not safe_json.too_deep(data):
            try:
                chunk = _decode_chunk(data)
            except msgspec.MsgspecError:
                pass  # unusual types, bad JSON: the lenient path decides
            else:
                if chunk.error is msgspec.UNSET:
                    return self._typed(chunk)
        return self._lenient(data, event)

    def _typed(self, chunk: _Chunk) -> list[Delta]:
        """:meth:`event` for a chunk that decoded into the expected types."""
        if chunk.usage is not None:
            self.usage = parse_usage(chunk.usage, self.url)
        if isinstance(chunk.timings, dict):
            self.timings = chunk.timings
        out: list[Delta] = []
        for choice in chunk.choices or ():
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
            if self.kind == "completion":
                if choice.text:
                    out.append(TextDelta(choice.text))
                continue
            delta = choice.delta
            if delta is None:
                continue
            if delta.reasoning_content:
                out.append(ReasoningDelta(delta.reasoning_content))
            if delta.content:
                out.append(TextDelta(delta.content))
            for call in delta.tool_calls or ():
                if (tool := _tool_call(call, self.url)) is not None:
                    out.append(tool)
        return out

    def _lenient(self, data: str, event: str) -> list[Delta]:
        """:meth:`event` for anything: plain JSON, every field checked by hand."""
        if event == "error":
            raise stream_error(_loads(data, self.url, lenient=True), self.url)
        if data.strip() == "[DONE]":
            self.done = True
            return []
        chunk = _loads(data, self.url)
        if not isinstance(chunk, dict):
            raise BackendProtocolError(
                f"llama-server at {self.url} sent a stream event that is not a JSON object: "
                f"{data[:200]!r}"
            )
        if "error" in chunk:
            raise stream_error(chunk, self.url)
        if chunk.get("usage") is not None:
            self.usage = parse_usage(chunk["usage"], self.url)
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        out: list[Delta] = []
        for choice in self._list(chunk, "choices"):
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
            if self.kind == "completion":
                text = choice.get("text")
                if isinstance(text, str) and text:
                    out.append(TextDelta(text))
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                out.append(ReasoningDelta(reasoning))
            content = delta.get("content")
            if isinstance(content, str) and content:
                out.append(TextDelta(content))
            for call in self._list(delta, "tool_calls"):
                if (tool := _tool_call(call, self.url)) is not None:
                    out.append(tool)
        return out

    def _list(self, obj: dict[str, Any], key: str) -> list[Any]:
        value = obj.get(key) or []
        if not isinstance(value, list):
            raise BackendProtocolError(
                f"llama-server at {self.url} sent a stream event whose {key!r} is not a list: "
                f"{value!r:.200}")
        return value

    def end(self) -> StreamEnd:
        if self.finish_reason is None:
            raise BackendProtocolError(
                f"stream from llama-server at {self.url} was cut off: it ended without a "
                "finish_reason; the server may have crashed or a proxy closed the connection"
            )
        return StreamEnd(self.finish_reason, self.usage, self.timings)


def _tool_call(call: Any, url: str) -> ToolCallDelta | None:
    if not isinstance(call, dict):
        return None
    fn = call.get("function")
    if not isinstance(fn, dict):
        fn = {}
    index = call.get("index", 0)
    if not isinstance(index, int):
        raise BackendProtocolError(
            f"llama-server at {url} sent a tool call without an integer index: {call!r:.200}")
    return ToolCallDelta(index=index, id=_opt_str(call.get("id")), name=_opt_str(fn.get("name")),
                         arguments=_opt_str(fn.get("arguments")))


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _loads(data: str, url: str, *, lenient: bool = False) -> Any:
    try:
        return safe_json.loads(data)
    except ValueError as exc:
        if lenient:
            return data  # an error event's text is still worth reporting as is
        raise BackendProtocolError(
            f"llama-server at {url} sent malformed JSON in a stream event ({exc}): "
            f"{data[:200]!r}"
        ) from exc


def parse_usage(value: Any, url: str) -> Usage:
    """Validate a ``usage`` object (extra counters are ignored)."""
    try:
        return Usage.model_validate(value)
    except ValidationError as exc:
        raise BackendProtocolError(f"llama-server at {url} sent a bad usage object: {exc}") from exc


def parse_generation(body: bytes, kind: Kind, url: str) -> Generation:
    """Decode the JSON answer of a non-streamed call.

    Args:
        body: the response body.
        kind: ``"chat"`` or ``"completion"``.
        url: for error messages.

    Returns:
        The answer.
    """
    payload = _loads(body.decode("utf-8", "replace"), url)
    if isinstance(payload, dict) and "error" in payload:
        raise stream_error(payload, url)
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise BackendProtocolError(f"llama-server at {url} answered without choices: "
                                   f"{body[:200]!r}")
    choice = choices[0]
    if kind == "completion":
        content, tool_calls, reasoning = choice.get("text"), None, None
    else:
        message = choice.get("message") or {}
        content = message.get("content")
        tool_calls = message.get("tool_calls") or None
        reasoning = message.get("reasoning_content") or None
    usage = parse_usage(payload["usage"], url) if payload.get("usage") is not None else None
    timings = payload.get("timings") if isinstance(payload.get("timings"), dict) else None
    return Generation(content=content, tool_calls=tool_calls,
                      finish_reason=str(choice.get("finish_reason") or "stop"),
                      usage=usage, timings=timings, reasoning=reasoning)
