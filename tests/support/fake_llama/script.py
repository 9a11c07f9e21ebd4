"""Scripts: what a scripted server does on one connection, action by action.

A script is a list of actions such as "send SSE headers", "send these bytes",
"stall", "reset"; the builders below write llama-server's events and answers, so a
test states a fault in a line::

    [SSEHeaders(), Send(event(chat_chunk("hi"))), Stall(10)]   # stalls mid-stream
    stream_script(CHAT_PATH, ["Hel", "lo"])                      # a complete stream
    [llama_error(503, "Loading model", "unavailable_error")]     # an error answer

Every wait an action makes is bounded, and the server's ``stop()`` ends it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.support.fake_llama.api import CHAT_PATH, error_body, prompt_tokens, usage

# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Respond:
    """A complete, non-streamed HTTP response.

    ``keep_alive`` leaves the connection open after it (``Connection: keep-alive``);
    otherwise the response says ``Connection: close``.
    """

    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    content_type: str = "application/json"
    keep_alive: bool = False


@dataclass(frozen=True)
class SSEHeaders:
    """Start a streamed response: status line and SSE headers.

    ``chunked`` (as llama-server does) wraps each following :class:`Send` in one HTTP
    chunk; otherwise the body is delimited by closing the connection.
    """

    status: int = 200
    chunked: bool = True
    with_body: tuple[bytes, ...] = ()
    """Body pieces written in the same network write as the headers (each its own
    HTTP chunk when chunked): the client then reads them together with the headers."""


@dataclass(frozen=True)
class Send:
    """Write bytes (one HTTP chunk when chunked) as one network write."""

    data: bytes


@dataclass(frozen=True)
class Pause:
    """Wait ``seconds`` -- the server being slow."""

    seconds: float


@dataclass(frozen=True)
class Stall:
    """Send nothing until the client closes, the server stops or ``max_seconds`` pass."""

    max_seconds: float = 10.0


@dataclass(frozen=True)
class Hold:
    """Wait until the test sets ``gate`` (or ``max_seconds`` pass, or the server stops),
    then go on."""

    gate: threading.Event
    max_seconds: float = 60.0


@dataclass(frozen=True)
class Close:
    """Close gracefully (FIN) without finishing the body (no final chunk)."""


@dataclass(frozen=True)
class Reset:
    """Abort the connection with a TCP RST (SO_LINGER 0)."""


@dataclass(frozen=True)
class CloseOnReuse:
    """After a keep-alive :class:`Respond`: when the client sends its next request on this
    connection, close it unanswered -- a keep-alive connection that the server's idle
    timeout closes just as the client reuses it."""

    max_seconds: float = 60.0


Action = Respond | SSEHeaders | Send | Pause | Stall | Hold | Close | Reset | CloseOnReuse
Script = Sequence[Action]
ScriptFor = Callable[[str, dict[str, Any]], Script]
"""``(path, request body) -> script``: what to play for one generation request."""


# --------------------------------------------------------------------------- events


DONE = b"data: [DONE]\n\n"
PING = b":\n\n"


def event(payload: Any, *, eol: bytes = b"\n") -> bytes:
    """One ``data:`` event carrying ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + eol + eol


def chat_chunk(content: str | None = None, *, finish: str | None = None,
               reasoning: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
               timings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object as llama-server streams it."""
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    chunk: dict[str, Any] = {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "object": "chat.completion.chunk", "id": "chatcmpl-test", "model": "test",
    }
    if timings is not None:
        chunk["timings"] = timings
    return chunk


def completion_chunk(text: str | None = None, *, finish: str | None = None) -> dict[str, Any]:
    """A ``text_completion`` stream object as llama-server sends on ``/v1/completions``."""
    return {"choices": [{"text": text or "", "index": 0, "finish_reason": finish}],
            "object": "text_completion", "id": "cmpl-test", "model": "scripted"}


def usage_chunk(prompt_tokens: int = 3, completion_tokens: int = 2) -> dict[str, Any]:
    """The trailing chunk with empty ``choices`` that ``include_usage`` adds."""
    return {"choices": [], "object": "chat.completion.chunk", "id": "chatcmpl-test",
            "usage": usage(prompt_tokens, completion_tokens),
            "timings": {"predicted_n": completion_tokens}}


def llama_error(status: int, message: str, error_type: str) -> Respond:
    """An error answer in llama-server's format."""
    return Respond(status, error_body(status, message, error_type))


# --------------------------------------------------------------------------- whole answers


DEFAULT_TEXTS = ("Hello", " from", " the", " fake.")


def stream_script(path: str, texts: Sequence[str] = DEFAULT_TEXTS, *, gap_s: float = 0.0,
                  finish: str = "stop", prompt_tokens: int = 3) -> list[Action]:
    """A complete, well-formed stream for ``path`` (chat or completion format): headers, one
    event per text (``gap_s`` apart), the finish event, usage, ``[DONE]``."""
    chat = path == CHAT_PATH
    actions: list[Action] = [SSEHeaders()]
    for text in texts:
        if gap_s:
            actions.append(Pause(gap_s))
        actions.append(Send(event(chat_chunk(text) if chat else completion_chunk(text))))
    end = chat_chunk(finish=finish, timings={"predicted_n": len(texts)}) if chat else \
        completion_chunk(finish=finish)
    return [*actions, Send(event(end)),
            Send(event(usage_chunk(prompt_tokens, completion_tokens=len(texts)))), Send(DONE)]


def held_chat_stream(first_token: threading.Event, next_token: threading.Event, *,
                     max_seconds: float = 60.0) -> list[Action]:
    """A chat stream of "Hello" and " there." that waits for ``first_token`` before its
    first token and for ``next_token`` after it (each at most ``max_seconds``): a backend
    slow to read the prompt, then stalling mid-answer, for as long as a test needs."""
    return [SSEHeaders(), Hold(first_token, max_seconds), Send(event(chat_chunk("Hello"))),
            Hold(next_token, max_seconds), Send(event(chat_chunk(" there."))),
            Send(event(chat_chunk(finish="stop"))), Send(event(usage_chunk(3, 2))), Send(DONE)]


def chat_stream(texts: Sequence[str], finish: str = "stop") -> list[Action]:
    """:func:`stream_script` of a chat request: what one client call reads."""
    return stream_script(CHAT_PATH, texts, finish=finish)


def json_answer(path: str, text: str, *, prompt: int, completion: int,
           tool_calls: list[dict[str, Any]] | None = None) -> Respond:
    """A non-streamed answer for ``path`` (``finish_reason`` ``tool_calls`` if there are any)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if path == CHAT_PATH:
        choice["message"] = {"role": "assistant", "content": text}
        if tool_calls:
            choice["message"]["tool_calls"] = tool_calls
            choice["finish_reason"] = "tool_calls"
    else:
        choice["text"] = text
    return Respond(200, {"choices": [choice], "usage": usage(prompt, completion)})


Pieces = Callable[[dict[str, Any]], Sequence[str]]
ToolCalls = Callable[[dict[str, Any]], list[dict[str, Any]] | None]


def answer_with(pieces: Pieces = lambda body: DEFAULT_TEXTS,
            tool_calls: ToolCalls | None = None) -> ScriptFor:
    """A script per request that answers with ``pieces(body)``: streamed one event per piece,
    or as one JSON answer (with ``tool_calls(body)``, if any, on chat); usage counts the
    prompt with the fake tokenizer.
    """

    def script_for(path: str, body: dict[str, Any]) -> Script:
        texts = list(pieces(body))
        prompt = prompt_tokens(path, body)
        if body.get("stream"):
            return stream_script(path, texts, prompt_tokens=prompt)
        calls = tool_calls(body) if tool_calls is not None else None
        return [json_answer(path, "".join(texts), prompt=prompt, completion=len(texts),
                       tool_calls=calls)]

    return script_for
