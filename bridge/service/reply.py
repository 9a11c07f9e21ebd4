"""Everything published for one request goes through its :class:`ReplyChannel`.

See docs/protocol.md, *Reply messages*.

The channel owns the request's ``seq`` counter and its chunkers, so ``seq`` is
contiguous from 0 across message types, and it enforces "exactly one terminal
message, nothing after it". Two threads use a channel: the worker that runs the
request and the ticker that flushes buffered text and sends heartbeats; the lock
keeps seq order equal to publish order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from bridge.mqtt.link import PublishError
from bridge.protocol.address import ReplyAddress
from bridge.protocol.chunks import Chunker, SeqCounter
from bridge.protocol.errors import BridgeError
from bridge.protocol.fit import DoesNotFit, fit, smallest_error
from bridge.protocol.messages import (
    DoneMsg,
    ErrorCode,
    ErrorMsg,
    ProgressMsg,
    ReplyMsg,
    StartMsg,
    Timings,
    Usage,
    encode,
)

log = logging.getLogger("bridge.service.reply")

_RECORD_LIMIT = 512 * 1024  # bytes of an answer kept for replaying it to a duplicate
# What one kept payload costs beyond its bytes (bytes object header, list slot): counted
# so that a per-token answer (~50-byte payloads) cannot keep twice the limit in memory.
_RECORD_ENTRY_OVERHEAD = 48
# Flush deadlines are rounded down to this grid (and to flush_s / 5 at most), so that
# many streams share ticker wake-ups: see ReplyChannel.due().
_FLUSH_GRID_S = 0.01


class Publisher(Protocol):
    """What a :class:`ReplyChannel` (and the ticker, through it) uses of the MQTT link
    (:class:`bridge.mqtt.link.MqttLink`)."""

    def publish(self, topic: str, payload: bytes, *, correlation_data: bytes | None = None,
                flow_controlled: bool = True) -> mqtt.MQTTMessageInfo:
        """Hand one message to the broker's client; may wait for room when flow controlled.

        Raises:
            PublishError: it could not be published (the message says why).
        """
        ...

    def has_room(self) -> bool:
        """Whether a flow-controlled publish would go out without waiting."""
        ...


class ReplyChannel:
    """The ordered stream of reply messages for one request.

    Args:
        link: where to publish.
        address: the reply topic, the request's id and its Correlation Data.
        chunk_bytes: size bound of every chunk payload.
        flush_s: how long deltas may be coalesced.
        record: keep the published payloads so a duplicate request can be answered again.
        clock: monotonic time in seconds (injectable for tests).
    """

    def __init__(
        self,
        link: Publisher,
        address: ReplyAddress,
        *,
        chunk_bytes: int,
        flush_s: float,
        record: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.address = address
        self.lock = threading.Lock()
        self.seq = SeqCounter()
        self.chunk_bytes = chunk_bytes
        self._clock = clock
        self._text = Chunker(address.request_id, self.seq, chunk_bytes=chunk_bytes,
                             flush_s=flush_s, clock=clock)
        self._reasoning: Chunker | None = None
        self._flush_s = flush_s
        self._grid_s = min(_FLUSH_GRID_S, flush_s / 5)
        self.last_sent = clock()
        self.first_text_at: float | None = None
        self.finished = False
        self.terminal: str | None = None
        # paho's handle of the terminal message: whether it reached the broker.
        self.terminal_info: mqtt.MQTTMessageInfo | None = None
        self.record: list[bytes] | None = [] if record else None
        self._record_bytes = 0

    # ------------------------------------------------------------------ low level

    def _publish(self, payload: bytes, *, flow_controlled: bool = True) -> mqtt.MQTTMessageInfo:
        """Publish one payload; caller holds the lock.

        No deadline: a message whose ``seq`` is taken must be sent, or the device sees a
        gap and never gets its terminal message. While the broker is away this waits
        (until the link closes); ``max_generation_s`` meanwhile cancels the HTTP call.
        """
        info = self.link.publish(self.address.topic, payload,
                                 correlation_data=self.address.correlation_data,
                                 flow_controlled=flow_controlled)
        self.last_sent = self._clock()
        if self.record is not None:
            self._record_bytes += len(payload) + _RECORD_ENTRY_OVERHEAD
            if self._record_bytes > _RECORD_LIMIT:
                self.record = None  # too big to keep; a duplicate then gets an error instead
            else:
                self.record.append(payload)
        return info

    def _send(self, message_type: type[Any], *, flow_controlled: bool = True,
              room: int | None = None, **fields: Any) -> mqtt.MQTTMessageInfo:
        message = message_type(id=self.address.request_id, seq=self.seq.take(), **fields)
        return self._publish(self._fitted(message, room), flow_controlled=flow_controlled)

    def _bound(self, room: int | None) -> int | None:
        """How small a message must be made: the device's bound, or ``room`` (the broker's)
        when that is smaller. None without a device bound: only a device that gave
        ``max_packet`` gets messages with fields left out; for the broker's bound a
        ``reply`` sends its content as chunks instead (see :meth:`reply_fits`)."""
        device = self.address.max_payload
        return device if device is None or room is None else min(room, device)

    def _fitted(self, message: Any, room: int | None = None) -> bytes:
        """``message`` brought down to the device's bound (see bridge.protocol.fit).

        Intake refuses a ``max_packet`` below the smallest form of every message, so only a
        terminal message the bridge does not size for (a backend's unknown, long
        ``finish_reason``) can be too large: it becomes the smallest ``error``, which fits.
        """
        try:
            return fit(message, self._bound(room))
        except DoesNotFit as exc:
            log.warning("%s of %s does not fit the device's max_packet (%s): sending the "
                        "smallest error instead", message.type, self.address.request_id, exc)
            return smallest_error(self.address.request_id, message.seq, ErrorCode.internal,
                                  retryable=False)

    # ------------------------------------------------------------------ messages

    def start_locked(self, model: str | None, queue: int) -> None:
        """Publish ``start``; the caller holds :attr:`lock` (it queues the job under it).

        Sent by the intake thread, which must never wait for the publish window.
        """
        self._send(StartMsg, flow_controlled=False, model=model, queue=queue)

    def progress(self, **fields: Any) -> None:
        """Heartbeat (``queued_ms``, ``prompt_progress`` or none); no-op after the terminal
        message. Text still being coalesced (a ``flush_ms`` longer than ``heartbeat_s``)
        goes out instead: it says more than a ``progress`` would."""
        with self.lock:
            if self.finished:
                return
            if self.due() is not None:
                self._flush_all()
            else:
                self._send(ProgressMsg, **fields)

    def text(self, text: str) -> bool:
        """Add generated text.

        Returns:
            True if buffered text got a new flush deadline (the ticker must be told
            :meth:`due`); False if nothing is buffered or the deadline is the one
            buffered text already had (most deltas: telling the ticker again per token
            was measurable).
        """
        with self.lock:
            if self.first_text_at is None:
                self.first_text_at = self._clock()
            if self._reasoning is not None and self._reasoning.pending:
                for payload in self._reasoning.flush():
                    self._publish(payload)
            return self._feed(self._text, text)

    def reasoning(self, text: str) -> bool:
        """Add reasoning text (only when the request asked for it).

        Returns:
            as :meth:`text`.
        """
        with self.lock:
            if self._reasoning is None:
                self._reasoning = Chunker(self.address.request_id, self.seq,
                                          chunk_bytes=self.chunk_bytes, flush_s=self._flush_s,
                                          field="reasoning", clock=self._clock)
            for payload in self._text.flush():
                self._publish(payload)
            return self._feed(self._reasoning, text)

    def _feed(self, chunker: Chunker, text: str) -> bool:
        """Feed ``chunker`` and publish what it completes; caller holds the lock.

        Returns:
            True if its buffered text got a new flush deadline (see :meth:`text`).
        """
        before = chunker.due()
        for payload in chunker.feed(text):
            self._publish(payload)
        due = chunker.due()
        return due is not None and due != before

    def due(self) -> float | None:
        """When buffered text must be flushed (``time.monotonic()``), or None.

        The chunkers' deadlines rounded down to a grid of ``_FLUSH_GRID_S``: text is
        flushed at most that much before ``flush_s`` is up, and the ticker wakes at most
        once per grid step however many streams buffer text (instead of once per stream
        and deadline, scanning every stream each time).
        """
        due = self._text.due()  # called for every buffered token: no lists on this path
        if self._reasoning is not None:
            other = self._reasoning.due()
            if due is None or (other is not None and other < due):
                due = other
        if due is None or not self._grid_s:
            return due
        return due - due % self._grid_s

    def poll(self) -> None:
        """Flush text whose coalescing time is up. Never waits for a busy channel."""
        if not self.lock.acquire(blocking=False):
            return  # the worker is publishing right now; it will see the deadline itself
        try:
            now = self._clock()
            grid = self._grid_s
            for chunker in (self._text, self._reasoning):
                if chunker is not None:
                    due = chunker.due()
                    if due is not None and (due - due % grid if grid else due) <= now:
                        for payload in chunker.flush():
                            self._publish(payload)
        except PublishError as exc:
            log.warning("flush for %s failed: %s", self.address.request_id, exc)
        finally:
            self.lock.release()

    def _flush_all(self) -> None:
        for chunker in (self._reasoning, self._text):
            if chunker is not None:
                for payload in chunker.flush():
                    self._publish(payload)

    def chunks(self, text: str) -> None:
        """Send a whole text as bounded chunks at once (a ``reply`` too large for one message)."""
        with self.lock:
            whole = Chunker(self.address.request_id, self.seq, chunk_bytes=self.chunk_bytes,
                            flush_s=0, clock=self._clock)
            for payload in whole.feed(text):
                self._publish(payload)

    # ------------------------------------------------------------------ terminal messages

    def done(self, finish_reason: str, usage: Usage | None, timings: Timings, *,
             flow_controlled: bool = True) -> None:
        """Terminal ``done``; ``flow_controlled=False`` from the intake thread, which must
        never wait for the publish window."""
        self._terminal(DoneMsg, flow_controlled=flow_controlled, finish_reason=finish_reason,
                       usage=usage or Usage(), timings=timings)

    def reply(self, room: int, **fields: Any) -> None:
        """Terminal ``reply``, within ``room`` bytes (the broker's bound) and the device's."""
        self._terminal(ReplyMsg, room=room, **fields)

    def reply_fits(self, room: int, **fields: Any) -> bool:
        """Whether a ``reply`` with these fields, sent next, fits ``room`` bytes and the
        device's bound (leaving out what :data:`bridge.protocol.fit.DROP_ORDER` allows)."""
        message = ReplyMsg(id=self.address.request_id, seq=self.seq.next, **fields)
        bound = self._bound(room)
        if bound is None:
            return len(encode(message)) <= room
        try:
            fit(message, bound)
        except DoesNotFit:
            return False
        return True

    def error(self, code: ErrorCode, message: str, *, retryable: bool = False,
              retry_after_ms: int | None = None, backend_type: str | None = None) -> None:
        self._terminal(ErrorMsg, code=code, message=message, retryable=retryable,
                       retry_after_ms=retry_after_ms, backend_type=backend_type)

    def fail(self, exc: BridgeError) -> None:
        """Answer with the ``error`` that ``exc`` maps to."""
        self.error(exc.code, exc.public_message, retryable=exc.retryable,
                   retry_after_ms=getattr(exc, "retry_after_ms", None),
                   backend_type=getattr(exc, "error_type", None))

    def _terminal(self, message_type: type[Any], *, flow_controlled: bool = True,
                  **fields: Any) -> None:
        with self.lock:
            if self.finished:
                log.debug("%s already ended with %s; dropping a second terminal %s",
                          self.address.request_id, self.terminal, message_type.__name__)
                return
            self.finished = True
            self.terminal = message_type.__name__
            try:
                self._flush_all()  # buffered text always precedes the terminal message
            finally:
                self.terminal_info = self._send(message_type, flow_controlled=flow_controlled,
                                                **fields)

    def refused(self, topic: str, message: str) -> None:
        """End a request whose reply stream the broker refused: one ``error`` on ``topic``.

        Sent whatever was sent before (the refused messages never arrived, so the
        device saw no terminal message), with the next ``seq``; the refused messages
        show as a gap. Not recorded: a duplicate of this request must run again.
        """
        with self.lock:
            self.finished = True
            self.terminal = ErrorMsg.__name__
            self.record = None
            payload = self._fitted(ErrorMsg(id=self.address.request_id, seq=self.seq.take(),
                                            code=ErrorCode.internal, message=message,
                                            retryable=False))
            # Not flow controlled: it may be sent from the intake thread (see
            # bridge.service.finish.Finisher.confirm).
            self.terminal_info = self.link.publish(topic, payload,
                                                   correlation_data=self.address.correlation_data,
                                                   flow_controlled=False)
