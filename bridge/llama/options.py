"""Which llama-server a client talks to, and how: from a URL or a ``DeploymentConfig``.

One rule for :class:`~bridge.llama.client.LlamaCppClient` and
:class:`~bridge.llama.async_client.AsyncLlamaCppClient`: a URL, or a configuration's
first llama-server URL (``server_url``) with its ``[llama]`` timeouts, retries and API
key; arguments given to the client replace the configuration's.
"""

from __future__ import annotations

from typing import TypedDict

from bridge.config.settings import DeploymentConfig, LlamaSettings, llama_server_url
from bridge.llama.types import RetryPolicy, Timeouts


class ClientOptions(TypedDict):
    """The keyword arguments of a llama client that ``[llama]`` settings give."""

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


def client_target(base_url: str | DeploymentConfig, timeouts: Timeouts | None,
                  retry: RetryPolicy | None, api_key: str | None,
                  client: str) -> tuple[str, ClientOptions]:
    """A client's server URL and options from its constructor's arguments.

    Args:
        base_url: the server's URL, or a configuration naming it.
        timeouts: given to the client (``None``: the configuration's, else the defaults).
        retry: given to the client (``None``: the configuration's, else the defaults).
        api_key: given to the client (``None``: the configuration's, if any).
        client: the client's class name, for the error message.

    Returns:
        The URL (without a trailing ``/``) and the options.

    Raises:
        ValueError: the URL is not an http(s) URL, or the config names no llama-server.
        TypeError: ``base_url`` is neither a string nor a ``DeploymentConfig``.
    """
    if isinstance(base_url, DeploymentConfig):
        if base_url.server_url is None:
            raise ValueError("this DeploymentConfig names no llama-server: give it "
                             "server_url='http://host:port' (or llama.urls)")
        options = client_options(base_url.llama)
        return base_url.server_url, ClientOptions(
            timeouts=timeouts or options["timeouts"], retry=retry or options["retry"],
            api_key=options["api_key"] if api_key is None else api_key)
    if isinstance(base_url, str):
        return llama_server_url(base_url, "llama-server URL"), ClientOptions(
            timeouts=timeouts or Timeouts(), retry=retry or RetryPolicy(), api_key=api_key)
    raise TypeError(f"{client} takes a llama-server URL (str) or a "
                    f"DeploymentConfig, not {type(base_url).__name__}")
