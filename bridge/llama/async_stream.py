"""One streamed answer from llama-server, for asyncio: SSE events in, typed deltas out.

The asyncio counterpart of :class:`bridge.llama.stream.Stream`: the same decoding and
the same rules (:mod:`bridge.llama.decoding`: pings, in-band errors, a missing
``[DONE]``, UTF-8 split across reads, the idle timeout), on an httpx response. The
request is sent on the first ``__anext__`` (or :meth:`AsyncStream.open`).

Closing the stream (``aclose()``, leaving ``async with``) or cancelling the task that
reads it closes the HTTP connection, which makes llama-server stop generating and free
the slot.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType

import httpx

from bridge.llama.async_http import AsyncCancel, body_timeout
from bridge.llama.decoding import StreamDecoder, check_event_stream
from bridge.llama.events import Kind
from bridge.llama.failures import cancelled_error
from bridge.llama.http import CallInfo
from bridge.llama.sse import DEFAULT_MAX_EVENT_BYTES
from bridge.llama.stream_facts import StreamFacts
from bridge.llama.types import Delta, StreamEnd
from bridge.protocol.errors import BridgeError


class AsyncStream(StreamFacts):
    """Async iterable of :data:`~bridge.llama.types.Delta` for one streamed request; ends
    with one :class:`~bridge.llama.types.StreamEnd`.

    Use it as an async context manager so the connection is always released::

        async with client.stream_chat(messages) as stream:
            async for delta in stream:
                ...

    :meth:`cancel` may be called from any task of the event loop; the task reading
    the stream then gets :class:`~bridge.protocol.errors.StreamCancelled`.

    Args:
        opener: performs the request (with retries) and returns the 2xx response.
        info: the call's URL, timings and cancel state.
        kind: ``"chat"`` (``/v1/chat/completions``) or ``"completion"`` (``/v1/completions``).
        idle: the idle timeout in seconds.
        max_event_bytes: bound on one SSE event.
    """

    def __init__(self, opener: Callable[[AsyncCancel], Awaitable[httpx.Response]],
                 info: CallInfo, kind: Kind, idle: float,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._opener = opener
        self._info = info
        self._cancel = AsyncCancel(info)
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._pending: Iterator[Delta] | None = None
        self._closed = False
        self._waiting = False  # a task waits for the server (open or _read)
        token = info.token
        self._decoder = StreamDecoder(kind, info.url, idle,
                                      cancelled=lambda: token.cancelled,
                                      cancelled_error=lambda: cancelled_error(info),
                                      max_event_bytes=max_event_bytes)

    # ------------------------------------------------------------------ what happened

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancel.cancelled

    # ------------------------------------------------------------------ control

    async def open(self) -> None:
        """Send the request now (otherwise the first ``__anext__`` does).

        Raises:
            BackendError: any subclass, e.g. :class:`BackendHTTPError` for a 4xx answer.
        """
        if self._response is not None:
            return
        if self.cancelled:
            raise cancelled_error(self._info)
        if self._closed:
            raise RuntimeError(f"stream to {self.url} is closed; start a new one")
        try:
            self._waiting = True
            try:
                self._response = await self._opener(self._cancel)
            finally:
                self._waiting = False
            check_event_stream(self._response.headers.get("Content-Type", ""), self.url)
            body_timeout(self._response)
            self._chunks = self._response.aiter_raw()
        except BaseException:
            await self.aclose()
            raise

    def cancel(self) -> None:
        """Stop the stream from another task of the event loop: the task reading it gets
        ``StreamCancelled`` at once, and its connection is closed so llama-server frees
        the slot. Idempotent."""
        self._cancel.cancel()

    async def aclose(self) -> None:
        """Release the connection (closing it unless the answer was read to the end).

        While another task waits for the server in this stream (opening it, reading it),
        this is :meth:`cancel`: that task then closes the connection as it gets
        ``StreamCancelled``.
        """
        if self._waiting:
            self.cancel()
            return
        self._closed = True
        self._pending = None
        chunks, self._chunks = self._chunks, None
        response, self._response = self._response, None
        try:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            if response is not None:
                await response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Delta:
        try:
            while True:
                if self._pending is not None:
                    delta = next(self._pending, None)
                    if delta is not None:
                        if isinstance(delta, StreamEnd):
                            await self.aclose()
                        return delta
                    self._pending = None
                if self._closed:
                    raise StopAsyncIteration
                await self.open()
                self._pending = self._decoder.feed(await self._read())
        except StopAsyncIteration:
            raise
        except BaseException:
            await self.aclose()
            raise

    # ------------------------------------------------------------------ internals

    async def _read(self) -> bytes:
        """The next bytes of the body (``b""`` at its end), within the idle budget."""
        assert self._chunks is not None
        decoder = self._decoder
        budget = decoder.budget()
        before = time.monotonic()
        self._waiting = True
        try:
            async with self._cancel.interruptible(budget, decoder.idle_error):
                chunk = await anext(self._chunks, b"")
        except httpx.TransportError as exc:
            raise self._read_error(exc) from exc
        finally:
            self._waiting = False
        decoder.blocked(time.monotonic() - before)
        if self.cancelled:
            raise cancelled_error(self._info)
        return chunk

    def _read_error(self, exc: httpx.TransportError) -> BridgeError:
        if self.cancelled:
            return cancelled_error(self._info)
        if isinstance(exc, httpx.ReadTimeout):
            return self._decoder.idle_error()
        return self._decoder.broken_error(exc)
