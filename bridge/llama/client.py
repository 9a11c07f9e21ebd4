"""Client for llama.cpp's ``llama-server`` over HTTP (OpenAI-compatible endpoints).

The only way the bridge talks to llama.cpp. Streams answers as typed deltas with
precise timeouts (connect / first byte / idle between data events), retries only
what is safe to retry (failures before the first byte), maps every failure to
:mod:`bridge.protocol.errors`, and can cancel any call from another thread by closing
its connection, which makes llama-server free the slot. :class:`LlamaCppClient` is
the typed API; the requests under it are :class:`~bridge.llama.calls.ServerCalls`, a
streamed answer is a :class:`~bridge.llama.stream.Stream`, and the request body comes
from :mod:`bridge.llama.body`.

Example::

    client = LlamaCppClient("http://127.0.0.1:8080")
    with client.generate_stream([{"role": "user", "content": "Hi"}], max_tokens=32) as s:
        for delta in s:
            if isinstance(delta, TextDelta):
                print(delta.text, end="")
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from bridge.llama.body import Messages, message_dicts, request_body
from bridge.llama.calls import MAX_SMALL_BYTES, ServerCalls
from bridge.llama.events import Kind
from bridge.llama.failures import bad_answer_error
from bridge.llama.http import CallInfo, CancelToken, make_session, read_bounded
from bridge.llama.probes import health_of, models_of, props_of, slots_of, tokens_of
from bridge.llama.stream import Stream
from bridge.llama.types import (
    Delta,
    Generation,
    Health,
    Props,
    ReasoningDelta,
    RetryPolicy,
    StreamEnd,
    TextDelta,
    Timeouts,
    ToolCallDelta,
)
from bridge.protocol import safe_json
from bridge.protocol.messages import json_text

__all__ = [
    "CancelToken",
    "Delta",
    "Generation",
    "Health",
    "LlamaCppClient",
    "Props",
    "ReasoningDelta",
    "RetryPolicy",
    "Stream",
    "StreamEnd",
    "TextDelta",
    "Timeouts",
    "ToolCallDelta",
]


class LlamaCppClient(ServerCalls):
    """Talks to one llama-server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8080`` (a trailing ``/`` is ignored).
        timeouts: see :class:`Timeouts`; defaults suit a busy single box.
        retry: see :class:`RetryPolicy`; applies only before the first response byte.
        api_key: llama-server's ``--api-key``, sent as a bearer token.
        pool_size: HTTP connections kept open (set it to the concurrent stream count).

    Raises:
        ValueError: ``base_url`` is not an http(s) URL.
    """

    def __init__(self, base_url: str, *, timeouts: Timeouts | None = None,
                 retry: RetryPolicy | None = None, api_key: str | None = None,
                 pool_size: int = 16) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"llama-server URL must look like http://host:port, got {base_url!r}")
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        super().__init__(base_url.rstrip("/"), timeouts or Timeouts(), retry or RetryPolicy(),
                         make_session(pool_size, api_key))

    # ------------------------------------------------------------------ generation

    def generate_stream(self, messages: Messages, temperature: float | None = None,
                        top_p: float | None = None, max_tokens: int | None = None,
                        tools: list[dict[str, Any]] | None = None,
                        tool_choice: str | dict[str, Any] | None = None, *,
                        cancel_token: CancelToken | None = None, **sampling: Any) -> Stream:
        """Stream a chat answer (``POST /v1/chat/completions``, ``"stream": true``).

        The request is sent on the first ``next()`` (or :meth:`Stream.open`), so the
        returned stream can be cancelled even while llama-server keeps it queued.

        Args:
            messages: OpenAI chat messages, as dicts or pydantic models.
            temperature: sampling temperature.
            top_p: nucleus sampling.
            max_tokens: generation limit.
            tools: OpenAI tool definitions.
            tool_choice: ``"auto"``, ``"none"``, ``"required"`` or a function choice.
            cancel_token: cancel through this token instead of :meth:`Stream.cancel`.
            **sampling: further body fields, sent as is (``seed``, ``top_k``, ``min_p``,
                ``stop``, ``repeat_penalty``, ``chat_template_kwargs``, ``model``...);
                ``None`` values are left out.

        Returns:
            The stream of deltas, ending with one :class:`StreamEnd`.
        """
        body = request_body("messages", message_dicts(messages), True, temperature, top_p,
                            max_tokens, tools, tool_choice, sampling)
        return self._stream("/v1/chat/completions", body, "chat", cancel_token)

    def complete_stream(self, prompt: str, temperature: float | None = None,
                        top_p: float | None = None, max_tokens: int | None = None,
                        tools: list[dict[str, Any]] | None = None,
                        tool_choice: str | dict[str, Any] | None = None, *,
                        cancel_token: CancelToken | None = None, **sampling: Any) -> Stream:
        """Stream a plain completion (``POST /v1/completions``); arguments as
        :meth:`generate_stream` with ``prompt`` instead of ``messages``.

        Returns:
            The stream of deltas, ending with one :class:`StreamEnd`.
        """
        body = request_body("prompt", prompt, True, temperature, top_p, max_tokens, tools,
                            tool_choice, sampling)
        return self._stream("/v1/completions", body, "completion", cancel_token)

    def generate(self, messages: Messages, temperature: float | None = None,
                 top_p: float | None = None, max_tokens: int | None = None,
                 tools: list[dict[str, Any]] | None = None,
                 tool_choice: str | dict[str, Any] | None = None, *,
                 cancel_token: CancelToken | None = None, **sampling: Any) -> Generation:
        """One non-streamed chat call; arguments as :meth:`generate_stream`.

        The whole answer is the "first byte" here, so ``Timeouts.non_streamed``
        bounds queueing + prompt + generation. Cancel it through ``cancel_token``.

        Returns:
            The answer (content and/or tool calls, finish reason, usage, timings).
        """
        body = request_body("messages", message_dicts(messages), False, temperature, top_p,
                            max_tokens, tools, tool_choice, sampling)
        return self._call("/v1/chat/completions", body, "chat", cancel_token)

    def complete(self, prompt: str, temperature: float | None = None,
                 top_p: float | None = None, max_tokens: int | None = None,
                 tools: list[dict[str, Any]] | None = None,
                 tool_choice: str | dict[str, Any] | None = None, *,
                 cancel_token: CancelToken | None = None, **sampling: Any) -> Generation:
        """One non-streamed completion (``POST /v1/completions``); see :meth:`generate`.

        Returns:
            The answer.
        """
        body = request_body("prompt", prompt, False, temperature, top_p, max_tokens, tools,
                            tool_choice, sampling)
        return self._call("/v1/completions", body, "completion", cancel_token)

    # ------------------------------------------------------------------ server state

    def health(self) -> Health:
        """``GET /health`` once (no retries: it is a probe).

        Returns:
            ``ok=True`` on HTTP 200; ``ok=False`` on 503 (model loading) or other codes.

        Raises:
            BackendUnavailable: the server cannot be reached.
            FirstByteTimeout: it accepted the connection but did not answer in time.
        """
        info = CallInfo(self._url("/health"))
        # Two attempts: llama-server closes idle keep-alive connections after ~5 s, and a
        # probe sent on one it is closing fails at once; one failure must not mark a
        # healthy backend down for a whole health interval.
        resp = self._get(info, attempts=2)
        try:
            try:
                data = safe_json.loads(read_bounded(resp, MAX_SMALL_BYTES))
            except (ValueError, urllib3.exceptions.HTTPError, OSError):
                data = None
        finally:
            resp.close()
        return health_of(resp.status_code, data)

    def props(self) -> Props:
        """``GET /props``: slot count, model, context size, template capabilities.

        Returns:
            The parsed properties (``raw`` holds the whole object).
        """
        return props_of(self._get_json("/props"), self._url("/props"))

    def slots(self) -> list[dict[str, Any]]:
        """``GET /slots`` (needs ``--slots`` on newer servers; 501 otherwise).

        Returns:
            One dict per slot (``id``, ``is_processing``, ``n_ctx``...).
        """
        return slots_of(self._get_json("/slots"), self._url("/slots"))

    def models(self) -> list[str]:
        """``GET /v1/models``.

        Returns:
            The model ids the server offers.
        """
        return models_of(self._get_json("/v1/models"))

    def tokenize(self, text: str) -> list[int]:
        """``POST /tokenize``: the token ids of ``text`` (no BOS or other special tokens added).

        Args:
            text: the text to tokenize.
        Returns:
            The token ids, as llama-server's tokenizer produces them.
        Raises:
            BackendError: the server could not be reached or answered badly.
        """
        info = CallInfo(self._url("/tokenize"))
        resp = self._post(info, json_text({"content": text}).encode(), self.timeouts.request,
                          "request")
        try:
            data = safe_json.loads(read_bounded(resp, MAX_SMALL_BYTES))
        except (ValueError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise bad_answer_error(info, exc) from exc
        finally:
            info.token.detach()
            resp.close()
        return tokens_of(data, info.url)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is for this server's model (see :meth:`tokenize`)."""
        return len(self.tokenize(text))

    def close(self) -> None:
        """Close pooled connections. Streams still open keep their own connection."""
        self._session.close()

    def __enter__(self) -> LlamaCppClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _stream(self, path: str, body: dict[str, Any], kind: Kind,
                token: CancelToken | None) -> Stream:
        info = CallInfo(self._url(path), token=token or CancelToken())
        payload = json_text(body).encode()

        def opener(call: CallInfo) -> requests.Response:
            return self._post(call, payload, self.timeouts.first_byte, "first_byte")

        return Stream(opener, info, kind, self.timeouts.idle)
