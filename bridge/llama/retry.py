"""What is retried before the first response byte, and how long to wait between tries.

One rule for every client (the blocking one in :mod:`bridge.llama.http`, the asyncio
one in :mod:`bridge.llama.async_http`): only failures where llama-server has certainly
not started an answer are retried, with exponential backoff and jitter
(:class:`~bridge.llama.types.RetryPolicy`).
"""

from __future__ import annotations

from typing import Any

from tenacity import retry_if_exception, stop_after_attempt, wait_exponential_jitter

from bridge.llama.types import RetryPolicy
from bridge.protocol.errors import (
    BackendHTTPError,
    BackendStreamError,
    BackendUnavailable,
    StreamCancelled,
)


def retryable(exc: BaseException) -> bool:
    """Whether a failed attempt may be tried again.

    Only failures where llama-server has certainly not started an answer we read, and
    of the HTTP errors only "still loading" (503, ``unavailable_error``), which passes in
    seconds; what a device may retry later is ``BackendHTTPError.retryable``.
    """
    if isinstance(exc, StreamCancelled | BackendStreamError):
        return False
    if isinstance(exc, BackendHTTPError):
        return exc.status == 503
    return isinstance(exc, BackendUnavailable)


def retrying_args(policy: RetryPolicy) -> dict[str, Any]:
    """The arguments of tenacity's ``Retrying`` / ``AsyncRetrying`` for ``policy``
    (all but ``sleep``, which the caller makes cancellable its own way)."""
    return {
        "stop": stop_after_attempt(policy.attempts),
        "wait": wait_exponential_jitter(multiplier=policy.initial_backoff,
                                        max=policy.max_backoff, jitter=policy.jitter),
        "retry": retry_if_exception(retryable),
        "reraise": True,
    }
