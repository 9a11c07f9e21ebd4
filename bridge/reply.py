"""Everything published for one request goes through its :class:`ReplyChannel` (SPEC §6).

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
from typing import Any

from bridge.chunker import Chunker, SeqCounter
from bridge.exceptions import BridgeError
from bridge.mqtt_link import MqttLink, PublishError
from bridge.wire import (
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

log = logging.getLogger("bridge.reply")

_RECORD_LIMIT = 512 * 1024  # bytes of an answer kept for replaying it to a duplicate


class ReplyChannel:
    """The ordered stream of reply messages for one request.

    Args:
        link: where to publish.
        topic: ``P/reply/{client}/{id}`` or the request's v5 Response Topic.
        request_id: the request's id, in every message.
        correlation_data: MQTT 5 Correlation Data echoed on every message.
        chunk_bytes: size bound of every chunk payload.
        flush_s: how long deltas may be coalesced.
        deadline: ``time.monotonic()`` after which publishing stops waiting for the broker.
        record: keep the published payloads so a duplicate request can be answered again.
    """

    def __init__(
        self,
        link: MqttLink,
        topic: str,
        request_id: str,
        *,
        correlation_data: bytes | None,
        chunk_bytes: int,
        flush_s: float,
        deadline: float | None = None,
        record: bool = True,
    ) -> None:
        self.link = link
        self.topic = topic
        self.request_id = request_id
        self.correlation_data = correlation_data
        self.lock = threading.Lock()
        self.seq = SeqCounter()
        self.chunk_bytes = chunk_bytes
        self._text = Chunker(request_id, self.seq, chunk_bytes=chunk_bytes, flush_s=flush_s)
        self._reasoning: Chunker | None = None
        self._flush_s = flush_s
        self.deadline = deadline
        self.last_sent = time.monotonic()
        self.first_text_at: float | None = None
        self.finished = False
        self.terminal: str | None = None
        self.record: list[bytes] | None = [] if record else None
        self._record_bytes = 0

    # ------------------------------------------------------------------ low level

    def _publish(self, payload: bytes) -> None:
        """Publish one payload; caller holds the lock."""
        self.link.publish(self.topic, payload, correlation_data=self.correlation_data,
                          deadline=self.deadline)
        self.last_sent = time.monotonic()
        if self.record is not None:
            self._record_bytes += len(payload)
            if self._record_bytes > _RECORD_LIMIT:
                self.record = None  # too big to keep; a duplicate then gets an error instead
            else:
                self.record.append(payload)

    def _send(self, message_type: type[Any], **fields: Any) -> None:
        self._publish(encode(message_type(id=self.request_id, seq=self.seq.take(), **fields)))

    # ------------------------------------------------------------------ messages

    def start_locked(self, model: str | None, queue: int) -> None:
        """Publish ``start``; the caller holds :attr:`lock` (it queues the job under it)."""
        self._send(StartMsg, model=model, queue=queue)

    def progress(self, **fields: Any) -> None:
        """Heartbeat (``queued_ms`` or ``prompt_progress``); no-op after the terminal message."""
        with self.lock:
            if not self.finished:
                self._send(ProgressMsg, **fields)

    def text(self, text: str) -> bool:
        """Add generated text.

        Returns:
            True if the chunker now holds buffered text (the ticker must flush it later).
        """
        with self.lock:
            if self.first_text_at is None:
                self.first_text_at = time.monotonic()
            if self._reasoning is not None and self._reasoning.pending:
                for payload in self._reasoning.flush():
                    self._publish(payload)
            for payload in self._text.feed(text):
                self._publish(payload)
            return self._text.pending

    def reasoning(self, text: str) -> bool:
        """Add reasoning text (only when the request asked for it)."""
        with self.lock:
            if self._reasoning is None:
                self._reasoning = Chunker(self.request_id, self.seq, chunk_bytes=self.chunk_bytes,
                                          flush_s=self._flush_s, field="reasoning")
            for payload in self._text.flush():
                self._publish(payload)
            for payload in self._reasoning.feed(text):
                self._publish(payload)
            return self._reasoning.pending

    def due(self) -> float | None:
        """When buffered text must be flushed (``time.monotonic()``), or None."""
        dues = [d for c in (self._text, self._reasoning) if c is not None
                for d in (c.due(),) if d is not None]
        return min(dues) if dues else None

    def poll(self) -> None:
        """Flush text whose coalescing time is up. Never waits for a busy channel."""
        if not self.lock.acquire(blocking=False):
            return  # the worker is publishing right now; it will see the deadline itself
        try:
            for chunker in (self._text, self._reasoning):
                if chunker is not None:
                    for payload in chunker.poll():
                        self._publish(payload)
        except PublishError as exc:
            log.warning("flush for %s failed: %s", self.request_id, exc)
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
            whole = Chunker(self.request_id, self.seq, chunk_bytes=self.chunk_bytes, flush_s=0)
            for payload in whole.feed(text):
                self._publish(payload)

    # ------------------------------------------------------------------ terminal messages

    def done(self, finish_reason: str, usage: Usage | None, timings: Timings) -> None:
        self._terminal(DoneMsg, finish_reason=finish_reason, usage=usage or Usage(),
                       timings=timings)

    def reply(self, **fields: Any) -> None:
        self._terminal(ReplyMsg, **fields)

    def reply_size(self, **fields: Any) -> int:
        """Encoded size of a ``reply`` with these fields, if it were sent next."""
        return len(encode(ReplyMsg(id=self.request_id, seq=self.seq.next, **fields)))

    def error(self, code: ErrorCode, message: str, *, retryable: bool = False,
              retry_after_ms: int | None = None, backend_type: str | None = None) -> None:
        self._terminal(ErrorMsg, code=code, message=message, retryable=retryable,
                       retry_after_ms=retry_after_ms, backend_type=backend_type)

    def fail(self, exc: BridgeError) -> None:
        """Answer with the ``error`` that ``exc`` maps to."""
        self.error(exc.code, exc.message, retryable=exc.retryable,
                   retry_after_ms=getattr(exc, "retry_after_ms", None),
                   backend_type=getattr(exc, "error_type", None))

    def _terminal(self, message_type: type[Any], **fields: Any) -> None:
        with self.lock:
            if self.finished:
                log.debug("%s already ended with %s; dropping a second terminal %s",
                          self.request_id, self.terminal, message_type.__name__)
                return
            self.finished = True
            self.terminal = message_type.__name__
            try:
                self._flush_all()  # buffered text always precedes the terminal message
            finally:
                # No deadline for the terminal message: it must not be skipped.
                self.deadline = None
                self._send(message_type, **fields)
