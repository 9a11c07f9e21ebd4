"""One streamed answer from llama-server: SSE events in, typed deltas out.

:class:`Stream` opens its request lazily (on the first ``next()`` or an explicit
:meth:`Stream.open`), so the caller holds a cancellable handle even while
llama-server keeps the request queued without sending headers.

Idle accounting counts only the time spent *blocked on the socket* since the last
data event: keep-alive pings do not reset it, and time the consumer spends with
a delta (publishing it over MQTT, say) does not use it up.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from types import TracebackType
from typing import TYPE_CHECKING

import requests
import urllib3.exceptions

from bridge.llama.dechunk import Dechunker
from bridge.llama.decoding import StreamDecoder, check_event_stream
from bridge.llama.events import Kind
from bridge.llama.failures import cancelled_error
from bridge.llama.http import CallInfo
from bridge.llama.sse import DEFAULT_MAX_EVENT_BYTES
from bridge.llama.stream_facts import StreamFacts
from bridge.llama.types import (
    Delta,
    StreamEnd,
)
from bridge.protocol.errors import BackendProtocolError, BridgeError

if TYPE_CHECKING:
    from bridge.llama.relay import Relay

# A blocked read holds a buffer of this size (BufferedReader.read1 allocates it before
# waiting), per stream: 64 KiB cost 16 MiB at 256 streams; 8 KiB still carries ~20
# events per read when tokens pile up.
READ_SIZE = 8 * 1024


class Stream(StreamFacts):
    """Iterable of :data:`Delta` for one streamed request; ends with one :class:`StreamEnd`.

    Use as a context manager so the connection is always released::

        with client.stream_chat(messages) as stream:
            for delta in stream:
                ...

    :meth:`cancel` may be called from any thread at any time; the iterating thread
    then gets :class:`~bridge.protocol.errors.StreamCancelled`. Iterate, :meth:`open` and
    :meth:`close` from one thread only.

    Args:
        opener: performs the request (with retries) and returns the 200 response.
        info: the call's URL, cancel token and timings.
        kind: ``"chat"`` (``/v1/chat/completions``) or ``"completion"`` (``/v1/completions``).
        idle: the idle timeout in seconds.
        max_event_bytes: bound on one SSE event.
    """

    def __init__(self, opener: Callable[[CallInfo], requests.Response], info: CallInfo,
                 kind: Kind, idle: float,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._opener = opener
        self._info = info
        self._response: requests.Response | None = None
        self._gen: Iterator[Delta] | None = None
        self._closed = False
        token = info.token
        # Closures over the call, not the stream: no reference cycle keeps a finished
        # stream (and its response) alive until the garbage collector runs.
        self._decoder = StreamDecoder(kind, info.url, idle,
                                      cancelled=lambda: token.cancelled,
                                      cancelled_error=lambda: cancelled_error(info),
                                      max_event_bytes=max_event_bytes)

    # ------------------------------------------------------------------ public API

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._info.token.cancelled

    def open(self) -> None:
        """Send the request now (otherwise the first ``next()`` does).

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
            self._response = self._opener(self._info)
        except BaseException:
            self._closed = True
            raise

    def cancel(self) -> None:
        """Stop the stream from any thread: closes the connection so llama-server frees
        the slot. The iterating thread's next read raises ``StreamCancelled``."""
        self._info.token.cancel()

    def close(self) -> None:
        """Release the connection (closing it unless the answer was read to the end)."""
        self._closed = True
        if self._gen is not None:
            gen, self._gen = self._gen, None
            close = getattr(gen, "close", None)
            if close is not None:
                close()
        self._info.token.detach()
        if self._response is not None:
            self._response.close()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Delta:
        if self._gen is None:
            if self._closed:
                raise StopIteration
            self._gen = self._run()
        try:
            return next(self._gen)
        except StopIteration:
            self.close()
            raise
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def pump(self, on_delta: Callable[[Delta], None], relay: Relay | None = None) -> StreamEnd:
        """Read the whole answer, calling ``on_delta`` for each delta; return how it ended.

        With ``relay``, the relay's thread reads the body (and calls ``on_delta``) while
        this thread waits: one thread then serves every stream's tokens (see
        :mod:`bridge.llama.relay`). Without one, or for a body the relay cannot read
        (TLS, not chunked), this thread iterates the stream itself.

        Raises:
            BridgeError: as iterating would, or whatever ``on_delta`` raised.
        """
        self.open()
        body = self._handoff() if relay is not None else None
        if relay is not None and body is not None:
            sock, head, dechunker = body
            return relay.relay(self, sock, head, dechunker, on_delta)
        for delta in self:
            if isinstance(delta, StreamEnd):
                return delta
            on_delta(delta)
        raise BackendProtocolError(f"stream from {self.url} ended without its end")  # unreachable

    # ------------------------------------------------------------------ RelayedStream
    # The relay's view of this stream (bridge.llama.relay.RelayedStream): the same
    # decoder and errors as below, so a relayed body ends exactly as one iterated here.

    def relay_decoder(self) -> StreamDecoder:
        """This stream's decoder (the relay feeds it the body)."""
        return self._decoder

    def relay_cancelled_error(self) -> BridgeError:
        """The error a cancelled stream ends with."""
        return cancelled_error(self._info)

    def relay_idle_error(self) -> BridgeError:
        """The error a stream ends with after :attr:`idle` seconds without a data event."""
        return self._decoder.idle_error()

    def relay_read_error(self, exc: Exception) -> BridgeError:
        """The error a stream ends with when reading its connection raised ``exc``."""
        if self.cancelled:
            return cancelled_error(self._info)
        if isinstance(exc, BridgeError):  # bad chunked framing, from Dechunker
            return exc
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
            return self._decoder.idle_error()
        return self._decoder.broken_error(exc)

    # ------------------------------------------------------------------ internals

    def _handoff(self) -> tuple[socket.socket, bytes, Dechunker] | None:
        """The open response's socket (now non-blocking), the body bytes already read
        into its buffer and a chunked decoder for the rest; None if it cannot be handed off."""
        assert self._response is not None and self._gen is None
        self._check_content_type()
        raw, sock = self._response.raw, self._info.token.sock
        fp = getattr(getattr(raw, "_fp", None), "fp", None)  # the socket's BufferedReader
        if (not Dechunker.applies(raw) or sock is None or fp is None
                or isinstance(sock, ssl.SSLSocket)):
            return None
        try:
            sock.setblocking(False)
            # What the reader buffered with the headers; peek reads nothing more
            # unless its buffer is empty, and a non-blocking read then finds nothing.
            head = fp.read1(len(fp.peek(READ_SIZE)))
        except OSError:  # cancelled just now: the relay's first read reports it
            head = b""
        return sock, head, Dechunker(None)

    def _check_content_type(self) -> None:
        assert self._response is not None
        check_event_stream(self._response.headers.get("Content-Type", ""), self.url)

    def _run(self) -> Iterator[Delta]:
        self.open()
        assert self._response is not None
        self._check_content_type()
        raw = self._response.raw
        # One read returns everything the socket holds, not one HTTP chunk (= one event).
        read: Callable[[int], bytes] = Dechunker.attach(raw) or raw.read1
        decoder = self._decoder
        token = self._info.token
        timeout_set = None  # (socket, timeout) last set: settimeout costs two syscalls
        while True:
            remaining = decoder.budget()
            sock = token.sock
            if sock is not None and timeout_set != (sock, remaining):
                # Each read may wait only for what is left of the idle budget. (A socket
                # closed by a cancel refuses; the read below then reports the cancel.)
                with suppress(OSError):
                    sock.settimeout(remaining)
                timeout_set = (sock, remaining)
            before = time.monotonic()
            try:
                chunk = read(READ_SIZE)
            except Exception as exc:
                raise self.relay_read_error(exc) from exc
            decoder.blocked(time.monotonic() - before)
            if token.cancelled:
                raise cancelled_error(self._info)
            yield from decoder.feed(chunk)
            if decoder.ended or not chunk:
                return
