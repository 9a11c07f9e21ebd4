"""The requests under :class:`~bridge.llama.client.LlamaCppClient`'s typed API.

:class:`ServerCalls` sends requests to one llama-server: a POST retried where that
is safe (failures before the first byte), a GET, a bounded JSON answer, and the
whole non-streamed generation call. Every failure ends as an exception of
:mod:`bridge.protocol.errors`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import requests
import urllib3.exceptions

from bridge.llama.events import Kind, parse_generation
from bridge.llama.failures import (
    bad_answer_error,
    body_broken_error,
    body_stalled_error,
    cancelled_error,
    http_error,
    map_request_error,
)
from bridge.llama.http import CallInfo, CancelToken, bound, read_bounded, with_retries
from bridge.llama.types import Generation, RetryPolicy, Timeouts
from bridge.protocol import safe_json
from bridge.protocol.errors import BackendProtocolError
from bridge.protocol.messages import json_text

MAX_ANSWER_BYTES = 32 * 1024 * 1024
"""Bound on a non-streamed answer's body."""
MAX_SMALL_BYTES = 8 * 1024 * 1024
"""Bound on /props, /slots, /v1/models bodies (/props carries the chat template)."""


class ServerCalls:
    """Requests to one llama-server; :class:`~bridge.llama.client.LlamaCppClient` is one.

    Args:
        base_url: e.g. ``http://127.0.0.1:8080``, without a trailing ``/``.
        timeouts: the timeouts of every call.
        retry: applies only before the first response byte.
        session: from :func:`bridge.llama.http.make_session`.

    Attributes:
        base_url: as given.
        timeouts: as given.
        retry: as given.
    """

    def __init__(self, base_url: str, timeouts: Timeouts, retry: RetryPolicy,
                 session: requests.Session) -> None:
        self.base_url = base_url
        self.timeouts = timeouts
        self.retry = retry
        self._session = session

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _call(self, path: str, body: dict[str, Any], kind: Kind,
              token: CancelToken | None) -> Generation:
        """A non-streamed generation: POST ``body`` and decode the whole answer."""
        info = CallInfo(self._url(path), token=token or CancelToken())
        limit = self.timeouts.non_streamed
        resp = self._post(info, json_text(body).encode(), limit, "non_streamed")
        try:
            data = read_bounded(resp, MAX_ANSWER_BYTES)
        except ValueError as exc:
            raise BackendProtocolError(f"answer from {info.url}: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if info.token.cancelled:
                raise cancelled_error(info) from exc
            if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
                raise body_stalled_error(info, limit) from exc
            raise body_broken_error(info, exc) from exc
        finally:
            info.token.detach()  # before the connection can go back to the pool
            resp.close()
        if info.token.cancelled:
            raise cancelled_error(info)
        return parse_generation(data, kind, info.url)

    def _post(self, info: CallInfo, payload: bytes, read_timeout: float,
              read_name: str) -> requests.Response:
        """POST with retries; returns a 2xx response whose body is not read yet."""
        t = self.timeouts

        def attempt() -> requests.Response:
            if info.token.cancelled:
                raise cancelled_error(info)
            info.attempts += 1
            try:
                with bound(info.token):
                    resp = self._session.post(
                        info.url, data=payload, stream=True,
                        headers={"Content-Type": "application/json"},
                        timeout=(t.connect, read_timeout))
            except requests.RequestException as exc:
                raise map_request_error(exc, info, t.connect, read_timeout, read_name,
                                        self.retry.attempts) from exc
            info.first_byte_at = time.monotonic()
            return _checked(resp, info)

        return with_retries(attempt, self.retry, info.token, info.url)

    def _get(self, info: CallInfo, attempts: int) -> requests.Response:
        t = self.timeouts

        def attempt() -> requests.Response:
            info.attempts += 1
            try:
                return self._session.get(info.url, stream=True,
                                         timeout=(t.connect, t.request))
            except requests.RequestException as exc:
                raise map_request_error(exc, info, t.connect, t.request, "request",
                                        attempts) from exc

        if attempts == 1:
            return attempt()
        policy = self.retry if attempts == self.retry.attempts else dataclasses.replace(
            self.retry, attempts=attempts)
        return with_retries(attempt, policy, info.token, info.url)

    def _get_json(self, path: str) -> Any:
        info = CallInfo(self._url(path))
        resp = _checked(self._get(info, self.retry.attempts), info)
        try:
            return safe_json.loads(read_bounded(resp, MAX_SMALL_BYTES))
        except (ValueError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise bad_answer_error(info, exc) from exc
        finally:
            resp.close()


def _checked(resp: requests.Response, info: CallInfo) -> requests.Response:
    """Raise :class:`BackendHTTPError` (closing the response) for a 4xx/5xx answer."""
    if resp.status_code < 400:
        return resp
    try:
        raise http_error(resp, info)
    finally:
        resp.close()
