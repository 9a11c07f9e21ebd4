"""``llamacpp-mqtt-bridge run``: the bridge in the foreground until a signal stops it.

SIGINT and SIGTERM stop it; SIGHUP reloads the configuration's ``profiles``
(:func:`reload_profiles`).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING

from pydantic import ValidationError

from bridge.cli.exits import EXIT_NO_ANSWER, EXIT_OK
from bridge.config.settings import DeploymentConfig
from bridge.mqtt.paho_client import broker_host
from bridge.web.page import serve_page_config, start_page_server

if TYPE_CHECKING:
    from bridge.service.bridge import Bridge


def run(cfg: DeploymentConfig, stop: threading.Event | None = None,
        reload: Callable[[], DeploymentConfig] | None = None) -> int:
    """Start the bridge (and embedded broker / llama.cpp if none is configured) until signalled.

    Args:
        cfg: the configuration.
        stop: set it to stop the bridge (SIGINT and SIGTERM set it too).
        reload: loads the configuration again (file, environment, flags); given, SIGHUP
            puts the new ``profiles`` in force for new requests.
    """
    logging.basicConfig(level=cfg.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("bridge.run")
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        return _run_until(cfg, stop, log, reload)
    except RuntimeError as exc:  # embedded broker / llama.cpp could not start: says why
        log.error("%s", exc)
        return EXIT_NO_ANSWER


def _run_until(cfg: DeploymentConfig, stop: threading.Event, log: logging.Logger,
               reload: Callable[[], DeploymentConfig] | None = None) -> int:
    from bridge.service.bridge import Bridge

    with ExitStack() as stack:
        bridge_cfg = cfg  # cfg stays as loaded: SIGHUP compares the reloaded file with it
        web = start_page_server(cfg)  # first: a taken port fails before anything else starts
        if web is not None:
            stack.callback(web.stop)
        broker = None
        if cfg.mqtt.host is None:
            from bridge.mqtt.brokers.local import describe, start_local_broker, use_local_broker

            ws_port = cfg.web.ws_port if cfg.web.ws_port is not None or web is None else 0
            broker = start_local_broker(cfg.mqtt.port, ws_port=ws_port)
            stack.callback(broker.stop)  # registered before the bridge's, so it stops later
            log.info("%s", describe(broker))
            bridge_cfg = use_local_broker(cfg, broker)
        if web is not None:
            serve_page_config(web, cfg, broker, log)
        urls = list(cfg.llama.urls)
        if not urls:
            from bridge.llama.embedded import EmbeddedLlama

            log.info("no --llama-url: starting an embedded llama.cpp server (xllamacpp)")
            llama = EmbeddedLlama(parallel=cfg.llama.embedded_parallel, ctx=cfg.llama.embedded_ctx,
                                  model=cfg.llama.embedded_model)
            urls = [llama.start()]
            stack.callback(llama.stop)
        bridge = Bridge(bridge_cfg, urls)
        try:
            bridge.start()
        except ConnectionError as exc:
            log.error("%s", exc)
            return EXIT_NO_ANSWER
        stack.callback(bridge.stop)
        if reload is not None and hasattr(signal, "SIGHUP"):
            previous = signal.signal(
                signal.SIGHUP, lambda *_: reload_profiles(bridge, cfg, reload, log))
            stack.callback(signal.signal, signal.SIGHUP, previous)
        host = broker_host(cfg.mqtt)
        print(f"bridge {cfg.bridge_id} ready: MQTT {host}:{cfg.mqtt.port}, topics "
              f"{cfg.prefix}/request/+, llama.cpp at {', '.join(urls)}. "
              f'Try: llamacpp-mqtt-bridge ask "hi"'
              + (f". Web page: {web.url}" if web is not None else ""), flush=True)
        stop.wait()
        log.info("shutting down")
    return EXIT_OK


def reload_profiles(bridge: Bridge, running: DeploymentConfig,
                    load: Callable[[], DeploymentConfig], log: logging.Logger) -> bool:
    """SIGHUP: read the configuration again and swap in its ``profiles``.

    Requests already accepted keep the profile they were accepted with; streams are
    not interrupted. Other settings need a restart (a warning names the changed ones).
    An invalid file keeps the profiles in force.

    Returns:
        True if the new profiles are in force.
    """
    try:
        fresh = load()
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        log.error("configuration reload failed, the profiles in force are kept: %s", exc)
        return False
    bridge.profiles.replace(fresh.profiles)
    changed = sorted(name for name in type(fresh).model_fields
                     if name != "profiles" and getattr(fresh, name) != getattr(running, name))
    log.info("profiles reloaded: %s", ", ".join(sorted(fresh.profiles)) or "none")
    if changed:
        log.warning("settings changed in the configuration but not applied until a restart: "
                    "%s", ", ".join(changed))
    return True
