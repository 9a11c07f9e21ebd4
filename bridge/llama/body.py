"""The JSON body of a generation request to llama-server (OpenAI-compatible endpoints)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

Messages = Sequence[Mapping[str, Any] | BaseModel]
"""OpenAI chat messages, as dicts or pydantic models."""


def message_dicts(messages: Messages) -> list[dict[str, Any]]:
    """``messages`` as plain dicts (a model's unset fields left out)."""
    return [m.model_dump(exclude_none=True) if isinstance(m, BaseModel) else dict(m)
            for m in messages]


def request_body(key: str, value: Any, stream: bool, temperature: float | None,
                 top_p: float | None, max_tokens: int | None,
                 tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                 sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The body of a chat or completion request.

    Args:
        key: ``"messages"`` (chat) or ``"prompt"`` (completion).
        value: the messages (see :func:`message_dicts`) or the prompt.
        stream: ask for a streamed answer (with usage in its last event).
        temperature: the client method's argument of that name.
        top_p: the client method's argument of that name.
        max_tokens: the client method's argument of that name.
        tools: the client method's argument of that name.
        tool_choice: the client method's argument of that name.
        sampling: further fields, sent as they are.

    Returns:
        The body; fields whose value is ``None`` are left out.
    """
    body: dict[str, Any] = {key: value}
    named = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
             "tools": tools, "tool_choice": tool_choice}
    body.update((k, v) for k, v in {**named, **sampling}.items() if v is not None)
    # Set last: these decide how the answer is read and must not be overridden.
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    else:
        body.pop("stream_options", None)
    return body
