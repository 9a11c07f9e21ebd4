"""The text API of :class:`~bridge.llama.async_client.AsyncLlamaCppClient`.

The blocking client's text API (:mod:`bridge.llama.text_api`) for asyncio, shaped by
the same code (:mod:`bridge.llama.answers`): ``generate_stream`` gives the answer's
text chunk by chunk as it arrives, ``generate`` the whole text or the tool calls the
model made, ``complete_stream`` / ``complete`` the same for a plain prompt; each fills
an optional ``debug_info`` dict with what happened, never sent to llama-server. A thin
layer over the typed API (``stream_chat``...): the same requests, timeouts, retries and
cancellation.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from bridge.llama.answers import (
    StreamedAnswer,
    fill_debug_info,
    generation_answer,
    generation_debug,
    generation_text,
)
from bridge.llama.async_stream import AsyncStream
from bridge.llama.body import Messages
from bridge.llama.types import Generation

Tools = list[dict[str, Any]] | None
ToolChoice = str | dict[str, Any] | None


class AsyncTextStream:
    """The text of one streamed answer: an async iterator of ``str`` chunks, and an async
    context manager that releases the connection (leave ``async with`` to stop early).

    ``debug_info`` is filled once, however the answer ends: its end, an error, or
    :meth:`aclose` before the end.

    Args:
        stream: the typed stream underneath.
        debug_info: the caller's dict, or None.
        backend: the server's base URL.
    """

    def __init__(self, stream: AsyncStream, debug_info: dict[str, Any] | None,
                 backend: str) -> None:
        self.stream = stream
        """The typed stream (timings, ``cancel()``, ``usage_so_far()``)."""
        self._debug_info = debug_info
        self._answer = StreamedAnswer(backend, stream.started_at)
        self._filled = False

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        ended = True
        error: Exception | None = None
        try:
            async for delta in self.stream:
                text = self._answer.text(delta, time.monotonic())
                if text is not None:
                    ended = False
                    return text
        except Exception as exc:
            error = exc
            raise
        finally:
            if ended:
                self._fill(error)
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Stop the answer from another task (see :meth:`AsyncStream.cancel`)."""
        self.stream.cancel()

    async def aclose(self) -> None:
        """Release the connection (closing it unless the answer was read to the end)."""
        try:
            await self.stream.aclose()
        finally:
            self._fill(None)

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def _fill(self, error: Exception | None) -> None:
        if not self._filled:
            self._filled = True
            fill_debug_info(self._debug_info, self._answer.debug(
                time.monotonic(), usage_so_far=self.stream.usage_so_far(), error=error))


class AsyncTextCalls:
    """``generate_stream``, ``generate``, ``complete_stream`` and ``complete``, on a
    client that has the typed API."""

    base_url: str

    @abstractmethod
    def stream_chat(self, messages: Messages, temperature: float | None = None,
                    top_p: float | None = None, max_tokens: int | None = None,
                    tools: Tools = None, tool_choice: ToolChoice = None,
                    **sampling: Any) -> AsyncStream: ...

    @abstractmethod
    def stream_completion(self, prompt: str, temperature: float | None = None,
                          top_p: float | None = None, max_tokens: int | None = None,
                          tools: Tools = None, tool_choice: ToolChoice = None,
                          **sampling: Any) -> AsyncStream: ...

    @abstractmethod
    async def chat(self, messages: Messages, temperature: float | None = None,
                   top_p: float | None = None, max_tokens: int | None = None,
                   tools: Tools = None, tool_choice: ToolChoice = None,
                   **sampling: Any) -> Generation: ...

    @abstractmethod
    async def completion(self, prompt: str, temperature: float | None = None,
                         top_p: float | None = None, max_tokens: int | None = None,
                         tools: Tools = None, tool_choice: ToolChoice = None,
                         **sampling: Any) -> Generation: ...

    def generate_stream(self, messages: Messages, temperature: float | None = None,
                        top_p: float | None = None, max_tokens: int | None = None,
                        debug_info: dict[str, Any] | None = None, tools: Tools = None,
                        tool_choice: ToolChoice = None, **sampling: Any) -> AsyncTextStream:
        """Stream a chat answer as text chunks (``POST /v1/chat/completions``)::

            async with client.generate_stream(messages) as chunks:
                async for chunk in chunks:
                    print(chunk, end="", flush=True)

        The request is sent when iteration starts. Leaving ``async with`` early, or
        cancelling the task, closes the connection, which frees the llama-server slot.

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
            **sampling: further body fields, sent as is (``seed``, ``top_k``, ``stop``...).

        Returns:
            The answer's text, chunk by chunk as llama-server sends it (no empty chunks;
            reasoning and tool-call fragments are not text).
        """
        stream = self.stream_chat(messages, temperature, top_p, max_tokens, tools, tool_choice,
                                  **sampling)
        return AsyncTextStream(stream, debug_info, self.base_url)

    def complete_stream(self, prompt: str, temperature: float | None = None,
                        top_p: float | None = None, max_tokens: int | None = None,
                        debug_info: dict[str, Any] | None = None,
                        **sampling: Any) -> AsyncTextStream:
        """Stream a plain completion of ``prompt`` as text chunks (``POST /v1/completions``);
        arguments and behaviour as :meth:`generate_stream`."""
        stream = self.stream_completion(prompt, temperature, top_p, max_tokens, **sampling)
        return AsyncTextStream(stream, debug_info, self.base_url)

    async def generate(self, messages: Messages, temperature: float | None = None,
                       top_p: float | None = None, max_tokens: int | None = None,
                       debug_info: dict[str, Any] | None = None, tools: Tools = None,
                       tool_choice: ToolChoice = None,
                       **sampling: Any) -> str | list[dict[str, Any]]:
        """One non-streamed chat call; arguments as :meth:`generate_stream`.

        ``Timeouts.non_streamed`` bounds queueing + prompt + the whole generation.

        Returns:
            The tool calls when the model made some (OpenAI-style dicts), else the
            answer's text.
        """
        gen = await self._once(debug_info, lambda: self.chat(
            messages, temperature, top_p, max_tokens, tools, tool_choice, **sampling))
        return generation_answer(gen)

    async def complete(self, prompt: str, temperature: float | None = None,
                       top_p: float | None = None, max_tokens: int | None = None,
                       debug_info: dict[str, Any] | None = None, **sampling: Any) -> str:
        """One non-streamed completion of ``prompt`` (``POST /v1/completions``); arguments
        as :meth:`complete_stream`.

        Returns:
            The completion's text.
        """
        gen = await self._once(debug_info, lambda: self.completion(
            prompt, temperature, top_p, max_tokens, **sampling))
        return generation_text(gen)

    async def _once(self, debug_info: dict[str, Any] | None,
                    call: Callable[[], Awaitable[Generation]]) -> Generation:
        """Run one non-streamed typed call, filling ``debug_info`` however it ends."""
        started = time.monotonic()
        gen: Generation | None = None
        error: Exception | None = None
        try:
            gen = await call()
        except Exception as exc:
            error = exc
            raise
        finally:
            fill_debug_info(debug_info, generation_debug(gen, self.base_url, started,
                                                         time.monotonic(), error))
        return gen
