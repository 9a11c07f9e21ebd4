"""What a failed call to llama-server raises: the exceptions of
:mod:`bridge.protocol.errors`, with messages that say what happened and what to check.
"""

from __future__ import annotations

from typing import Any

import requests

from bridge.llama.http import CallInfo, read_bounded
from bridge.protocol import safe_json
from bridge.protocol.errors import (
    BackendError,
    BackendHTTPError,
    BackendProtocolError,
    BackendStreamError,
    BackendUnavailable,
    ConnectTimeout,
    FirstByteTimeout,
    IdleTimeout,
    StreamCancelled,
    backend_retryable,
)

MAX_ERROR_BODY = 64 * 1024
"""Bytes of an HTTP error body kept for the message (llama's are < 1 KiB)."""


def cancelled_error(info: CallInfo) -> StreamCancelled:
    """The exception for a call cancelled through its token."""
    return StreamCancelled(
        f"request to {info.url} was cancelled; its connection to llama-server is closed "
        "so the server frees the slot"
    )


def map_request_error(exc: requests.RequestException, info: CallInfo, connect_s: float,
                      read_s: float, read_name: str, attempts: int) -> BackendError:
    """Translate a ``requests`` failure before any response byte into our hierarchy.

    Args:
        exc: what ``requests`` raised.
        info: the call (URL, token, attempt count).
        connect_s: the connect timeout in force.
        read_s: the timeout for the response headers in force.
        read_name: the name of that timeout's setting, for the message.
        attempts: attempts allowed by the retry policy.

    Returns:
        The exception to raise.
    """
    if info.token.cancelled:
        return cancelled_error(info)
    if isinstance(exc, requests.ConnectTimeout):
        return connect_timeout_error(info, attempts, connect_s)
    if isinstance(exc, requests.ReadTimeout):
        return first_byte_timeout_error(info, attempts, read_s, read_name)
    return unreachable_error(info, attempts, exc)


def _tries(info: CallInfo, attempts: int) -> str:
    return f"(attempt {info.attempts}/{attempts})"


def connect_timeout_error(info: CallInfo, attempts: int, connect_s: float) -> ConnectTimeout:
    """The exception for a connection not accepted within ``connect_s`` (attempt
    ``info.attempts`` of ``attempts``)."""
    tries = _tries(info, attempts)
    return ConnectTimeout(
        f"could not open a connection to llama-server at {info.url} {tries} within "
        f"connect={connect_s:g} s; check that the host is up and reachable (firewall, address)",
        public=f"llama-server did not accept a connection {tries}; try again later",
    )


def first_byte_timeout_error(info: CallInfo, attempts: int, read_s: float,
                             read_name: str) -> FirstByteTimeout:
    """The exception for a request answered by no response within ``read_s`` (the
    setting ``read_name``)."""
    return FirstByteTimeout(
        f"llama-server at {info.url} {_tries(info, attempts)} accepted the request but sent "
        f"no response within {read_name}={read_s:g} s; every slot may be busy (llama-server "
        "queues silently) or the prompt is long: check /slots and the server load, or raise "
        "the timeout",
        public=f"llama-server sent no response within {read_name}={read_s:g} s (all its "
               "slots may be busy, or the prompt is long); try again later or send a "
               "shorter prompt",
    )


def unreachable_error(info: CallInfo, attempts: int, exc: BaseException) -> BackendUnavailable:
    """The exception for a connection that failed (refused, reset) before any response."""
    tries = _tries(info, attempts)
    return BackendUnavailable(
        f"could not reach llama-server at {info.url} {tries}: {exc}; check that llama-server "
        "is running and the URL is right",
        public=f"llama-server could not be reached {tries}; try again later",
    )


def http_error(resp: requests.Response, info: CallInfo) -> BackendHTTPError:
    """Build the exception for an HTTP 4xx/5xx answer (reads at most 64 KiB of body)."""
    try:
        raw = read_bounded(resp, MAX_ERROR_BODY, truncate=True)
    except Exception:  # a body cut short must not hide the status we already have
        raw = b""
    return http_error_of(resp.status_code, resp.reason or "", raw, info)


def http_error_of(status: int, reason: str, raw: bytes, info: CallInfo) -> BackendHTTPError:
    """The exception for an HTTP 4xx/5xx answer with status ``status`` and body ``raw``.

    llama-server's error body is ``{"error": {"code", "message", "type"}}``; anything
    else (a proxy's HTML page) is quoted as text.
    """
    error_type: str | None = None
    message = raw.decode("utf-8", "replace").strip()[:500] or reason
    body: object = message
    try:
        decoded = safe_json.loads(raw)  # an error body is untrusted too
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        body = decoded
        err = decoded.get("error")
        if isinstance(err, dict):
            error_type, message = _type_and_message(err, message)
        elif isinstance(err, str):
            message = err
    hint = " (model still loading?)" if status == 503 else ""
    return BackendHTTPError(
        f"llama-server at {info.url} answered HTTP {status}"
        f"{f' {error_type}' if error_type else ''}{hint}: {message}"
        f"{_final(status, error_type, message)}",
        status=status, error_type=error_type, body=body,
    )


def body_stalled_error(info: CallInfo, limit: float) -> IdleTimeout:
    """The exception for a non-streamed answer whose body stopped for ``limit`` seconds."""
    return IdleTimeout(f"answer from llama-server at {info.url} stalled for "
                       f"non_streamed={limit:g} s mid-body")


def body_broken_error(info: CallInfo, exc: BaseException) -> BackendProtocolError:
    """The exception for a non-streamed answer whose connection broke mid-body."""
    return BackendProtocolError(f"connection to llama-server at {info.url} broke "
                                f"while reading the answer: {exc}")


def bad_answer_error(info: CallInfo, exc: BaseException) -> BackendProtocolError:
    """The exception for a small call's answer that could not be read or decoded."""
    return BackendProtocolError(f"bad answer from {info.url}: {exc}")


def _type_and_message(err: dict[str, Any], fallback: str) -> tuple[str | None, str]:
    """The ``type`` and ``message`` of llama-server's error object (``fallback`` for a
    missing message)."""
    error_type = err.get("type")
    return (error_type if isinstance(error_type, str) else None,
            str(err.get("message") or fallback))


def _final(status: int, error_type: str | None, message: str) -> str:
    """What to tell a device whose request llama-server refused for good (see
    :func:`bridge.protocol.errors.backend_retryable`)."""
    if backend_retryable(status, error_type, message):
        return ""
    return " -- the request cannot succeed as sent: change it before sending it again"


def stream_error(data: Any, url: str) -> BackendStreamError:
    """Build the exception for an in-band ``{"error": ...}`` event (new or legacy form)."""
    err = data.get("error", data) if isinstance(data, dict) else data
    error_type = None
    message = str(err)
    if isinstance(err, dict):
        error_type, message = _type_and_message(err, message)
    return BackendStreamError(
        f"llama-server at {url} reported an error mid-stream"
        f"{f' ({error_type})' if error_type else ''}: {message}{_final(0, error_type, message)}",
        status=0, error_type=error_type, body=data,
    )
