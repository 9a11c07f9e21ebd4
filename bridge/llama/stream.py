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
from bridge.llama.events import EventAccumulator, Kind
from bridge.llama.failures import cancelled_error
from bridge.llama.http import CallInfo
from bridge.llama.sse import DEFAULT_MAX_EVENT_BYTES, SSEComment, SSEItem, SSEParser
from bridge.llama.types import (
    Delta,
    StreamEnd,
)
from bridge.protocol.errors import BackendProtocolError, BridgeError, IdleTimeout
from bridge.protocol.messages import Usage

if TYPE_CHECKING:
    from bridge.llama.relay import Relay

# A blocked read holds a buffer of this size (BufferedReader.read1 allocates it before
# waiting), per stream: 64 KiB cost 16 MiB at 256 streams; 8 KiB still carries ~20
# events per read when tokens pile up.
READ_SIZE = 8 * 1024


class Stream:
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
        self._kind = kind
        self._idle = idle
        self._max_event_bytes = max_event_bytes
        self._response: requests.Response | None = None
        self._gen: Iterator[Delta] | None = None
        self._closed = False
        self.pings = 0
        """Keep-alive comment frames received (for diagnostics)."""
        self.events = 0
        """Data events received (the idle timeout restarts with each)."""
        self.first_delta_at: float | None = None
        """``time.monotonic()`` of the first text/reasoning/tool delta."""
        self.token_events = 0
        """Data events that carried generated text, reasoning or a tool call and were
        handed on: one per token as llama-server streams (see :meth:`usage_so_far`)."""
        self._acc: EventAccumulator | None = None

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """The URL this stream requests."""
        return self._info.url

    @property
    def attempts(self) -> int:
        """Connection attempts made so far (retries before the first byte included)."""
        return self._info.attempts

    @property
    def started_at(self) -> float:
        """``time.monotonic()`` when the stream object was created."""
        return self._info.started_at

    @property
    def first_byte_at(self) -> float | None:
        """``time.monotonic()`` when llama-server's response headers arrived."""
        return self._info.first_byte_at

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

    @property
    def idle(self) -> float:
        """The idle timeout in seconds."""
        return self._idle

    def usage_so_far(self) -> Usage:
        """The usage of what was generated until now, also for a stream that never ended.

        llama-server reports usage only in the stream's last event, which a cancelled (or
        broken) stream never gets. Then ``completion_tokens`` is :attr:`token_events` --
        llama-server streams one event per generated token -- and ``prompt_tokens`` what
        its timings said (``prompt_n``), else 0.
        """
        acc = self._acc
        if acc is not None and acc.usage is not None:
            return acc.usage
        prompt = (acc.timings or {}).get("prompt_n") if acc is not None else None
        return Usage(prompt_tokens=prompt if type(prompt) is int and prompt >= 0 else 0,
                     completion_tokens=self.token_events)

    # ------------------------------------------------------------------ decoding

    def _decoders(self) -> tuple[SSEParser, EventAccumulator]:
        """A parser for this stream's events and the accumulator of its deltas."""
        self._acc = EventAccumulator(self._kind, self.url)
        return SSEParser(self._max_event_bytes), self._acc

    def _deltas(self, items: list[SSEItem], acc: EventAccumulator) -> Iterator[Delta]:
        """The deltas in parsed SSE ``items``, in order, up to the stream's end (``acc.done``).

        Counts keep-alive pings and data events, notes the first delta, and raises
        ``StreamCancelled`` if the stream is cancelled while the consumer holds a delta.
        """
        for item in items:
            if isinstance(item, SSEComment):
                self.pings += 1
                continue
            self.events += 1
            counted = False
            for delta in acc.event(item.data, item.event):
                if self.cancelled:
                    raise cancelled_error(self._info)
                if self.first_delta_at is None:
                    self.first_delta_at = time.monotonic()
                if not counted:  # before the consumer sees it: a cancel may follow at once
                    counted = True
                    self.token_events += 1
                yield delta
            if acc.done:
                return

    def _idle_error(self) -> IdleTimeout:
        what = (f"only {self.pings} keep-alive ping(s)" if self.pings else "nothing")
        return IdleTimeout(
            f"llama-server at {self.url} sent no data for idle={self._idle:g} s mid-stream "
            f"({what} since the last event); the server may be stuck or overloaded: check "
            "its log and /slots, or raise the idle timeout"
        )

    def _read_error(self, exc: Exception) -> BridgeError:
        if self.cancelled:
            return cancelled_error(self._info)
        if isinstance(exc, BridgeError):  # bad chunked framing, from Dechunker
            return exc
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
            return self._idle_error()
        return BackendProtocolError(
            f"connection to llama-server at {self.url} broke mid-stream ({exc}); not retried "
            "because part of the answer was already received: check the server's log "
            "(crash, restart, out of memory?)"
        )

    # ------------------------------------------------------------------ RelayedStream
    # The relay's view of this stream (bridge.llama.relay.RelayedStream): the same
    # decoding and errors as above, so a relayed body ends exactly as one iterated here.
    # Aliases, not wrappers: relay_deltas runs once per socket read.

    relay_decoders = _decoders
    relay_deltas = _deltas
    relay_idle_error = _idle_error
    relay_read_error = _read_error

    def relay_cancelled_error(self) -> BridgeError:
        """The error a cancelled stream ends with."""
        return cancelled_error(self._info)

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
        content_type = self._response.headers.get("Content-Type", "")
        if "text/event-stream" not in content_type:
            raise BackendProtocolError(
                f"llama-server at {self.url} answered a streamed request with "
                f"Content-Type {content_type!r}, not an event stream: is this URL a "
                "llama-server (or a proxy that buffers/rewrites responses)?"
            )

    def _run(self) -> Iterator[Delta]:
        self.open()
        assert self._response is not None
        self._check_content_type()
        raw = self._response.raw
        # One read returns everything the socket holds, not one HTTP chunk (= one event).
        read: Callable[[int], bytes] = Dechunker.attach(raw) or raw.read1
        parser, acc = self._decoders()
        token = self._info.token
        waited = 0.0  # seconds blocked on the socket since the last data event
        timeout_set = None  # (socket, timeout) last set: settimeout costs two syscalls
        while True:
            remaining = self._idle - waited
            if remaining <= 0:
                raise self._idle_error()
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
                raise self._read_error(exc) from exc
            waited += time.monotonic() - before
            if token.cancelled:
                raise cancelled_error(self._info)
            seen = self.events
            yield from self._deltas(parser.feed(chunk) if chunk else parser.finish(), acc)
            if acc.done:
                yield acc.end()
                return
            if self.events != seen:
                waited = 0.0
            if not chunk:
                # EOF: a stream that reported its finish_reason is complete even
                # without [DONE] (the native /completion endpoint never sends one).
                yield acc.end()
                return
