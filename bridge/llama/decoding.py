"""The rules of reading one streamed answer, without I/O: body bytes in, typed deltas out.

Every reader of a streamed answer -- :class:`~bridge.llama.stream.Stream` (a blocking
socket), :class:`~bridge.llama.relay.Relay` (one ``epoll`` thread for all streams) and
:class:`~bridge.llama.async_stream.AsyncStream` (asyncio) -- only moves bytes; what those
bytes mean, and how the stream ends, is decided here once:

* keep-alive pings (SSE comments) are counted and are not data: they do not restart
  the idle timeout;
* an in-band error event raises :class:`~bridge.protocol.errors.BackendStreamError`
  (:mod:`bridge.llama.events`);
* ``[DONE]`` ends the stream; so does the end of the body after a ``finish_reason``
  (the native ``/completion`` endpoint never sends ``[DONE]``); the end of the body
  without one is a cut-off stream;
* a UTF-8 character split across reads is decoded whole (:mod:`bridge.llama.sse`);
* the idle timeout counts only the time a reader was blocked waiting for data since
  the last data event, not the time the consumer spent with a delta.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from bridge.llama.events import EventAccumulator, Kind
from bridge.llama.sse import DEFAULT_MAX_EVENT_BYTES, SSEComment, SSEItem, SSEParser
from bridge.llama.types import Delta
from bridge.protocol.errors import BackendProtocolError, BridgeError, IdleTimeout
from bridge.protocol.messages import Usage


class StreamDecoder:
    """One streamed answer's decoding state: parser, accumulator, counters, idle budget.

    Args:
        kind: ``"chat"`` or ``"completion"``.
        url: the URL the answer comes from (for messages).
        idle: the idle timeout in seconds.
        cancelled: whether the stream was cancelled (checked before each delta is
            handed on, as the consumer may cancel while it holds the previous one).
        cancelled_error: the error a cancelled stream ends with.
        max_event_bytes: bound on one SSE event.
    """

    __slots__ = ("acc", "cancelled", "cancelled_error", "events", "first_delta_at", "idle",
                 "parser", "pings", "token_events", "url", "waited")

    def __init__(self, kind: Kind, url: str, idle: float, *, cancelled: Callable[[], bool],
                 cancelled_error: Callable[[], BridgeError],
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.url = url
        self.idle = idle
        self.cancelled = cancelled
        self.cancelled_error = cancelled_error
        self.parser = SSEParser(max_event_bytes)
        self.acc = EventAccumulator(kind, url)
        self.pings = 0
        """Keep-alive comment frames received (for diagnostics)."""
        self.events = 0
        """Data events received (the idle timeout restarts with each)."""
        self.first_delta_at: float | None = None
        """``time.monotonic()`` of the first text/reasoning/tool delta."""
        self.token_events = 0
        """Data events that carried generated text, reasoning or a tool call and were
        handed on: one per token as llama-server streams (see :meth:`usage_so_far`)."""
        self.waited = 0.0
        """Seconds a reader was blocked on the connection since the last data event."""

    # ------------------------------------------------------------------ bytes to deltas

    def feed(self, chunk: bytes) -> Iterator[Delta]:
        """The deltas in the next bytes of the body (``b""``: the body ended).

        The last delta is the :class:`~bridge.llama.types.StreamEnd` when these bytes
        complete the answer (see :attr:`ended`). Restarts the idle budget when they
        held a data event.

        Raises:
            BackendStreamError: an in-band error event.
            BackendProtocolError: a malformed event, or a body cut off before its end.
            BridgeError: :attr:`cancelled_error`, when cancelled while a delta was held.
        """
        seen = self.events
        yield from self.deltas(self.parser.feed(chunk) if chunk else self.parser.finish())
        if self.events != seen:
            self.waited = 0.0
        if self.acc.done or not chunk:
            yield self.acc.end()

    @property
    def ended(self) -> bool:
        """True once the stream's end arrived (``[DONE]``)."""
        return self.acc.done

    def deltas(self, items: list[SSEItem]) -> Iterator[Delta]:
        """The deltas in parsed SSE ``items``, in order, up to the stream's end (``[DONE]``).

        Counts keep-alive pings and data events, notes the first delta, and raises
        :attr:`cancelled_error` if the stream is cancelled while the consumer holds a delta.
        """
        acc = self.acc
        for item in items:
            if isinstance(item, SSEComment):
                self.pings += 1
                continue
            self.events += 1
            counted = False
            for delta in acc.event(item.data, item.event):
                if self.cancelled():
                    raise self.cancelled_error()
                if self.first_delta_at is None:
                    self.first_delta_at = time.monotonic()
                if not counted:  # before the consumer sees it: a cancel may follow at once
                    counted = True
                    self.token_events += 1
                yield delta
            if acc.done:
                return

    # ------------------------------------------------------------------ idle budget

    def budget(self) -> float:
        """Seconds the next read may wait: what is left of the idle timeout.

        Raises:
            IdleTimeout: nothing is left.
        """
        remaining = self.idle - self.waited
        if remaining <= 0:
            raise self.idle_error()
        return remaining

    def blocked(self, seconds: float) -> None:
        """Count ``seconds`` a reader spent blocked waiting for the body."""
        self.waited += seconds

    # ------------------------------------------------------------------ how it fails

    def idle_error(self) -> IdleTimeout:
        """The error of a stream that sent no data event for :attr:`idle` seconds."""
        what = (f"only {self.pings} keep-alive ping(s)" if self.pings else "nothing")
        return IdleTimeout(
            f"llama-server at {self.url} sent no data for idle={self.idle:g} s mid-stream "
            f"({what} since the last event); the server may be stuck or overloaded: check "
            "its log and /slots, or raise the idle timeout"
        )

    def broken_error(self, exc: BaseException) -> BackendProtocolError:
        """The error of a stream whose connection broke mid-body (``exc``); not retried."""
        return BackendProtocolError(
            f"connection to llama-server at {self.url} broke mid-stream ({exc}); not retried "
            "because part of the answer was already received: check the server's log "
            "(crash, restart, out of memory?)"
        )

    def usage_so_far(self) -> Usage:
        """The usage of what was generated until now, also for a stream that never ended.

        llama-server reports usage only in the stream's last event, which a cancelled (or
        broken) stream never gets. Then ``completion_tokens`` is :attr:`token_events` --
        llama-server streams one event per generated token -- and ``prompt_tokens`` what
        its timings said (``prompt_n``), else 0.
        """
        acc = self.acc
        if acc.usage is not None:
            return acc.usage
        prompt = (acc.timings or {}).get("prompt_n")
        return Usage(prompt_tokens=prompt if type(prompt) is int and prompt >= 0 else 0,
                     completion_tokens=self.token_events)


def check_event_stream(content_type: str, url: str) -> None:
    """Refuse a streamed answer that is not an event stream.

    Args:
        content_type: the response's ``Content-Type`` header (``""`` if absent).
        url: the URL requested.

    Raises:
        BackendProtocolError: it is something else (an HTML page, a buffered JSON body).
    """
    if "text/event-stream" not in content_type:
        raise BackendProtocolError(
            f"llama-server at {url} answered a streamed request with "
            f"Content-Type {content_type!r}, not an event stream: is this URL a "
            "llama-server (or a proxy that buffers/rewrites responses)?"
        )
