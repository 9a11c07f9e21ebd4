"""The typed generation API of :class:`~bridge.llama.client.LlamaCppClient`.

Streamed calls return a :class:`~bridge.llama.stream.Stream` of typed deltas
(:class:`TextDelta`, :class:`ReasoningDelta`, :class:`ToolCallDelta`) ending with one
:class:`StreamEnd`; non-streamed calls return a :class:`Generation`. The bridge uses
this API; the text API (:mod:`bridge.llama.text_api`) is a thin layer over it.

Example::

    with client.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=32) as s:
        for delta in s:
            if isinstance(delta, TextDelta):
                print(delta.text, end="")
"""

from __future__ import annotations

from typing import Any

import requests

from bridge.llama.body import Messages, message_dicts, request_body
from bridge.llama.calls import ServerCalls
from bridge.llama.events import Kind
from bridge.llama.http import CallInfo, CancelToken
from bridge.llama.stream import Stream
from bridge.llama.types import Generation
from bridge.protocol.messages import json_text

CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"


class TypedAPI(ServerCalls):
    """Chat and plain completions, streamed (typed deltas) or not (a :class:`Generation`)."""

    def stream_chat(self, messages: Messages, temperature: float | None = None,
                    top_p: float | None = None, max_tokens: int | None = None,
                    tools: list[dict[str, Any]] | None = None,
                    tool_choice: str | dict[str, Any] | None = None, *,
                    cancel_token: CancelToken | None = None, **sampling: Any) -> Stream:
        """Stream a chat answer (``POST /v1/chat/completions``, ``"stream": true``).

        The request is sent on the first ``next()`` (or :meth:`Stream.open`), so the
        returned stream can be cancelled even while llama-server keeps it queued.

        Args:
            messages: OpenAI chat messages, as dicts or pydantic models.
            temperature: sampling temperature.
            top_p: nucleus sampling.
            max_tokens: generation limit.
            tools: OpenAI tool definitions.
            tool_choice: ``"auto"``, ``"none"``, ``"required"`` or a function choice.
            cancel_token: cancel through this token instead of :meth:`Stream.cancel`.
            **sampling: further body fields, sent as is (``seed``, ``top_k``, ``min_p``,
                ``stop``, ``repeat_penalty``, ``chat_template_kwargs``, ``model``...);
                ``None`` values are left out.

        Returns:
            The stream of deltas, ending with one :class:`StreamEnd`.
        """
        body = request_body("messages", message_dicts(messages), True, temperature, top_p,
                            max_tokens, tools, tool_choice, sampling)
        return self._stream(CHAT_PATH, body, "chat", cancel_token)

    def stream_completion(self, prompt: str, temperature: float | None = None,
                          top_p: float | None = None, max_tokens: int | None = None,
                          tools: list[dict[str, Any]] | None = None,
                          tool_choice: str | dict[str, Any] | None = None, *,
                          cancel_token: CancelToken | None = None, **sampling: Any) -> Stream:
        """Stream a plain completion (``POST /v1/completions``); arguments as
        :meth:`stream_chat` with ``prompt`` instead of ``messages``.

        Returns:
            The stream of deltas, ending with one :class:`StreamEnd`.
        """
        body = request_body("prompt", prompt, True, temperature, top_p, max_tokens, tools,
                            tool_choice, sampling)
        return self._stream(COMPLETION_PATH, body, "completion", cancel_token)

    def chat(self, messages: Messages, temperature: float | None = None,
             top_p: float | None = None, max_tokens: int | None = None,
             tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None, *,
             cancel_token: CancelToken | None = None, **sampling: Any) -> Generation:
        """One non-streamed chat call; arguments as :meth:`stream_chat`.

        The whole answer is the "first byte" here, so ``Timeouts.non_streamed``
        bounds queueing + prompt + generation. Cancel it through ``cancel_token``.

        Returns:
            The answer (content and/or tool calls, finish reason, usage, timings).
        """
        body = request_body("messages", message_dicts(messages), False, temperature, top_p,
                            max_tokens, tools, tool_choice, sampling)
        return self._call(CHAT_PATH, body, "chat", cancel_token)

    def completion(self, prompt: str, temperature: float | None = None,
                   top_p: float | None = None, max_tokens: int | None = None,
                   tools: list[dict[str, Any]] | None = None,
                   tool_choice: str | dict[str, Any] | None = None, *,
                   cancel_token: CancelToken | None = None, **sampling: Any) -> Generation:
        """One non-streamed completion (``POST /v1/completions``); see :meth:`chat`.

        Returns:
            The answer.
        """
        body = request_body("prompt", prompt, False, temperature, top_p, max_tokens, tools,
                            tool_choice, sampling)
        return self._call(COMPLETION_PATH, body, "completion", cancel_token)

    def _stream(self, path: str, body: dict[str, Any], kind: Kind,
                token: CancelToken | None) -> Stream:
        info = CallInfo(self._url(path), token=token or CancelToken())
        payload = json_text(body).encode()

        def opener(call: CallInfo) -> requests.Response:
            return self._post(call, payload, self.timeouts.first_byte, "first_byte")

        return Stream(opener, info, kind, self.timeouts.idle)
