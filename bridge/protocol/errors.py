"""Exception hierarchy: one class per way a request can fail.

Every exception carries the wire ``code`` (see :class:`bridge.protocol.messages.ErrorCode`) it
maps to and whether the device may retry, so the bridge turns any failure into a
typed ``error`` reply without a lookup table scattered across modules::

    BridgeError
    ├── RequestRejected          bad input from a device (bad_request, too_large, ...)
    │   └── UnknownProfile       ``profile`` names no profile of this bridge (bad_request)
    └── BackendError             anything that went wrong talking to llama-server
        ├── BackendUnavailable   could not connect / reset before the first byte
        ├── BackendTimeout
        │   ├── ConnectTimeout       (also a BackendUnavailable)
        │   ├── FirstByteTimeout     no response within the first-byte timeout
        │   └── IdleTimeout          stream went silent mid-answer
        ├── BackendHTTPError     llama-server answered 4xx/5xx (carries its error ``type``)
        │   └── BackendStreamError   ``data: {"error": ...}`` arrived mid-stream
        ├── BackendProtocolError malformed events, stream cut without a finish
        └── StreamCancelled      the stream was cancelled by its owner
    └── SessionStoreError        the session database could not be used (internal)

A device client's own failures, seen on the device side of the protocol::

    ReplyTimeout (TimeoutError)  no reply message within the idle timeout
    SequenceError                a gap in ``seq``: reply messages were lost
    └── AnswerChanged            a resend was answered anew with a different text

Whether a device may retry (``retryable``) is decided per class; for llama-server's own
errors (:class:`BackendHTTPError`) by :func:`backend_retryable` from one table,
:data:`LLAMA_ERROR_TYPES`, keyed by the error ``type`` llama-server sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.protocol.messages import ErrorCode

# "llama-server at http://10.0.0.5:8080/v1/chat/completions" or a bare URL in a message.
_HOST_PORT = re.compile(r"host='[^']*', port=\d+")
_BACKEND_URL = re.compile(r"(?:llama-server at )?\bhttps?://[^\s,;()'\"]*[^\s,;()'\".:]")


class BridgeError(Exception):
    """Base class of the ways a request can fail; each carries the wire ``code`` it maps to."""

    code: ErrorCode = ErrorCode.internal
    retryable: bool = False

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self._public = public

    @property
    def public_message(self) -> str:
        """The message as a device may see it: no backend addresses.

        Operators get :attr:`message` in the log; devices do not need to know where
        llama-server runs (an internal address tells an attacker where to look). The
        raiser may give a device's version (``public``); otherwise URLs and urllib3's
        ``host='…', port=N`` are replaced.
        """
        if self._public is not None:
            return self._public
        return _HOST_PORT.sub("host=…", _BACKEND_URL.sub("llama-server", self.message))


class RequestRejected(BridgeError):
    """A device's request cannot be served as sent.

    Args:
        code: the wire error code (``bad_request``, ``too_large``, ``busy``, ...).
        message: what is wrong and what to change, addressed to the device's developer.
        retryable: whether sending the same request later may succeed.
        retry_after_ms: a hint for ``busy``/``rate_limited``.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms


class UnknownProfile(RequestRejected):
    """The request named a profile the bridge's configuration does not define.

    Args:
        message: names the profile and lists the known ones.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.bad_request, message)


class BackendError(BridgeError):
    """llama-server could not produce an answer."""

    code = ErrorCode.backend_error
    retryable = True


class BackendUnavailable(BackendError):
    """llama-server is unreachable, refused the connection or reset it before answering."""

    code = ErrorCode.backend_unavailable


class BackendTimeout(BackendError):
    """A timeout while waiting for llama-server."""

    code = ErrorCode.timeout


class ConnectTimeout(BackendTimeout, BackendUnavailable):
    """The TCP connection to llama-server did not open in time."""

    code = ErrorCode.backend_unavailable


class FirstByteTimeout(BackendTimeout):
    """llama-server accepted the connection but sent nothing within the first-byte timeout."""


class IdleTimeout(BackendTimeout):
    """The stream sent no data event for longer than the idle timeout."""


class BackendHTTPError(BackendError):
    """llama-server answered with an error.

    Args:
        message: llama-server's own message.
        status: HTTP status (0 for an in-band stream error).
        error_type: llama-server's ``error.type``, e.g. ``exceed_context_size_error``.
        body: the decoded error object, for logs.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_type: str | None = None,
        body: object = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.body = body
        self.retryable = backend_retryable(status, error_type, message)


class BackendStreamError(BackendHTTPError):
    """An ``error`` event arrived in the middle of a stream (new or legacy form)."""


class BackendProtocolError(BackendError):
    """llama-server's stream broke the SSE / OpenAI contract or was cut off."""


class StreamCancelled(BackendError):
    """The stream was cancelled (by :meth:`Stream.cancel`); the connection is closed."""

    retryable = False


class SessionStoreError(BridgeError):
    """The session database could not be used (the request gets an ``internal`` error)."""

    code = ErrorCode.internal
    retryable = True


class ReplyTimeout(TimeoutError):
    """No reply message arrived within the idle timeout (device side)."""


class SequenceError(Exception):
    """A reply message arrived out of order: a gap in ``seq`` (device side)."""


class AnswerChanged(SequenceError):
    """The bridge answered a resend anew, and the new text differs from the text already
    given out (the request did not fix ``temperature: 0`` and a ``seed``)."""


# --------------------------------------------------------------------------- llama-server's errors


@dataclass(frozen=True)
class LlamaErrorType:
    """How the bridge treats one of llama-server's error types.

    Attributes:
        status: the HTTP status llama-server sends it with (its ``format_error_response``).
        retryable: whether the same request, sent again later, can succeed.
        meaning: what it says, for the docs.
    """

    status: int
    retryable: bool
    meaning: str


LLAMA_ERROR_TYPES: dict[str, LlamaErrorType] = {
    "invalid_request_error": LlamaErrorType(
        400, False, "the request is wrong as sent (a field's type or range, a grammar)"),
    "exceed_context_size_error": LlamaErrorType(
        400, False, "the prompt does not fit the context: shorten it or ask for fewer "
                    "max_tokens"),
    "authentication_error": LlamaErrorType(
        401, False, "the bridge's [llama] api_key is wrong: an operator must fix it"),
    "permission_error": LlamaErrorType(403, False, "not allowed on this server"),
    "not_found_error": LlamaErrorType(404, False, "no such endpoint or model"),
    "not_supported_error": LlamaErrorType(
        501, False, "the server lacks a feature the request needs"),
    "unavailable_error": LlamaErrorType(
        503, True, "the model is still loading (retried by the bridge first)"),
    "server_error": LlamaErrorType(
        500, True, "a failure inside llama-server -- unless its message shows that the "
                   "request's content cannot be parsed (REQUEST_FAULTS)"),
}
"""llama-server's error types (``error.type`` of its error body), one row each.

Grounded in llama-server's ``format_error_response`` (tools/server), which maps each
``ERROR_TYPE_*`` to this type string and HTTP status. The README's error table is this
table; ``tests/service/test_errors.py`` plays every row against a scripted llama-server.
"""

REQUEST_FAULTS = re.compile(
    r"Failed to parse (?:messages|tools)|Missing tool|Unsupported tool", re.IGNORECASE)
"""Messages of errors that llama-server sends as HTTP 500 ``server_error`` although the
request's content is at fault: its chat-message and tool parsers throw plain runtime
errors, which its HTTP layer answers as 500 (``Failed to parse messages: Missing tool call
type: …``, ``… Unsupported tool call type …``, ``Failed to parse tools: Missing tool type
…``). The same request fails the same way every time."""


def backend_retryable(status: int, error_type: str | None, message: str) -> bool:
    """Whether a device may retry a request that llama-server answered with an error.

    Args:
        status: the HTTP status (0: an ``error`` event in the middle of a stream).
        error_type: llama-server's ``error.type``, if it sent one.
        message: its message.
    Returns:
        False when the same request cannot succeed: a request-content fault
        (:data:`REQUEST_FAULTS`), a known type whose row says so
        (:data:`LLAMA_ERROR_TYPES`), or, without a known type (a proxy, an older
        server), a 4xx status other than 408/429 or 501. True otherwise.
    """
    if REQUEST_FAULTS.search(message):
        return False
    known = LLAMA_ERROR_TYPES.get(error_type or "")
    if known is not None:
        return known.retryable
    if status == 0:
        return True  # an untyped error mid-stream: the server failed while answering
    return status in (408, 429) or (status >= 500 and status != 501)

