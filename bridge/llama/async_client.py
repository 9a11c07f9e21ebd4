"""asyncio client for llama.cpp's ``llama-server`` (OpenAI-compatible endpoints), on httpx.

The same methods as :class:`~bridge.llama.client.LlamaCppClient`, as coroutines and
async iterators, with the same behaviour underneath: one decoder of streamed answers
(:mod:`bridge.llama.decoding`), the same timeouts, retries before the first byte and
typed exceptions (:mod:`bridge.protocol.errors`). For asyncio web backends: many
concurrent streams on one event loop, each cancellable by cancelling its task.

Example::

    async with AsyncLlamaCppClient("http://127.0.0.1:8080") as client:
        async for text in client.generate_stream([{"role": "user", "content": "Hi"}]):
            print(text, end="")
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

from bridge.config.settings import DeploymentConfig
from bridge.llama.async_http import AsyncCancel, AsyncServerCalls, make_async_client, read_bounded
from bridge.llama.async_stream import AsyncStream
from bridge.llama.async_text import AsyncTextCalls, AsyncTextStream, ToolChoice, Tools
from bridge.llama.body import Messages, message_dicts, request_body
from bridge.llama.calls import MAX_SMALL_BYTES
from bridge.llama.events import Kind
from bridge.llama.http import CallInfo
from bridge.llama.options import client_target
from bridge.llama.probes import health_of, models_of, props_of, slots_of, tokens_of
from bridge.llama.types import Generation, Health, Props, RetryPolicy, Timeouts
from bridge.protocol import safe_json
from bridge.protocol.messages import json_text

__all__ = ["AsyncLlamaCppClient", "AsyncStream", "AsyncTextStream"]


class AsyncLlamaCppClient(AsyncServerCalls, AsyncTextCalls):
    """Talks to one llama-server from asyncio.

    Text level (:class:`~bridge.llama.async_text.AsyncTextCalls`): ``generate_stream``,
    ``generate``, ``complete_stream``, ``complete``. Typed level: :meth:`stream_chat`,
    :meth:`stream_completion` (deltas), :meth:`chat`, :meth:`completion`
    (:class:`~bridge.llama.types.Generation`). Server state: :meth:`health`,
    :meth:`props`, :meth:`slots`, :meth:`models`, :meth:`tokenize`.

    Args:
        config_or_url: the server's base URL (``http://127.0.0.1:8080``; a trailing
            ``/`` is ignored), or a :class:`~bridge.config.settings.DeploymentConfig`:
            its first llama-server URL (``server_url``), with its ``[llama]`` timeouts,
            retries and API key.
        timeouts: see :class:`~bridge.llama.types.Timeouts` (overrides the config's).
        retry: see :class:`~bridge.llama.types.RetryPolicy`; applies only before the
            first response byte (overrides the config's).
        api_key: llama-server's ``--api-key``, sent as a bearer token.
        pool_size: idle HTTP connections kept for reuse (set it to the concurrent
            stream count).

    Raises:
        ValueError: the URL is not an http(s) URL, or the config names no llama-server.
        TypeError: ``config_or_url`` is neither a string nor a ``DeploymentConfig``.
    """

    def __init__(self, config_or_url: str | DeploymentConfig, *,
                 timeouts: Timeouts | None = None, retry: RetryPolicy | None = None,
                 api_key: str | None = None, pool_size: int = 16) -> None:
        url, options = client_target(config_or_url, timeouts, retry, api_key,
                                     "AsyncLlamaCppClient")
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        super().__init__(url, options["timeouts"], options["retry"],
                         make_async_client(pool_size, options["api_key"]))

    # ------------------------------------------------------------------ generation, typed

    def stream_chat(self, messages: Messages, temperature: float | None = None,
                    top_p: float | None = None, max_tokens: int | None = None,
                    tools: Tools = None, tool_choice: ToolChoice = None,
                    **sampling: Any) -> AsyncStream:
        """Stream a chat answer (``POST /v1/chat/completions``, ``"stream": true``).

        The request is sent on the first ``__anext__`` (or :meth:`AsyncStream.open`).

        Args:
            messages: OpenAI chat messages, as dicts or pydantic models.
            temperature: sampling temperature.
            top_p: nucleus sampling.
            max_tokens: generation limit.
            tools: OpenAI tool definitions.
            tool_choice: ``"auto"``, ``"none"``, ``"required"`` or a function choice.
            **sampling: further body fields, sent as is (``seed``, ``top_k``, ``stop``...);
                ``None`` values are left out.

        Returns:
            The stream of deltas, ending with one :class:`~bridge.llama.types.StreamEnd`;
            use it with ``async with``.
        """
        body = request_body("messages", message_dicts(messages), True, temperature, top_p,
                            max_tokens, tools, tool_choice, sampling)
        return self._stream("/v1/chat/completions", body, "chat")

    def stream_completion(self, prompt: str, temperature: float | None = None,
                          top_p: float | None = None, max_tokens: int | None = None,
                          tools: Tools = None, tool_choice: ToolChoice = None,
                          **sampling: Any) -> AsyncStream:
        """Stream a plain completion (``POST /v1/completions``); arguments as
        :meth:`stream_chat` with ``prompt`` instead of ``messages``."""
        body = request_body("prompt", prompt, True, temperature, top_p, max_tokens, tools,
                            tool_choice, sampling)
        return self._stream("/v1/completions", body, "completion")

    async def chat(self, messages: Messages, temperature: float | None = None,
                   top_p: float | None = None, max_tokens: int | None = None,
                   tools: Tools = None, tool_choice: ToolChoice = None,
                   **sampling: Any) -> Generation:
        """One non-streamed chat call; arguments as :meth:`stream_chat`.

        ``Timeouts.non_streamed`` bounds queueing + prompt + generation. Cancelling the
        task closes the connection (llama-server then frees the slot).

        Returns:
            The answer (content and/or tool calls, finish reason, usage, timings).
        """
        body = request_body("messages", message_dicts(messages), False, temperature, top_p,
                            max_tokens, tools, tool_choice, sampling)
        return await self._call("/v1/chat/completions", body, "chat")

    async def completion(self, prompt: str, temperature: float | None = None,
                         top_p: float | None = None, max_tokens: int | None = None,
                         tools: Tools = None, tool_choice: ToolChoice = None,
                         **sampling: Any) -> Generation:
        """One non-streamed completion (``POST /v1/completions``); see :meth:`chat`."""
        body = request_body("prompt", prompt, False, temperature, top_p, max_tokens, tools,
                            tool_choice, sampling)
        return await self._call("/v1/completions", body, "completion")

    # ------------------------------------------------------------------ server state

    async def health(self) -> Health:
        """``GET /health`` (two attempts: one may land on a keep-alive connection
        llama-server is closing).

        Returns:
            ``ok=True`` on HTTP 200; ``ok=False`` on 503 (model loading) or other codes.

        Raises:
            BackendUnavailable: the server cannot be reached.
            FirstByteTimeout: it accepted the connection but did not answer in time.
        """
        resp = await self._get(CallInfo(self._url("/health")), attempts=2)
        try:
            try:
                data = safe_json.loads(await read_bounded(resp, MAX_SMALL_BYTES))
            except (ValueError, httpx.TransportError):
                data = None
        finally:
            await resp.aclose()
        return health_of(resp.status_code, data)

    async def props(self) -> Props:
        """``GET /props``: slot count, model, context size, template capabilities."""
        return props_of(await self._get_json("/props"), self._url("/props"))

    async def slots(self) -> list[dict[str, Any]]:
        """``GET /slots`` (needs ``--slots`` on newer servers; 501 otherwise)."""
        return slots_of(await self._get_json("/slots"), self._url("/slots"))

    async def models(self) -> list[str]:
        """``GET /v1/models``: the model ids the server offers."""
        return models_of(await self._get_json("/v1/models"))

    async def tokenize(self, text: str) -> list[int]:
        """``POST /tokenize``: the token ids of ``text`` (no special tokens added)."""
        data = await self._post_json("/tokenize", {"content": text})
        return tokens_of(data, self._url("/tokenize"))

    async def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is for this server's model (see :meth:`tokenize`)."""
        return len(await self.tokenize(text))

    # ------------------------------------------------------------------ lifetime

    async def aclose(self) -> None:
        """Close pooled connections. Streams still open keep their own connection."""
        await self._client.aclose()

    async def __aenter__(self) -> AsyncLlamaCppClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    def _stream(self, path: str, body: dict[str, Any], kind: Kind) -> AsyncStream:
        payload = json_text(body).encode()

        async def opener(cancel: AsyncCancel) -> httpx.Response:
            return await self._post(cancel, payload, self.timeouts.first_byte, "first_byte")

        return AsyncStream(opener, CallInfo(self._url(path)), kind, self.timeouts.idle)

