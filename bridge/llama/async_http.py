"""asyncio HTTP to llama-server on httpx: pooled connections, retries before the first
byte, and every failure as an exception of :mod:`bridge.protocol.errors`.

The asyncio counterpart of :mod:`bridge.llama.http` and :mod:`bridge.llama.calls`, with
the same rules: what is retried (:mod:`bridge.llama.retry`), what a failure raises and
says (:mod:`bridge.llama.failures`), how answers are decoded (:mod:`bridge.llama.events`,
:mod:`bridge.llama.probes`). Cancelling is asyncio's: cancel the task (the connection is
closed, so llama-server frees the slot) or :meth:`AsyncCancel.cancel` one call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying

from bridge.llama.calls import MAX_ANSWER_BYTES, MAX_SMALL_BYTES
from bridge.llama.events import Kind, parse_generation
from bridge.llama.failures import (
    MAX_ERROR_BODY,
    bad_answer_error,
    body_broken_error,
    body_stalled_error,
    cancelled_error,
    connect_timeout_error,
    first_byte_timeout_error,
    http_error_of,
    unreachable_error,
)
from bridge.llama.http import CallInfo
from bridge.llama.retry import retrying_args
from bridge.llama.types import Generation, RetryPolicy, Timeouts
from bridge.protocol import safe_json
from bridge.protocol.errors import BackendError, BackendProtocolError, StreamCancelled
from bridge.protocol.messages import json_text

T = TypeVar("T")

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
"""Socket options of every connection: a token is a few bytes that must leave at once."""


def make_async_client(pool_size: int, api_key: str | None) -> httpx.AsyncClient:
    """The httpx client under :class:`~bridge.llama.async_client.AsyncLlamaCppClient`.

    Args:
        pool_size: idle connections kept open for reuse (one per concurrent stream).
            More streams than this still get their own connection, as with the
            blocking client, rather than wait for one.
        api_key: sent as ``Authorization: Bearer`` (llama-server ``--api-key``).

    Returns:
        The client; close it with ``aclose()``.
    """
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=pool_size),
        retries=0, socket_options=NODELAY, trust_env=False)
    # Compression would make the server buffer tokens; ask for the bytes as written.
    headers = {"Accept-Encoding": "identity"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    # Environment proxies (HTTP_PROXY) and .netrc are for browsing, not for a
    # llama-server on the LAN: a proxy would buffer the stream.
    return httpx.AsyncClient(transport=transport, headers=headers, trust_env=False)


class AsyncCancel:
    """Cancels one asyncio call to llama-server from another task of its event loop.

    Interrupts whatever the call awaits inside :meth:`interruptible` (connecting,
    waiting for a queued request's headers, a read mid-stream) and the backoff between
    retries; the call then raises :class:`~bridge.protocol.errors.StreamCancelled`.
    Cancelling the call's task does the same, with ``CancelledError``.

    Args:
        info: the call; its token records the cancel (``info.token.cancelled``).
    """

    def __init__(self, info: CallInfo) -> None:
        self.info = info
        self._scope: asyncio.Timeout | None = None
        self._event: asyncio.Event | None = None

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self.info.token.cancelled

    def cancel(self) -> None:
        """Cancel the call (idempotent; call it from the event loop's thread)."""
        self.info.token.cancel()
        if self._scope is not None:
            self._scope.reschedule(-1.0)  # now: the awaited operation is cancelled
        if self._event is not None:
            self._event.set()

    @asynccontextmanager
    async def interruptible(self, timeout: float | None,
                            on_timeout: Callable[[], BaseException]) -> AsyncIterator[None]:
        """Await inside: :meth:`cancel` interrupts it, and so does ``timeout``.

        Raises:
            StreamCancelled: cancelled (also when cancelled before entering).
            BaseException: ``on_timeout()``, when ``timeout`` seconds passed.
        """
        if self.cancelled:
            raise cancelled_error(self.info)
        try:
            async with asyncio.timeout(timeout) as scope:
                self._scope = scope
                try:
                    yield
                finally:
                    self._scope = None
        except TimeoutError as exc:
            raise (cancelled_error(self.info) if self.cancelled else on_timeout()) from exc

    async def sleep(self, seconds: float) -> None:
        """Back off before a retry; :meth:`cancel` ends it with ``StreamCancelled``."""
        self._event = event = asyncio.Event()
        try:
            if not self.cancelled:
                await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            return
        finally:
            self._event = None
        raise StreamCancelled(f"request to {self.info.url} was cancelled while waiting to retry")


def map_httpx_error(exc: httpx.TransportError, info: CallInfo, connect_s: float, read_s: float,
                    read_name: str, attempts: int) -> BackendError:
    """Translate an httpx failure before any response byte into our hierarchy (the
    arguments as :func:`bridge.llama.failures.map_request_error`'s)."""
    if info.token.cancelled:
        return cancelled_error(info)
    if isinstance(exc, httpx.ConnectTimeout):
        return connect_timeout_error(info, attempts, connect_s)
    if isinstance(exc, httpx.ReadTimeout):
        return first_byte_timeout_error(info, attempts, read_s, read_name)
    return unreachable_error(info, attempts, exc)


async def read_bounded(resp: httpx.Response, limit: int, *, truncate: bool = False) -> bytes:
    """Read a streamed response's body, keeping at most ``limit`` bytes.

    Raises:
        ValueError: the body is longer than ``limit`` and ``truncate`` is false.
    """
    parts: list[bytes] = []
    size = 0
    async for piece in resp.aiter_raw():
        parts.append(piece)
        size += len(piece)
        if size > limit:
            if truncate:
                break
            raise ValueError(f"response body exceeds {limit} bytes")
    return b"".join(parts)[:limit]


async def checked(resp: httpx.Response, info: CallInfo) -> httpx.Response:
    """``resp`` if it is not an error; else raise :class:`BackendHTTPError` (closing it)."""
    if resp.status_code < 400:
        return resp
    try:
        try:
            raw = await read_bounded(resp, MAX_ERROR_BODY, truncate=True)
        except Exception:  # a body cut short must not hide the status we already have
            raw = b""
        raise http_error_of(resp.status_code, resp.reason_phrase, raw, info)
    finally:
        await resp.aclose()


class AsyncServerCalls:
    """Requests to one llama-server; :class:`~bridge.llama.async_client.AsyncLlamaCppClient`
    is one.

    Args:
        base_url: e.g. ``http://127.0.0.1:8080``, without a trailing ``/``.
        timeouts: the timeouts of every call.
        retry: applies only before the first response byte.
        client: from :func:`make_async_client`.

    Attributes:
        base_url: as given.
        timeouts: as given.
        retry: as given.
    """

    def __init__(self, base_url: str, timeouts: Timeouts, retry: RetryPolicy,
                 client: httpx.AsyncClient) -> None:
        self.base_url = base_url
        self.timeouts = timeouts
        self.retry = retry
        self._client = client

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def _post(self, cancel: AsyncCancel, payload: bytes, read_timeout: float,
                    read_name: str) -> httpx.Response:
        """POST with retries; returns a 2xx response whose body is not read yet.

        ``read_timeout`` bounds the wait for the response headers; reading the body
        is the caller's (see :func:`body_timeout`).
        """
        info, t = cancel.info, self.timeouts
        timeout = httpx.Timeout(connect=t.connect, read=read_timeout, write=read_timeout,
                                pool=t.connect)

        async def attempt() -> httpx.Response:
            info.attempts += 1
            request = self._client.build_request(
                "POST", info.url, content=payload, timeout=timeout,
                headers={"Content-Type": "application/json"})
            try:
                async with cancel.interruptible(None, lambda: cancelled_error(info)):
                    resp = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise map_httpx_error(exc, info, t.connect, read_timeout, read_name,
                                      self.retry.attempts) from exc
            info.first_byte_at = time.monotonic()
            return await checked(resp, info)

        return await with_retries(attempt, self.retry, cancel)

    async def _get(self, info: CallInfo, attempts: int) -> httpx.Response:
        """GET with up to ``attempts`` attempts; the body is not read yet."""
        t = self.timeouts
        timeout = httpx.Timeout(connect=t.connect, read=t.request, write=t.request,
                                pool=t.connect)

        async def attempt() -> httpx.Response:
            info.attempts += 1
            try:
                return await self._client.send(self._client.build_request(
                    "GET", info.url, timeout=timeout), stream=True)
            except httpx.TransportError as exc:
                raise map_httpx_error(exc, info, t.connect, t.request, "request",
                                      attempts) from exc

        policy = self.retry if attempts == self.retry.attempts else dataclasses.replace(
            self.retry, attempts=attempts)
        return await with_retries(attempt, policy, AsyncCancel(info))

    async def _get_json(self, path: str) -> Any:
        """GET ``path`` (with retries) and decode its JSON answer."""
        info = CallInfo(self._url(path))
        resp = await checked(await self._get(info, self.retry.attempts), info)
        try:
            return safe_json.loads(await read_bounded(resp, MAX_SMALL_BYTES))
        except (ValueError, httpx.TransportError) as exc:
            raise bad_answer_error(info, exc) from exc
        finally:
            await resp.aclose()

    async def _post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST a small request (``/tokenize``) and decode its JSON answer."""
        cancel = AsyncCancel(CallInfo(self._url(path)))
        resp = await self._post(cancel, json_text(body).encode(), self.timeouts.request,
                                "request")
        try:
            return safe_json.loads(await read_bounded(resp, MAX_SMALL_BYTES))
        except (ValueError, httpx.TransportError) as exc:
            raise bad_answer_error(cancel.info, exc) from exc
        finally:
            await resp.aclose()

    async def _call(self, path: str, body: dict[str, Any], kind: Kind) -> Generation:
        """A non-streamed generation: POST ``body`` and decode the whole answer.

        The whole answer is the "first byte" here, so ``Timeouts.non_streamed`` bounds
        queueing + prompt + generation.
        """
        cancel = AsyncCancel(CallInfo(self._url(path)))
        info, limit = cancel.info, self.timeouts.non_streamed
        resp = await self._post(cancel, json_text(body).encode(), limit, "non_streamed")
        try:
            data = await read_bounded(resp, MAX_ANSWER_BYTES)
        except ValueError as exc:
            raise BackendProtocolError(f"answer from {info.url}: {exc}") from exc
        except httpx.ReadTimeout as exc:
            raise body_stalled_error(info, limit) from exc
        except httpx.TransportError as exc:
            raise body_broken_error(info, exc) from exc
        finally:
            await resp.aclose()
        return parse_generation(data, kind, info.url)


def body_timeout(resp: httpx.Response) -> None:
    """Leave the body's reads of a streamed response to the caller's idle timeout.

    httpx bounds every read of a response with the request's read timeout, which for
    a stream is the first-byte timeout; mid-stream the bound is the idle budget
    instead (:meth:`bridge.llama.decoding.StreamDecoder.budget`), which the reader
    enforces itself. httpcore looks the read timeout up when the body's first read
    starts, so clearing it now applies to the whole body.
    """
    timeouts = resp.request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = None


async def with_retries(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy,
                       cancel: AsyncCancel) -> T:
    """Run ``attempt`` under the retry policy; :meth:`AsyncCancel.cancel` ends the
    backoff with :class:`StreamCancelled`.

    Returns:
        What ``attempt`` returned.
    """
    async def guarded() -> T:
        if cancel.cancelled:
            raise cancelled_error(cancel.info)
        return await attempt()

    result: T = await AsyncRetrying(sleep=cancel.sleep, **retrying_args(policy))(guarded)
    return result
