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
from typing import Any, TypedDict

import urllib3.exceptions

from bridge.config.settings import DeploymentConfig, LlamaSettings, llama_server_url
from bridge.llama.calls import MAX_SMALL_BYTES
from bridge.llama.http import CallInfo, CancelToken, make_session, read_bounded
from bridge.llama.stream import Stream
from bridge.llama.text_api import TextAPI
from bridge.llama.types import (
    PROPS_MODEL_KEYS,
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
from bridge.protocol.errors import BackendProtocolError
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


class ClientOptions(TypedDict):
    """The keyword arguments of :class:`LlamaCppClient` that ``[llama]`` settings give."""

    timeouts: Timeouts
    retry: RetryPolicy
    api_key: str | None


def client_options(settings: LlamaSettings) -> ClientOptions:
    """How a client of these ``[llama]`` settings talks to its server.

    Args:
        settings: the ``[llama]`` configuration.

    Returns:
        Its timeouts (connect, first byte, idle; the others at their defaults), its
        retries before the first byte, and its API key.
    """
    return ClientOptions(
        timeouts=Timeouts(connect=settings.connect_timeout_s,
                          first_byte=settings.first_byte_timeout_s,
                          idle=settings.idle_timeout_s),
        retry=RetryPolicy(attempts=settings.retries),
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
    )


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
        if isinstance(base_url, DeploymentConfig):
            if base_url.server_url is None:
                raise ValueError("this DeploymentConfig names no llama-server: give it "
                                 "server_url='http://host:port' (or llama.urls)")
            options = client_options(base_url.llama)
            url = base_url.server_url
            timeouts = timeouts or options["timeouts"]
            retry = retry or options["retry"]
            api_key = options["api_key"] if api_key is None else api_key
        elif isinstance(base_url, str):
            url = llama_server_url(base_url, "llama-server URL")
        else:
            raise TypeError("LlamaCppClient takes a llama-server URL (str) or a "
                            f"DeploymentConfig, not {type(base_url).__name__}")
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        super().__init__(url, timeouts or Timeouts(), retry or RetryPolicy(),
                         make_session(pool_size, api_key))

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
        status = str(resp.status_code)
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(data.get("status"), str):
                status = data["status"]
            elif isinstance(err, dict) and isinstance(err.get("message"), str):
                status = err["message"]
        return Health(ok=resp.status_code == 200, status=status, http_status=resp.status_code)

    def props(self) -> Props:
        """``GET /props``: slot count, model, context size, template capabilities.

        Returns:
            The parsed properties (``raw`` holds the whole object).
        """
        raw = self._get_json("/props")
        if not isinstance(raw, dict):
            raise BackendProtocolError(f"{self._url('/props')} did not return a JSON object")
        settings = raw.get("default_generation_settings")
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        caps = raw.get("chat_template_caps")
        return Props(
            # Servers too old to report it run one slot unless --parallel was given.
            total_slots=int(raw.get("total_slots") or 1),
            model=next((raw[k] for k in PROPS_MODEL_KEYS if raw.get(k)), None),
            n_ctx=n_ctx if isinstance(n_ctx, int) else None,
            chat_template_caps=caps if isinstance(caps, dict) else {},
            raw=raw,
        )

    def slots(self) -> list[dict[str, Any]]:
        """``GET /slots`` (needs ``--slots`` on newer servers; 501 otherwise).

        Returns:
            One dict per slot (``id``, ``is_processing``, ``n_ctx``...).
        """
        data = self._get_json("/slots")
        if not isinstance(data, list):
            raise BackendProtocolError(f"{self._url('/slots')} did not return a JSON list")
        return [s for s in data if isinstance(s, dict)]

    def models(self) -> list[str]:
        """``GET /v1/models``.

        Returns:
            The model ids the server offers.
        """
        data = self._get_json("/v1/models")
        entries = data.get("data") if isinstance(data, dict) else None
        return [str(m["id"]) for m in entries or () if isinstance(m, dict) and "id" in m]

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
            raise BackendProtocolError(f"bad answer from {info.url}: {exc}") from exc
        finally:
            info.token.detach()
            resp.close()
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list):
            raise BackendProtocolError(f"{info.url} did not return {{\"tokens\": [...]}}")
        try:
            # With "with_pieces" the server sends {"id", "piece"} objects; plain ids otherwise.
            return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendProtocolError(f"{info.url} returned malformed tokens: {exc}") from exc

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
