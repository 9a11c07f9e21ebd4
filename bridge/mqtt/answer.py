"""An answer as text, and an ``error`` reply as an exception (the device clients' text
streams; no I/O)."""

from __future__ import annotations

from bridge.mqtt.exchange import Delivery
from bridge.protocol.errors import (
    AnswerChanged,
    BackendHTTPError,
    BackendTimeout,
    BackendUnavailable,
    BridgeError,
    RequestRejected,
)
from bridge.protocol.messages import ErrorCode, ErrorMsg


def error_of(msg: ErrorMsg) -> BridgeError:
    """The exception of an ``error`` reply: the class of its ``code``, with the wire's
    ``code``, ``message`` and ``retryable``.

    ``bad_request``, ``too_large``, ``rate_limited``, ``busy`` and ``expired`` are
    :class:`RequestRejected` (with ``retry_after_ms``); ``backend_unavailable``
    :class:`BackendUnavailable`, ``timeout`` :class:`BackendTimeout`, ``backend_error``
    :class:`BackendHTTPError` (``error_type`` is ``backend_type``; llama-server's status
    does not travel, so ``status`` is 0), ``internal`` :class:`BridgeError`.
    """
    exc: BridgeError
    match msg.code:
        case ErrorCode.backend_unavailable:
            exc = BackendUnavailable(msg.message)
        case ErrorCode.timeout:
            exc = BackendTimeout(msg.message)
        case ErrorCode.backend_error:
            exc = BackendHTTPError(msg.message, status=0, error_type=msg.backend_type)
        case ErrorCode.internal:
            exc = BridgeError(msg.message)
        case _:
            exc = RequestRejected(msg.code, msg.message, retryable=msg.retryable,
                                  retry_after_ms=msg.retry_after_ms)
    exc.code = msg.code
    exc.retryable = msg.retryable  # the bridge's word, not a guess from the class
    return exc


class AnswerText:
    """The text of one answer, piece by piece, across a restart of the answer.

    When the bridge answers a resend anew (:attr:`Delivery.restarted`), the text given out
    so far is not given again: the new answer must begin with it (``temperature: 0`` and
    a ``seed`` make sure), and only what goes beyond it is new.
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._replay: str | None = None  # the text given out, while a new answer repeats it
        self._at = 0  # how much of it the new answer repeated

    def feed(self, delivery: Delivery) -> list[str]:
        """The new pieces of text in ``delivery`` (``chunk`` text, a ``reply``'s content).

        Raises:
            BridgeError: the answer ended in an ``error`` (see :func:`error_of`).
            AnswerChanged: a restarted answer differs from the text given out.
        """
        if delivery.restarted:
            self._replay = "".join(self._parts)
            self._parts = [self._replay]
            self._at = 0
        fresh: list[str] = []
        for msg in delivery.messages:
            if msg.type == "error":
                raise error_of(msg)
            piece = msg.text if msg.type == "chunk" else \
                msg.content if msg.type == "reply" else None
            if piece and (new := self._follow(piece)):
                fresh.append(new)
        return fresh

    def _follow(self, piece: str) -> str:
        if self._replay is None:
            self._parts.append(piece)
            return piece
        known = self._replay[self._at:self._at + len(piece)]
        if not piece.startswith(known):
            raise AnswerChanged(f"the answer started again and differs from the text given "
                                f"out within characters {self._at} to {self._at + len(piece)}")
        self._at += len(piece)
        if self._at < len(self._replay):
            return ""
        self._replay = None
        new = piece[len(known):]
        if new:
            self._parts.append(new)
        return new

    @property
    def text(self) -> str:
        """The text given out so far."""
        return "".join(self._parts)
