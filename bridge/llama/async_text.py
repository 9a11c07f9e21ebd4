"""The text-level API of :class:`~bridge.llama.async_client.AsyncLlamaCppClient`.

``generate_stream(messages, temperature=None, top_p=None, max_tokens=None,
debug_info=None, tools=None, tool_choice=None)`` gives the answer's text chunk by chunk
as it arrives; ``generate(...)`` the whole text, or the tool calls when the model made
some; ``complete_stream`` / ``complete`` the same for a plain prompt. ``debug_info``, a
dict the caller passes in, is filled with what happened (finish reason, usage, timings,
the server) and never sent to llama-server. Underneath is the typed API
(``stream_chat``...), so there is one implementation of every call.
"""

from __future__ import annotations

from abc import abstractmethod
from types import TracebackType
from typing import Any

from bridge.llama.async_stream import AsyncStream
from bridge.llama.body import Messages
from bridge.llama.types import Generation, StreamEnd, TextDelta, ToolCallDelta

Tools = list[dict[str, Any]] | None
ToolChoice = str | dict[str, Any] | None
Answer = str | list[dict[str, Any]]
"""A non-streamed answer at the text level: its text, or the tool calls the model made."""


class AsyncTextStream:
    """The text of one streamed answer: an async iterator of ``str`` chunks, and an async
    context manager that releases the connection (use ``async with``).

    Args:
        stream: the typed stream underneath.
        debug_info: filled when the answer ends (see :func:`fill_debug_info`).
        server: the server's base URL, for ``debug_info``.
    """

    def __init__(self, stream: AsyncStream, debug_info: dict[str, Any] | None,
                 server: str) -> None:
        self.stream = stream
        """The typed stream (timings, ``cancel()``, ``usage_so_far()``)."""
        self._debug_info = debug_info
        self._server = server
        self._tool_calls: list[ToolCallDelta] = []

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        async for delta in self.stream:
            if isinstance(delta, TextDelta):
                return delta.text
            if isinstance(delta, ToolCallDelta):
                self._tool_calls.append(delta)
            elif isinstance(delta, StreamEnd):
                fill_debug_info(self._debug_info, delta, self._server,
                                tool_calls=_joined(self._tool_calls))
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Stop the answer from another task (see :meth:`AsyncStream.cancel`)."""
        self.stream.cancel()

    async def aclose(self) -> None:
        """Release the connection (closing it unless the answer was read to the end)."""
        await self.stream.aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class AsyncTextCalls:
    """The text-level methods, on a client that has the typed ones."""

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
        """Stream a chat answer as text::

            async with client.generate_stream(messages) as chunks:
                async for chunk in chunks:
                    print(chunk, end="", flush=True)

        Args:
            messages: OpenAI chat messages, as dicts or pydantic models.
            temperature: sampling temperature.
            top_p: nucleus sampling.
            max_tokens: generation limit.
            debug_info: a dict to fill with what happened once the answer ends (finish
                reason, usage, timings, the server); never sent.
            tools: OpenAI tool definitions.
            tool_choice: ``"auto"``, ``"none"``, ``"required"`` or a function choice.
            **sampling: further body fields (``seed``, ``top_k``, ``stop``...).

        Returns:
            The text chunks as they arrive.
        """
        stream = self.stream_chat(messages, temperature, top_p, max_tokens, tools,
                                  tool_choice, **sampling)
        return AsyncTextStream(stream, debug_info, self.base_url)

    def complete_stream(self, prompt: str, temperature: float | None = None,
                        top_p: float | None = None, max_tokens: int | None = None,
                        debug_info: dict[str, Any] | None = None, tools: Tools = None,
                        tool_choice: ToolChoice = None, **sampling: Any) -> AsyncTextStream:
        """Stream a plain completion as text; arguments as :meth:`generate_stream` with
        ``prompt`` instead of ``messages``."""
        stream = self.stream_completion(prompt, temperature, top_p, max_tokens, tools,
                                        tool_choice, **sampling)
        return AsyncTextStream(stream, debug_info, self.base_url)

    async def generate(self, messages: Messages, temperature: float | None = None,
                       top_p: float | None = None, max_tokens: int | None = None,
                       debug_info: dict[str, Any] | None = None, tools: Tools = None,
                       tool_choice: ToolChoice = None, **sampling: Any) -> Answer:
        """One non-streamed chat call; arguments as :meth:`generate_stream`.

        Returns:
            The answer's text, or its tool calls (OpenAI's form) when the model made some.
        """
        gen = await self.chat(messages, temperature, top_p, max_tokens, tools, tool_choice,
                              **sampling)
        fill_debug_info(debug_info, gen, self.base_url, tool_calls=gen.tool_calls)
        return answer_of(gen)

    async def complete(self, prompt: str, temperature: float | None = None,
                       top_p: float | None = None, max_tokens: int | None = None,
                       debug_info: dict[str, Any] | None = None, tools: Tools = None,
                       tool_choice: ToolChoice = None, **sampling: Any) -> Answer:
        """One non-streamed completion; arguments as :meth:`complete_stream`.

        Returns:
            The answer's text.
        """
        gen = await self.completion(prompt, temperature, top_p, max_tokens, tools, tool_choice,
                                    **sampling)
        fill_debug_info(debug_info, gen, self.base_url, tool_calls=gen.tool_calls)
        return answer_of(gen)


# The shaping below is pure; the blocking client's text level shapes its answers the same.


def fill_debug_info(debug_info: dict[str, Any] | None, result: StreamEnd | Generation,
                    server: str, *, tool_calls: list[dict[str, Any]] | None = None) -> None:
    """Record in ``debug_info`` (if given) how an answer ended: ``finish_reason``,
    ``usage`` (a dict, or None), ``timings``, ``tool_calls`` (if any) and ``backend``
    (the server's base URL)."""
    if debug_info is None:
        return
    debug_info["finish_reason"] = result.finish_reason
    debug_info["usage"] = result.usage.model_dump() if result.usage is not None else None
    debug_info["timings"] = result.timings
    debug_info["backend"] = server
    if tool_calls:
        debug_info["tool_calls"] = tool_calls


def answer_of(gen: Generation) -> Answer:
    """A non-streamed answer at the text level: the tool calls if the model made some,
    else its text (``""`` if none)."""
    return gen.tool_calls if gen.tool_calls else gen.content or ""


def _joined(fragments: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Streamed tool-call fragments as whole calls, in OpenAI's form."""
    calls: dict[int, dict[str, Any]] = {}
    for part in fragments:
        call = calls.setdefault(part.index, {"id": None, "type": "function",
                                             "function": {"name": "", "arguments": ""}})
        if part.id:
            call["id"] = part.id
        if part.name:
            call["function"]["name"] += part.name
        if part.arguments:
            call["function"]["arguments"] += part.arguments
    return [calls[i] for i in sorted(calls)]
