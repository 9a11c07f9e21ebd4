"""Client for llama.cpp's ``llama-server`` over HTTP (OpenAI-compatible endpoints).

The only way the bridge talks to llama.cpp. Streams answers with precise timeouts
(connect / first byte / idle between data events), retries only what is safe to retry
(failures before the first byte), maps every failure to :mod:`bridge.protocol.errors`,
and can cancel any call from another thread by closing its connection, which makes
llama-server free the slot.

:class:`LlamaCppClient` has two APIs over one implementation:

- the typed API (:mod:`bridge.llama.typed_api`), which the bridge uses:
  ``stream_chat`` / ``stream_completion`` return a :class:`~bridge.llama.stream.Stream`
  of typed deltas ending in one :class:`StreamEnd`; ``chat`` / ``completion`` return a
  :class:`Generation`;
- the text API of the original deployment script (:mod:`bridge.llama.text_api`):
  ``generate_stream`` / ``complete_stream`` yield ``str`` chunks, ``generate`` /
  ``complete`` return the text (or the tool calls), and each fills an optional
  ``debug_info`` dict.

The requests under both are :class:`~bridge.llama.calls.ServerCalls`, and the request
body comes from :mod:`bridge.llama.body`.

Example::

    from llamacpp_mqtt_deploy import LlamaCppClient, DeploymentConfig

    client = LlamaCppClient(DeploymentConfig(server_url="http://localhost:8080"))
    for chunk in client.generate_stream([{"role": "user", "content": "Hi"}]):
        print(chunk, end="", flush=True)
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import urllib3.exceptions

from bridge.config.settings import DeploymentConfig
from bridge.llama.calls import MAX_SMALL_BYTES
from bridge.llama.failures import bad_answer_error
from bridge.llama.http import CallInfo, CancelToken, make_session, read_bounded
from bridge.llama.options import ClientOptions, client_options, client_target
from bridge.llama.probes import health_of, models_of, props_of, slots_of, tokens_of
from bridge.llama.stream import Stream
from bridge.llama.text_api import TextAPI
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
    "ClientOptions",
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
    "client_options",
]


class LlamaCppClient(TextAPI):
    """Talks to one llama-server.

    Args:
        base_url: the server's URL, e.g. ``http://127.0.0.1:8080`` (a trailing ``/`` is
            ignored), or a :class:`~bridge.config.settings.DeploymentConfig`: its first
            llama-server URL (``server_url``), with its ``[llama]`` timeouts, retries
            and API key.
        timeouts: see :class:`Timeouts`; defaults suit a busy single box. Given, it
            replaces the config's.
        retry: see :class:`RetryPolicy`; applies only before the first response byte.
            Given, it replaces the config's.
        api_key: llama-server's ``--api-key``, sent as a bearer token. Given, it
            replaces the config's.
        pool_size: HTTP connections kept open (set it to the concurrent stream count).

    Raises:
        ValueError: the URL is not an http(s) URL, or the config names no llama-server.
        TypeError: ``base_url`` is neither a string nor a ``DeploymentConfig``.
    """

    def __init__(self, base_url: str | DeploymentConfig, *, timeouts: Timeouts | None = None,
                 retry: RetryPolicy | None = None, api_key: str | None = None,
                 pool_size: int = 16) -> None:
        url, options = client_target(base_url, timeouts, retry, api_key, "LlamaCppClient")
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        super().__init__(url, options["timeouts"], options["retry"],
                         make_session(pool_size, options["api_key"]))

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
