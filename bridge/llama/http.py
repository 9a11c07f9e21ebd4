"""HTTP plumbing of the llama-server client: cancellable requests, bounded reads, retries.

Why not plain ``requests``: a request must be cancellable from another thread at
any moment — also while llama-server keeps it queued without sending headers —
and cancelling must close the TCP connection so that llama-server frees the slot.
``requests`` gives no handle on the socket before the response arrives, so the
session's connection classes report their socket to the :class:`CancelToken` of
the calling thread just before waiting for the response, and the pools detach it
again before a connection is reused (so a late ``cancel()`` can never hit
another request's connection).

What a failed call raises is :mod:`bridge.llama.failures`.
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
from tenacity import Retrying
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import HTTPResponse

from bridge.llama.retry import retrying_args
from bridge.llama.types import RetryPolicy
from bridge.protocol.errors import StreamCancelled

T = TypeVar("T")


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

    return Retrying(sleep=sleep, **retrying_args(policy))(attempt)
