"""One thread reads the body of every running stream.

Why: a real model sends each token in its own TCP segment. With a thread blocked
on each stream's socket, every token cost a thread wake-up, a ``recv`` and a GIL
hand-off -- 90-380 µs of CPU per token at 8-256 paced streams, against 12-19 µs
when the same code gets tokens in bursts (docs/performance.md). Here one
``epoll`` wake-up serves every stream that has data.

A worker still does the blocking part of a request -- connecting, retries,
waiting for the headers, failing over to another backend -- then hands the
connection to :class:`Relay` with :meth:`bridge.llama.stream.Stream.pump` and
waits. The relay reads the socket without blocking, decodes the chunks, the SSE
events and the OpenAI chunks with the stream's own decoders (what it needs of a
stream is :class:`RelayedStream`), and calls the worker's ``on_delta`` for every
delta, in the relay's thread. The worker gets the stream's end, or its error, as
if it had read the stream itself: cancelling (``CancelToken.cancel`` shuts the
socket down), the idle timeout and every error message are the same.
"""

from __future__ import annotations

import http.client
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from typing import Protocol

from bridge.llama.dechunk import Dechunker
from bridge.llama.decoding import StreamDecoder
from bridge.llama.types import Delta, StreamEnd
from bridge.protocol.errors import BridgeError

log = logging.getLogger("bridge.relay")

# Per read of one stream. Streams take turns, one read each: in per-token mode every
# event in a read is a publish, so a smaller read lets the others in sooner.
READ_SIZE = 16 * 1024
_SWEEP_S = 0.25  # how often idle timeouts are checked (their resolution)
_WAIT_S = 1.0  # a waiting worker checks this often that the relay still runs


class RelayedStream(Protocol):
    """What :class:`Relay` needs of a stream whose body it reads.

    :class:`bridge.llama.stream.Stream` is one. The relay decodes the body with the
    stream's own decoder and ends it with the stream's own errors, so that a worker
    cannot tell whether the relay or its own thread read the body. The ``relay_*``
    methods are this contract only, not a stream's API for its consumer.
    """

    @property
    def cancelled(self) -> bool:
        """True once the stream was cancelled."""

    @property
    def idle(self) -> float:
        """The idle timeout in seconds: the longest wait for the next data event."""

    def relay_decoder(self) -> StreamDecoder:
        """The stream's decoder: its ``events`` restart the idle timeout when they grow,
        and its ``deltas`` raise the cancel error if the stream is cancelled while the
        relay's ``on_delta`` holds a delta."""

    def relay_cancelled_error(self) -> BridgeError:
        """The error a cancelled stream ends with (also when the relay stops)."""

    def relay_idle_error(self) -> BridgeError:
        """The error a stream ends with after :attr:`idle` seconds without a data event."""

    def relay_read_error(self, exc: Exception) -> BridgeError:
        """The error a stream ends with when reading its socket raised ``exc``."""


class _Relayed:
    """One stream being read by the relay."""

    __slots__ = ("dechunker", "decoder", "fd", "future", "last", "on_delta", "sock", "stream")

    def __init__(self, stream: RelayedStream, sock: socket.socket, dechunker: Dechunker,
                 on_delta: Callable[[Delta], None]) -> None:
        self.stream = stream
        self.sock = sock
        self.fd = -1  # while registered with the selector
        self.dechunker = dechunker
        self.decoder = stream.relay_decoder()
        self.on_delta = on_delta
        self.future: Future[StreamEnd] = Future()
        self.last = time.monotonic()  # the last data event, for the idle timeout


class Relay:
    """The thread that reads every relayed stream (see the module's docstring).

    :meth:`relay` may be called from any number of worker threads; ``on_delta``
    runs in the relay's thread, one stream's deltas in order.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._incoming: deque[tuple[_Relayed, bytes]] = deque()
        self._streams: dict[int, _Relayed] = {}  # by file descriptor
        self._stopping = False
        self.relayed = 0
        """Streams handed to the relay so far (for diagnostics and tests)."""
        self._thread = threading.Thread(target=self._loop, name="bridge-relay", daemon=True)

    @property
    def running(self) -> int:
        """Streams being read now."""
        return len(self._streams)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread; streams still being read, or handed over later, get
        ``StreamCancelled``."""
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def relay(self, stream: RelayedStream, sock: socket.socket, head: bytes, dechunker: Dechunker,
              on_delta: Callable[[Delta], None]) -> StreamEnd:
        """Read ``stream``'s body from ``sock`` in the relay's thread; wait for its end.

        Args:
            stream: the open stream (its request answered with 200).
            sock: its connection, non-blocking.
            head: body bytes its reader had already buffered.
            dechunker: decodes the body's chunked framing.
            on_delta: called with each delta, in the relay's thread.

        Returns:
            how the stream ended.

        Raises:
            BridgeError: what reading the stream raised, or what ``on_delta`` raised.
        """
        item = _Relayed(stream, sock, dechunker, on_delta)
        if self._stopping:  # the bridge is shutting down
            raise stream.relay_cancelled_error()
        self._incoming.append((item, head))
        self._wake()
        while True:
            try:
                return item.future.result(_WAIT_S)
            except TimeoutError:
                if not self._thread.is_alive():  # a bug (logged); don't wait forever
                    raise RuntimeError("the stream relay is not running") from None

    # ------------------------------------------------------------------ the thread

    def _wake(self) -> None:
        with suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def _loop(self) -> None:
        next_sweep = time.monotonic() + _SWEEP_S
        try:
            while not self._stopping:
                # With no stream there is nothing to time out: sleep until woken.
                timeout = _SWEEP_S if self._streams else None
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        self._take_incoming()
                    else:
                        self._read(key.data)
                now = time.monotonic()
                if not self._streams:
                    next_sweep = now + _SWEEP_S
                elif now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + _SWEEP_S
        except Exception:  # a bug: fail the streams rather than hang their workers
            log.exception("stream relay failed")
        finally:
            self._stopping = True
            self._take_incoming()
            for item in list(self._streams.values()):
                self._end(item, exc=item.stream.relay_cancelled_error())
            self._selector.close()

    def _take_incoming(self) -> None:
        with suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while self._incoming:
            item, head = self._incoming.popleft()
            if self._stopping:
                item.future.set_exception(item.stream.relay_cancelled_error())
                continue
            try:
                self._selector.register(item.sock, selectors.EVENT_READ, item)
            except (OSError, ValueError) as exc:  # closed by a cancel in between
                self._fail(item, exc)
                continue
            item.fd = item.sock.fileno()
            self._streams[item.fd] = item
            self.relayed += 1
            if head:
                self._feed(item, head)

    def _read(self, item: _Relayed) -> None:
        if item.future.done():
            return
        try:
            data = item.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(item, exc)
            return
        self._feed(item, data)

    def _fail(self, item: _Relayed, exc: Exception) -> None:
        self._end(item, exc=item.stream.relay_read_error(exc))

    def _feed(self, item: _Relayed, data: bytes) -> None:
        """Bytes read from ``item``'s socket (b"" at EOF): decode them, pass the deltas on."""
        stream, decoder = item.stream, item.decoder
        if stream.cancelled:
            self._end(item, exc=stream.relay_cancelled_error())
            return
        try:
            if data:
                body = item.dechunker.decode(data)
                items = decoder.parser.feed(body) if body else []
                if item.dechunker.done:
                    items += decoder.parser.finish()
            elif not item.dechunker.done:  # EOF before the last chunk: cut off
                raise stream.relay_read_error(http.client.IncompleteRead(b""))
            else:
                items = decoder.parser.finish()
            seen = decoder.events
            for delta in decoder.deltas(items):
                item.on_delta(delta)
            if decoder.ended or not data or item.dechunker.done:
                # A stream that reported its finish_reason is complete without [DONE].
                self._end(item, result=decoder.acc.end())
            elif decoder.events != seen:
                item.last = time.monotonic()  # after on_delta: publishing is not idling
        except Exception as exc:
            self._end(item, exc=exc)

    def _sweep(self, now: float) -> None:
        for item in list(self._streams.values()):
            if now - item.last >= item.stream.idle:
                self._read(item)  # data may wait that this thread was too busy to read
                if item.future.done() or time.monotonic() - item.last < item.stream.idle:
                    continue
                self._end(item, exc=item.stream.relay_idle_error())

    def _end(self, item: _Relayed, *, result: StreamEnd | None = None,
             exc: BaseException | None = None) -> None:
        if item.future.done():
            return
        # Unregistered before the worker learns of the end: it then closes the socket.
        if self._streams.pop(item.fd, None) is not None:
            with suppress(KeyError, ValueError, OSError):
                self._selector.unregister(item.fd)
        if exc is not None:
            item.future.set_exception(exc)
        else:
            assert result is not None
            item.future.set_result(result)
