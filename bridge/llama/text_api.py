"""The text API of :class:`~bridge.llama.client.LlamaCppClient`, as the original script had it.

``generate_stream`` yields the answer as ``str`` chunks as they arrive, so
``print(chunk, end="")`` prints it; ``generate`` returns the text, or the tool calls
when the model made some; ``complete_stream`` / ``complete`` do the same for a plain
prompt. Each fills an optional ``debug_info`` dict with what happened (see
:mod:`bridge.llama.answers`, which shapes the answers and is shared with an asyncio
client). It is a thin layer over the typed API (:mod:`bridge.llama.typed_api`): the
same requests, timeouts, retries and cancellation.

Example::

    for chunk in client.generate_stream([{"role": "user", "content": "Hi"}]):
        print(chunk, end="", flush=True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from bridge.llama.answers import (
    StreamedAnswer,
    fill_debug_info,
    generation_answer,
    generation_debug,
    generation_text,
)
from bridge.llama.body import Messages
from bridge.llama.http import CancelToken
from bridge.llama.stream import Stream
from bridge.llama.typed_api import TypedAPI
from bridge.llama.types import Generation


class TextAPI(TypedAPI):
    """``generate_stream``, ``generate``, ``complete_stream`` and ``complete``."""

    def generate_stream(self, messages: Messages, temperature: float | None = None,
                        top_p: float | None = None, max_tokens: int | None = None,
                        debug_info: dict[str, Any] | None = None,
                        tools: list[dict[str, Any]] | None = None,
                        tool_choice: str | dict[str, Any] | None = None, *,
                        cancel_token: CancelToken | None = None,
                        **sampling: Any) -> Iterator[str]:
        """Stream a chat answer as text chunks (``POST /v1/chat/completions``).

        The request is sent when iteration starts. Stopping early (``break``, or
        closing the iterator) closes the connection, which frees the llama-server slot.

        Args:
            messages: OpenAI chat messages, as dicts or pydantic models.
            temperature: sampling temperature.
            top_p: nucleus sampling.
            max_tokens: generation limit.
            debug_info: a dict to fill with what happened once the stream ends (or
                fails): backend, finish_reason, usage, timings, ttft_s, elapsed_s,
                tool_calls, reasoning, error (see :mod:`bridge.llama.answers`).
                Never sent to llama-server.
            tools: OpenAI tool definitions; calls the model streams land in
                ``debug_info["tool_calls"]`` (:meth:`generate` returns them).
            tool_choice: ``"auto"``, ``"none"``, ``"required"`` or a function choice.
            cancel_token: cancel from another thread; iteration then raises
                :class:`~bridge.protocol.errors.StreamCancelled`.
            **sampling: further body fields, sent as is (``seed``, ``top_k``, ``stop``...).

        Yields:
            The answer's text, chunk by chunk as llama-server sends it (no empty chunks;
            reasoning and tool-call fragments are not text).

        Raises:
            BackendError: any subclass, as :meth:`stream_chat` would.
        """
        stream = self.stream_chat(messages, temperature, top_p, max_tokens, tools, tool_choice,
                                  cancel_token=cancel_token, **sampling)
        return self._texts(stream, debug_info)

    def complete_stream(self, prompt: str, temperature: float | None = None,
                        top_p: float | None = None, max_tokens: int | None = None,
                        debug_info: dict[str, Any] | None = None, *,
                        cancel_token: CancelToken | None = None,
                        **sampling: Any) -> Iterator[str]:
        """Stream a plain completion of ``prompt`` as text chunks (``POST /v1/completions``);
        arguments and behaviour as :meth:`generate_stream`.

        Yields:
            The completion's text, chunk by chunk.
        """
        stream = self.stream_completion(prompt, temperature, top_p, max_tokens,
                                        cancel_token=cancel_token, **sampling)
        return self._texts(stream, debug_info)

    def generate(self, messages: Messages, temperature: float | None = None,
                 top_p: float | None = None, max_tokens: int | None = None,
                 debug_info: dict[str, Any] | None = None,
                 tools: list[dict[str, Any]] | None = None,
                 tool_choice: str | dict[str, Any] | None = None, *,
                 cancel_token: CancelToken | None = None,
                 **sampling: Any) -> str | list[dict[str, Any]]:
        """One non-streamed chat call; arguments as :meth:`generate_stream`.

        ``Timeouts.non_streamed`` bounds queueing + prompt + the whole generation.

        Returns:
            The tool calls when the model made some (OpenAI-style dicts:
            ``{"id", "type": "function", "function": {"name", "arguments"}}``, the
            arguments a JSON string), else the answer's text.

        Raises:
            BackendError: any subclass, as :meth:`chat` would.
        """
        gen = self._once(debug_info, lambda: self.chat(
            messages, temperature, top_p, max_tokens, tools, tool_choice,
            cancel_token=cancel_token, **sampling))
        return generation_answer(gen)

    def complete(self, prompt: str, temperature: float | None = None,
                 top_p: float | None = None, max_tokens: int | None = None,
                 debug_info: dict[str, Any] | None = None, *,
                 cancel_token: CancelToken | None = None, **sampling: Any) -> str:
        """One non-streamed completion of ``prompt`` (``POST /v1/completions``); arguments
        as :meth:`complete_stream`.

        Returns:
            The completion's text.
        """
        gen = self._once(debug_info, lambda: self.completion(
            prompt, temperature, top_p, max_tokens, cancel_token=cancel_token, **sampling))
        return generation_text(gen)

    # ------------------------------------------------------------------ internals

    def _texts(self, stream: Stream, debug_info: dict[str, Any] | None) -> Iterator[str]:
        """The text of ``stream`` (a generator: nothing is sent before iteration starts)."""
        answer = StreamedAnswer(self.base_url, stream.started_at)
        error: Exception | None = None
        try:
            with stream:
                for delta in stream:
                    text = answer.text(delta, time.monotonic())
                    if text is not None:
                        yield text
        except Exception as exc:
            error = exc
            raise
        finally:
            fill_debug_info(debug_info, answer.debug(
                time.monotonic(), usage_so_far=stream.usage_so_far(), error=error))

    def _once(self, debug_info: dict[str, Any] | None,
              call: Callable[[], Generation]) -> Generation:
        """Run one non-streamed typed call, filling ``debug_info`` however it ends."""
        started = time.monotonic()
        gen: Generation | None = None
        error: Exception | None = None
        try:
            gen = call()
        except Exception as exc:
            error = exc
            raise
        finally:
            fill_debug_info(debug_info, generation_debug(gen, self.base_url, started,
                                                         time.monotonic(), error))
        return gen
