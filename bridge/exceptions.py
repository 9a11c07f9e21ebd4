"""Exception hierarchy: one class per way a request can fail.

Every exception carries the wire ``code`` (see :class:`bridge.wire.ErrorCode`) it
maps to and whether the device may retry, so the bridge turns any failure into a
typed ``error`` reply without a lookup table scattered across modules::

    BridgeError
    ├── RequestRejected          bad input from a device (bad_request, too_large, ...)
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
"""

from __future__ import annotations

import re

from bridge.wire import ErrorCode

# "llama-server at http://10.0.0.5:8080/v1/chat/completions" or a bare URL in a message.
_HOST_PORT = re.compile(r"host='[^']*', port=\d+")
_BACKEND_URL = re.compile(r"(?:llama-server at )?\bhttps?://[^\s,;()'\"]*[^\s,;()'\".:]")


class BridgeError(Exception):
    """Base class of every error raised by this package."""

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
        # 4xx means the request itself is wrong: retrying the same request won't help.
        self.retryable = status == 0 or status >= 500 or status == 429


class BackendStreamError(BackendHTTPError):
    """An ``error`` event arrived in the middle of a stream (new or legacy form)."""


class BackendProtocolError(BackendError):
    """llama-server's stream broke the SSE / OpenAI contract or was cut off."""


class StreamCancelled(BackendError):
    """The stream was cancelled (by :meth:`Stream.cancel`); the connection is closed."""

    retryable = False
