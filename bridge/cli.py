"""Command line: ``llamacpp-mqtt-bridge run | ask | status`` (README, *Configuration*).

Every ``run`` flag is also a TOML key and an environment variable (see
``bridge.config.settings``); flags win over the environment, which wins over the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from bridge.config.settings import DeploymentConfig, MqttSettings, WebSettings, load_config
from bridge.mqtt.paho_client import broker_host
from bridge.version import __version__
from bridge.web.page import serve_page_config, start_page_server

if TYPE_CHECKING:
    from bridge.service.bridge import Bridge

EXIT_OK, EXIT_ERROR_REPLY, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3


def _default(model: type[BaseModel], name: str) -> Any:
    """The default of a configuration field, so that --help cannot drift from it."""
    return model.model_fields[name].default


def _config_flag(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "configuration",
        "A flag left out takes its value from BRIDGE_* environment variables, then from "
        "the --config file, then the default shown.")
    g.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML configuration file (config/bridge.example.toml lists every "
                        "setting; default: none)")


def _mqtt_flags(p: argparse.ArgumentParser, command: str) -> None:
    _config_flag(p)
    g = p.add_argument_group("MQTT broker")
    if command == "run":
        host_default = "default: none, start an embedded broker on 127.0.0.1"
        protocol_default = "default auto: MQTT 5 if the broker speaks it, else 3.1.1"
    else:
        host_default = "default 127.0.0.1"
        protocol_default = "default auto, which connects with 3.1.1"
    g.add_argument("--mqtt-host", metavar="HOST", help=f"broker host name or address "
                                                       f"({host_default})")
    g.add_argument("--mqtt-port", type=int, metavar="PORT",
                   help=f"broker TCP port (default {_default(MqttSettings, 'port')})")
    g.add_argument("--mqtt-username", metavar="NAME",
                   help="broker account (default: none, connect anonymously)")
    g.add_argument("--mqtt-password", metavar="PASSWORD",
                   help="password of that account (default: none); BRIDGE_MQTT__PASSWORD "
                        "keeps it out of the process list")
    g.add_argument("--mqtt-tls", action="store_true", default=None,
                   help="connect with TLS (default: plain TCP)")
    g.add_argument("--mqtt-ca", type=Path, metavar="FILE",
                   help="CA certificate (PEM) that signed the broker's certificate "
                        "(default: the system's CAs)")
    g.add_argument("--mqtt-cert", type=Path, metavar="FILE",
                   help="client certificate (PEM) for TLS client authentication (default: none)")
    g.add_argument("--mqtt-key", type=Path, metavar="FILE",
                   help="private key (PEM) of --mqtt-cert (default: none)")
    g.add_argument("--mqtt-protocol", choices=["auto", "5", "3.1.1"],
                   help=f"MQTT version ({protocol_default})")
    g.add_argument("--prefix", metavar="PREFIX",
                   help=f"first topic level(s): PREFIX/request/CLIENT, ... "
                        f"(default {_default(DeploymentConfig, 'prefix')!r})")


def build_parser() -> argparse.ArgumentParser:
    """The ``run``, ``ask`` and ``status`` command line, every flag with its help."""
    parser = argparse.ArgumentParser(
        prog="llamacpp-mqtt-bridge",
        description="Stream answers from llama.cpp's llama-server to MQTT devices.")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = DeploymentConfig.model_fields
    run = sub.add_parser("run", help="start the bridge",
                         description="Start the bridge; with no --mqtt-host and no --llama-url "
                                     "also an embedded broker and an embedded llama.cpp.")
    _mqtt_flags(run, "run")
    g = run.add_argument_group("bridge")
    g.add_argument("--llama-url", action="append", dest="llama_urls", metavar="URL",
                   help="llama-server base URL, e.g. http://127.0.0.1:8080 (repeat it for "
                        "several servers; default: none, start an embedded llama.cpp)")
    g.add_argument("--bridge-id", metavar="NAME",
                   help="name of this bridge: its status topic PREFIX/status/NAME and MQTT "
                        "client id (default: the host name)")
    g.add_argument("--chunk-bytes", type=int, metavar="BYTES",
                   help="largest chunk message in bytes, JSON included, for requests that "
                        f"give no chunk_bytes (default {cfg['chunk_bytes'].default})")
    g.add_argument("--flush-ms", type=float, metavar="MS",
                   help="coalesce tokens into one chunk for at most this many milliseconds "
                        f"(default {cfg['flush_ms'].default:g})")
    g.add_argument("--max-concurrent", type=int, metavar="N",
                   help="requests run at once (default: the llama-servers' slot count)")
    g.add_argument("--shared-group", metavar="NAME",
                   help="subscribe through $share/NAME/... so that several bridges split the "
                        "requests; needs MQTT 5 (default: none)")
    g.add_argument("--sessions-db", type=Path, metavar="FILE",
                   help="SQLite file of session conversations, created on first use "
                        f"(default {cfg['sessions_db'].default})")
    g.add_argument("--sessions-url", metavar="URL",
                   help="Redis/Valkey shared by several bridges for sessions, duplicates "
                        "and leases: redis://HOST:PORT/DB or rediss:// (default: none, "
                        "the --sessions-db file)")
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help=f"log verbosity (default {cfg['log_level'].default})")
    g.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on this TCP port (default: none, no "
                        "metrics endpoint)")
    g.add_argument("--metrics-host", metavar="ADDRESS",
                   help="address of the metrics endpoint; it has no authentication "
                        f"(default {cfg['metrics_host'].default})")
    g = run.add_argument_group("web playground (README, Web playground)")
    g.add_argument("--web-port", type=int, metavar="PORT",
                   help="serve the web page on this TCP port; with the local broker it also "
                        "gets a WebSocket listener for the page (default: none, no page)")
    g.add_argument("--web-host", metavar="ADDRESS",
                   help="address of the page; it has no login of its own "
                        f"(default {_default(WebSettings, 'host')})")
    g.add_argument("--web-mqtt-url", metavar="URL",
                   help="WebSocket URL of your own broker (--mqtt-host) for the page, e.g. "
                        "ws://broker.lan:9001 (default: the local broker's, or the page asks)")
    g.add_argument("--ws-port", type=int, metavar="PORT",
                   help="port of the local broker's WebSocket listener, on loopback "
                        "(default: any free port when the page is served)")

    ask = sub.add_parser("ask", help="send a prompt and print the streamed answer",
                         description="Send one prompt to the bridge as a device would and "
                                     "print the answer as it streams, then a summary line.")
    ask.add_argument("prompt", help="the question (plain text, one user message)")
    _mqtt_flags(ask, "ask")
    g = ask.add_argument_group("request")
    g.add_argument("--client", metavar="NAME",
                   help="device name, the CLIENT topic level (default: ask-<number>, new "
                        "each time)")
    g.add_argument("--max-tokens", type=int, metavar="N",
                   help="longest answer in tokens (default: the bridge's max_tokens_default, "
                        f"{cfg['max_tokens_default'].default} unless configured, or the "
                        "profile's max_tokens)")
    g.add_argument("--temperature", type=float, metavar="T",
                   help="sampling temperature, 0 for the most likely tokens (default: the "
                        "profile's, else llama-server's own, 0.8)")
    g.add_argument("--seed", type=int, metavar="N",
                   help="sampling seed, for repeatable answers (default: a random seed)")
    g.add_argument("--chunk-bytes", type=int, metavar="BYTES",
                   help="largest chunk message in bytes (default: the bridge's chunk_bytes, "
                        f"{cfg['chunk_bytes'].default} unless configured)")
    g.add_argument("--max-packet", type=int, metavar="BYTES",
                   help="largest MQTT packet the device can receive, header and topic "
                        "included: every reply message is made to fit it, as for a "
                        "microcontroller (default: the bridge's [device] max_packet, none "
                        "unless configured)")
    g.add_argument("--session", metavar="NAME",
                   help="keep the conversation on the bridge under this name; sessions "
                        "belong to a device, so give --client too (default: none)")
    g.add_argument("--profile", metavar="NAME",
                   help="a named preset of the bridge's config (default: none)")
    g.add_argument("--json", action="store_true",
                   help="print every reply message as JSON (default: the text only)")
    g.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="give up after this many seconds without a reply message "
                        "(default %(default)g)")

    status = sub.add_parser("status", help="show the retained status of every bridge",
                            description="Print the retained status message of every bridge "
                                        "under the prefix.")
    _mqtt_flags(status, "status")
    status.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="wait at most this many seconds for status messages "
                             "(default %(default)g)")
    return parser


def _config(args: argparse.Namespace) -> DeploymentConfig:
    mqtt = {"host": args.mqtt_host, "port": args.mqtt_port, "username": args.mqtt_username,
            "password": args.mqtt_password, "tls": args.mqtt_tls, "ca_file": args.mqtt_ca,
            "cert_file": args.mqtt_cert, "key_file": args.mqtt_key,
            "protocol": args.mqtt_protocol}
    flat: dict[str, Any] = {"prefix": args.prefix}
    if args.command == "run":
        flat.update(bridge_id=args.bridge_id, chunk_bytes=args.chunk_bytes,
                    flush_ms=args.flush_ms, max_concurrent=args.max_concurrent,
                    shared_group=args.shared_group, sessions_db=args.sessions_db,
                    sessions_url=args.sessions_url,
                    log_level=args.log_level, metrics_port=args.metrics_port,
                    metrics_host=args.metrics_host,
                    llama={"urls": args.llama_urls},
                    web={"port": args.web_port, "host": args.web_host,
                         "mqtt_url": args.web_mqtt_url, "ws_port": args.ws_port})
    return load_config(args.config, mqtt=mqtt, **flat)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _config(args)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "run":
        return run(cfg, reload=lambda: _config(args))
    try:
        if args.command == "ask":
            return ask(cfg, args)
        return status(cfg, args.timeout)
    except BrokenPipeError:
        # The reader went away (`ask ... | head`): stop quietly, as other tools do. stdout
        # goes to /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# ---------------------------------------------------------------------- run


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


# ---------------------------------------------------------------------- ask


def ask(cfg: DeploymentConfig, args: argparse.Namespace) -> int:
    """Publish one prompt, print the answer as it streams, then a summary line."""
    from bridge.mqtt.device import BridgeClient
    from bridge.protocol.errors import ReplyTimeout, SequenceError

    request: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}]}
    for key in ("max_tokens", "temperature", "seed", "chunk_bytes", "max_packet", "session",
                "profile"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    client = BridgeClient(cfg.mqtt, prefix=cfg.prefix,
                          client=args.client or f"ask-{int(time.time() * 1000) % 10**8}")
    t0 = time.monotonic()
    first: float | None = None
    try:
        client.connect()
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    try:
        for msg in client.ask(request, idle_timeout=args.timeout):
            if args.json:
                # what arrived, not the defaults of fields a small max_packet left out
                print(msg.model_dump_json(exclude_none=True, exclude_unset=True), flush=True)
            if msg.type == "chunk" and msg.text is not None:
                first = first or time.monotonic()
                if not args.json:
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
            elif msg.type == "reply" and not args.json:
                print(msg.content or json.dumps(msg.tool_calls), end="")
            elif msg.type == "error":
                why = msg.message or "(no message: it did not fit max_packet)"
                print(f"\nerror [{msg.code}]: {why}", file=sys.stderr)
                return EXIT_ERROR_REPLY
            elif msg.type in ("done", "reply"):
                total = time.monotonic() - t0
                ttft = f"{(first - t0) * 1000:.0f} ms" if first else "-"
                tps = msg.timings.tokens_per_s
                # A small max_packet may have left the counts out: say so, do not print 0.
                tokens = f"{msg.usage.completion_tokens} tokens" \
                    if "completion_tokens" in msg.usage.model_fields_set else "tokens not sent"
                print(f"\n[{msg.finish_reason}] {tokens}, "
                      f"first token {ttft}, total {total:.2f} s"
                      + (f", {tps:.1f} tokens/s" if tps else ""), file=sys.stderr)
        return EXIT_OK
    except (ReplyTimeout, SequenceError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    finally:
        client.close()


# ---------------------------------------------------------------------- status


def status(cfg: DeploymentConfig, timeout: float) -> int:
    """Print the retained status message of every bridge under the prefix."""
    from bridge.mqtt.device import BridgeClient

    client = BridgeClient(cfg.mqtt, prefix=cfg.prefix)
    try:
        client.connect()
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    seen: dict[str, dict[str, Any]] = {}
    try:
        client.subscribe(cfg.topics.status_filter())
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = client.next_message(timeout=min(left, 0.5 if seen else left))
            if got is None:
                if seen:
                    break  # retained messages arrive at once; a quiet half second ends it
                continue
            topic, payload = got
            try:
                seen[topic] = json.loads(payload)
            except ValueError:
                seen[topic] = {"state": "unreadable", "raw": payload[:80].decode("latin-1")}
    finally:
        client.close()
    if not seen:
        print(f"no bridge status under {cfg.prefix}/status/+", file=sys.stderr)
        return EXIT_NO_ANSWER
    for topic, body in sorted(seen.items()):
        backends = ", ".join(f"{b.get('name')} {'ok' if b.get('healthy') else 'DOWN'}"
                             f" ({b.get('active', 0)}/{b.get('slots', '?')} busy)"
                             for b in body.get("backends", []))
        print(f"{topic}: {body.get('state')}"
              + (f", mqtt {body['mqtt']}" if "mqtt" in body else "")
              + (f", queued {body.get('queued', 0)}, active {body.get('active', 0)}"
                 if body.get("state") == "online" else f" ({body.get('reason', '')})")
              + (f", backends: {backends}" if backends else "")
              + (f", stats {json.dumps(body['stats'])}" if "stats" in body else ""))
    return EXIT_OK
