"""HTTP plumbing of the llama-server client: cancellable requests, retries, error mapping.

Why not plain ``requests``: a request must be cancellable from another thread at
any moment — also while llama-server keeps it queued without sending headers —
and cancelling must close the TCP connection so that llama-server frees the slot.
``requests`` gives no handle on the socket before the response arrives, so the
session's connection classes report their socket to the :class:`CancelToken` of
the calling thread just before waiting for the response, and the pools detach it
again before a connection is reused (so a late ``cancel()`` can never hit
another request's connection).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import HTTPResponse

from bridge.llama.types import RetryPolicy
from bridge.protocol import safe_json
from bridge.protocol.errors import (
    BackendError,
    BackendHTTPError,
    BackendStreamError,
    BackendUnavailable,
    ConnectTimeout,
    FirstByteTimeout,
    StreamCancelled,
    backend_retryable,
)

T = TypeVar("T")

MAX_ERROR_BODY = 64 * 1024
"""Bytes of an HTTP error body kept for the message (llama's are < 1 KiB)."""


class CancelToken:
    """Cancels one call to llama-server from any thread by closing its connection.

    Works in every phase: before connecting (the call then never starts), while
    waiting for a queued request's headers, mid-stream and during retry backoff.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._sock: socket.socket | None = None

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._event.is_set()

    def cancel(self) -> None:
        """Cancel the call: shut its socket down so blocked reads return at once.

        ``shutdown(SHUT_RDWR)`` (not just ``close``) is what wakes a ``recv`` blocked in
        another thread, and it sends the FIN that tells llama-server to stop generating.
        Idempotent and safe to call after the call finished.
        """
        with self._lock:
            self._event.set()
            if self._sock is not None:
                _shutdown(self._sock)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` unless cancelled; returns True if cancelled."""
        return self._event.wait(seconds)

    @property
    def sock(self) -> socket.socket | None:
        """The socket of the call in progress, if connected."""
        return self._sock

    def _attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self._event.is_set():
                _shutdown(sock)

    def detach(self) -> None:
        """Forget the socket: the call is over and its connection may be reused."""
        with self._lock:
            self._sock = None


def _shutdown(sock: socket.socket) -> None:
    # OSError: already closed or never connected, so nothing is left to interrupt.
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- session

_current = threading.local()


@contextmanager
def bound(token: CancelToken) -> Iterator[None]:
    """Let connections used by this thread report their socket to ``token``."""
    _current.token = token
    try:
        yield
    finally:
        _current.token = None


def _hook(conn: HTTPConnection) -> None:
    token: CancelToken | None = getattr(_current, "token", None)
    if token is not None and conn.sock is not None:
        conn._bridge_token = token  # type: ignore[attr-defined]
        token._attach(conn.sock)


def _unhook(conn: Any) -> None:
    token: CancelToken | None = getattr(conn, "_bridge_token", None)
    if token is not None:
        token.detach()
        conn._bridge_token = None


# http.client reads a response's status line and headers through a BufferedReader of
# io.DEFAULT_BUFFER_SIZE (8 KiB) that lives as long as the response -- for a stream, as
# long as the answer: the largest single allocation per running stream (tracemalloc at
# 256 streams). llama-server's headers are ~250 bytes, and the body never needs the
# buffer: the relay reads the socket itself, and read1() of more than the buffer
# holds reads past it.
_RESPONSE_BUFFER = 1024


class _SmallReaderSocket:
    """What http.client.HTTPResponse is given instead of the socket: it only calls
    ``makefile``, here with a small buffer."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str) -> Any:
        assert mode == "rb"  # all http.client asks for
        return self._sock.makefile("rb", buffering=_RESPONSE_BUFFER)


class _SmallBufferResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None) -> None:
        super().__init__(_SmallReaderSocket(sock), debuglevel, method, url)  # type: ignore[arg-type]


class _HTTPConnection(HTTPConnection):
    response_class = _SmallBufferResponse

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        _hook(self)  # the request is sent; what follows is the (possibly long) wait
        return super().getresponse()


class _HTTPSConnection(HTTPSConnection):
    response_class = _SmallBufferResponse

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        _hook(self)
        return super().getresponse()


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection

    def _put_conn(self, conn: Any) -> None:
        _unhook(conn)
        super()._put_conn(conn)


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection

    def _put_conn(self, conn: Any) -> None:
        _unhook(conn)
        super()._put_conn(conn)


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def make_session(pool_size: int, api_key: str | None) -> requests.Session:
    """A session whose connections can be cancelled through a :class:`CancelToken`.

    Args:
        pool_size: connections kept per host (one per concurrent stream).
        api_key: sent as ``Authorization: Bearer`` (llama-server ``--api-key``).

    Returns:
        The configured session.
    """
    session = requests.Session()
    # Environment proxies (HTTP_PROXY) and .netrc are for browsing, not for a
    # llama-server on the LAN: a proxy would buffer the stream and hide the socket.
    session.trust_env = False
    adapter = _Adapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # Compression would make the server buffer tokens; ask for the bytes as written.
    session.headers["Accept-Encoding"] = "identity"
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    return session


# --------------------------------------------------------------------------- calls


@dataclass
class CallInfo:
    """What happened during one call (for logs and tests).

    Attributes:
        url: the full URL requested.
        token: cancels the call.
        attempts: connection attempts made (retries included).
        started_at: ``time.monotonic()`` when the call began.
        first_byte_at: ``time.monotonic()`` when response headers arrived.
    """

    url: str
    token: CancelToken = field(default_factory=CancelToken)
    attempts: int = 0
    started_at: float = field(default_factory=time.monotonic)
    first_byte_at: float | None = None


def cancelled_error(info: CallInfo) -> StreamCancelled:
    """The exception for a call cancelled through its token."""
    return StreamCancelled(
        f"request to {info.url} was cancelled; its connection to llama-server is closed "
        "so the server frees the slot"
    )


def map_request_error(exc: requests.RequestException, info: CallInfo, connect_s: float,
                      read_s: float, read_name: str, attempts: int) -> BackendError:
    """Translate a ``requests`` failure before any response byte into our hierarchy.

    Args:
        exc: what ``requests`` raised.
        info: the call (URL, token, attempt count).
        connect_s: the connect timeout in force.
        read_s: the timeout for the response headers in force.
        read_name: the name of that timeout's setting, for the message.
        attempts: attempts allowed by the retry policy.

    Returns:
        The exception to raise.
    """
    tries = f"(attempt {info.attempts}/{attempts})"
    where = f"llama-server at {info.url} {tries}"
    if info.token.cancelled:
        return cancelled_error(info)
    if isinstance(exc, requests.ConnectTimeout):
        return ConnectTimeout(
            f"could not open a connection to {where} within connect={connect_s:g} s; "
            "check that the host is up and reachable (firewall, address)",
            public=f"llama-server did not accept a connection {tries}; try again later",
        )
    if isinstance(exc, requests.ReadTimeout):
        return FirstByteTimeout(
            f"{where} accepted the request but sent no response within "
            f"{read_name}={read_s:g} s; every slot may be busy (llama-server queues silently) "
            "or the prompt is long: check /slots and the server load, or raise the timeout",
            public=f"llama-server sent no response within {read_name}={read_s:g} s (all its "
                   "slots may be busy, or the prompt is long); try again later or send a "
                   "shorter prompt",
        )
    return BackendUnavailable(
        f"could not reach {where}: {exc}; check that llama-server is running and the URL "
        "is right",
        public=f"llama-server could not be reached {tries}; try again later",
    )


def http_error(resp: requests.Response, info: CallInfo) -> BackendHTTPError:
    """Build the exception for an HTTP 4xx/5xx answer (reads at most 64 KiB of body).

    llama-server's error body is ``{"error": {"code", "message", "type"}}``; anything
    else (a proxy's HTML page) is quoted as text.
    """
    try:
        raw = read_bounded(resp, MAX_ERROR_BODY, truncate=True)
    except Exception:  # a body cut short must not hide the status we already have
        raw = b""
    error_type: str | None = None
    message = raw.decode("utf-8", "replace").strip()[:500] or resp.reason or ""
    body: object = message
    try:
        decoded = safe_json.loads(raw)  # an error body is untrusted too
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        body = decoded
        err = decoded.get("error")
        if isinstance(err, dict):
            error_type = err.get("type") if isinstance(err.get("type"), str) else None
            message = str(err.get("message") or message)
        elif isinstance(err, str):
            message = err
    hint = " (model still loading?)" if resp.status_code == 503 else ""
    return BackendHTTPError(
        f"llama-server at {info.url} answered HTTP {resp.status_code}"
        f"{f' {error_type}' if error_type else ''}{hint}: {message}"
        f"{_final(resp.status_code, error_type, message)}",
        status=resp.status_code, error_type=error_type, body=body,
    )


def _final(status: int, error_type: str | None, message: str) -> str:
    """What to tell a device whose request llama-server refused for good (see
    :func:`bridge.protocol.errors.backend_retryable`)."""
    if backend_retryable(status, error_type, message):
        return ""
    return " -- the request cannot succeed as sent: change it before sending it again"


def stream_error(data: Any, url: str) -> BackendStreamError:
    """Build the exception for an in-band ``{"error": ...}`` event (new or legacy form)."""
    err = data.get("error", data) if isinstance(data, dict) else data
    error_type = None
    message = str(err)
    if isinstance(err, dict):
        error_type = err.get("type") if isinstance(err.get("type"), str) else None
        message = str(err.get("message") or err)
    return BackendStreamError(
        f"llama-server at {url} reported an error mid-stream"
        f"{f' ({error_type})' if error_type else ''}: {message}{_final(0, error_type, message)}",
        status=0, error_type=error_type, body=data,
    )


def read_bounded(resp: requests.Response, limit: int, *, truncate: bool = False) -> bytes:
    """Read a response body, keeping at most ``limit`` bytes.

    Args:
        resp: a response opened with ``stream=True``.
        limit: the bound.
        truncate: keep the first ``limit`` bytes instead of raising.

    Returns:
        The body.

    Raises:
        ValueError: the body is longer than ``limit`` and ``truncate`` is false.
    """
    parts: list[bytes] = []
    size = 0
    for piece in resp.raw.stream(65536, decode_content=True):
        parts.append(piece)
        size += len(piece)
        if size > limit:
            if truncate:
                break
            raise ValueError(f"response body exceeds {limit} bytes")
    return b"".join(parts)[:limit]


def _retryable(exc: BaseException) -> bool:
    # Only failures where llama-server has certainly not started an answer we read, and
    # of the HTTP errors only "still loading" (503, unavailable_error), which passes in
    # seconds; what a device may retry later is BackendHTTPError.retryable.
    if isinstance(exc, StreamCancelled | BackendStreamError):
        return False
    if isinstance(exc, BackendHTTPError):
        return exc.status == 503
    return isinstance(exc, BackendUnavailable)


def with_retries(attempt: Callable[[], T], policy: RetryPolicy, token: CancelToken,
                 url: str) -> T:
    """Run ``attempt`` under the retry policy; backoff sleeps end early on cancel.

    Args:
        attempt: one try; raises our exceptions.
        policy: attempts and backoff.
        token: cancelling it interrupts the backoff with :class:`StreamCancelled`.
        url: for the cancel message.

    Returns:
        What ``attempt`` returned.
    """
    def sleep(seconds: float) -> None:
        if token.wait(seconds):
            raise StreamCancelled(f"request to {url} was cancelled while waiting to retry")

    retrying = Retrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential_jitter(multiplier=policy.initial_backoff,
                                     max=policy.max_backoff, jitter=policy.jitter),
        retry=retry_if_exception(_retryable),
        sleep=sleep,
        reraise=True,
    )
    return retrying(attempt)
