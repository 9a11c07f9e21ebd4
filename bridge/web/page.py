"""What the web page needs to connect: the ``/config.json`` that ``run --web-port`` serves.

The page is static; this document is the one thing that depends on how the bridge
runs. It never contains the bridge's own broker account: with your own broker the
person at the browser logs in with theirs (the page's connect form).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.config.settings import DeploymentConfig
    from bridge.mqtt.brokers.base import LocalBroker
    from bridge.web.server import WebServer

__all__ = ["page_config", "serve_page_config", "start_page_server", "warn_if_unreachable"]

# MQTT.js names the versions by their protocol level: 5, and 4 for 3.1.1.
_PROTOCOL_LEVEL = {"5": 5, "3.1.1": 4}


def start_page_server(cfg: DeploymentConfig) -> WebServer | None:
    """Start serving the page if ``[web] port`` is set (``config.json`` comes later).

    Returns:
        The running server, or None when no page is configured.

    Raises:
        WebServerError: the port is taken or the address is wrong (names the flag).
    """
    if cfg.web.port is None:
        return None
    from bridge.web.server import WebServer

    web = WebServer(cfg.web.host, cfg.web.port)
    web.start()
    return web


def serve_page_config(web: WebServer, cfg: DeploymentConfig, broker: LocalBroker | None,
                      log: logging.Logger) -> None:
    """Give the page its ``config.json`` and log where the page is."""
    config = page_config(cfg, broker)
    web.page_config = config
    warn_if_unreachable(cfg, config, log)
    log.info("web page: %s (MQTT over WebSockets: %s)", web.url,
             config["mqtt_url"] or "none given, the page asks")


def page_config(cfg: DeploymentConfig, broker: LocalBroker | None) -> dict[str, Any]:
    """The page's ``config.json``.

    Args:
        cfg: the bridge's configuration as loaded.
        broker: the local broker ``run`` started, or None for a broker of your own.

    Returns:
        ``mqtt_url``: the WebSocket URL to connect to: ``[web] mqtt_url`` if set, else
        the local broker's WebSocket listener, else None (the page asks);
        ``prefix``: the topic prefix; ``heartbeat_s``: the bridge's heartbeat, which
        the client's silence detection counts in; ``protocol_version``: 5 or 4 (3.1.1)
        when known, else None; and, for the local Mosquitto's WebSocket listener,
        ``username`` and ``password`` (served to loopback browsers only).
    """
    out: dict[str, Any] = {"mqtt_url": cfg.web.mqtt_url, "prefix": cfg.prefix,
                           "heartbeat_s": cfg.heartbeat_s, "protocol_version": None}
    if broker is None:
        out["protocol_version"] = _PROTOCOL_LEVEL.get(cfg.mqtt.protocol)
        return out
    out["protocol_version"] = _PROTOCOL_LEVEL[broker.protocol]
    if cfg.web.mqtt_url is None and broker.ws_port is not None:
        out["mqtt_url"] = f"ws://{_url_host(broker.host)}:{broker.ws_port}"
        if broker.ws_account is not None:
            out["username"], out["password"] = broker.ws_account
    return out


def warn_if_unreachable(cfg: DeploymentConfig, config: dict[str, Any],
                        log: logging.Logger) -> None:
    """Log why a browser could not connect with ``config``, if that can be told now."""
    if config["mqtt_url"] is None:
        log.warning("the web page does not know your broker's WebSocket URL: give it with "
                    "--web-mqtt-url (e.g. ws://broker.lan:9001), or type it into the page")
    elif cfg.mqtt.host is None and cfg.web.mqtt_url is None and not _loopback(cfg.web.host):
        log.warning("the web page is served on %s, but the local broker's WebSocket listener "
                    "is on loopback: only a browser on this machine can connect. Browsers "
                    "elsewhere need a broker they can reach: --mqtt-host and --web-mqtt-url",
                    cfg.web.host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
