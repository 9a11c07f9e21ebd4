"""Command line: ``llamacpp-mqtt-bridge run | ask | status`` (SPEC §8).

Every ``run`` flag is also a TOML key and an environment variable (see
``bridge.config``); flags win over the environment, which wins over the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bridge import __version__
from bridge.config import DeploymentConfig, load_config

if TYPE_CHECKING:
    from bridge.service import Bridge

EXIT_OK, EXIT_ERROR_REPLY, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3


def _mqtt_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MQTT broker")
    g.add_argument("--config", type=Path, help="TOML configuration file")
    g.add_argument("--mqtt-host", help="broker host (run: default is an embedded broker)")
    g.add_argument("--mqtt-port", type=int, help="broker port (default 1883)")
    g.add_argument("--mqtt-username")
    g.add_argument("--mqtt-password")
    g.add_argument("--mqtt-tls", action="store_true", default=None, help="connect with TLS")
    g.add_argument("--mqtt-ca", type=Path, help="CA certificate file for TLS")
    g.add_argument("--mqtt-cert", type=Path, help="client certificate file for TLS")
    g.add_argument("--mqtt-key", type=Path, help="client key file for TLS")
    g.add_argument("--mqtt-protocol", choices=["auto", "5", "3.1.1"])
    g.add_argument("--prefix", help="topic prefix (default 'llm')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamacpp-mqtt-bridge",
        description="Stream answers from llama.cpp's llama-server to MQTT devices.")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the bridge")
    _mqtt_flags(run)
    g = run.add_argument_group("bridge")
    g.add_argument("--llama-url", action="append", dest="llama_urls", metavar="URL",
                   help="llama-server base URL (repeatable); none: start an embedded llama.cpp")
    g.add_argument("--bridge-id")
    g.add_argument("--chunk-bytes", type=int, help="default max bytes of a chunk message")
    g.add_argument("--flush-ms", type=float, help="coalesce tokens for at most this long")
    g.add_argument("--max-concurrent", type=int, help="default: llama-server's slot count")
    g.add_argument("--shared-group", help="subscribe through $share/NAME/... (several bridges)")
    g.add_argument("--sessions-db", type=Path)
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    g.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this port (default: off)")
    g.add_argument("--metrics-host",
                   help="address of the metrics endpoint (default 127.0.0.1: it has no auth)")

    ask = sub.add_parser("ask", help="send a prompt and print the streamed answer")
    ask.add_argument("prompt", help="the question (plain text)")
    _mqtt_flags(ask)
    ask.add_argument("--client", help="device name (default: ask-<random>)")
    ask.add_argument("--max-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--chunk-bytes", type=int)
    ask.add_argument("--session", help="keep the conversation on the bridge under this name "
                                       "(sessions are per device: give --client too)")
    ask.add_argument("--profile", help="a named preset of the bridge's config")
    ask.add_argument("--json", action="store_true", help="print every reply message as JSON")
    ask.add_argument("--timeout", type=float, default=120.0, help="max silence in seconds")

    status = sub.add_parser("status", help="show the retained status of every bridge")
    _mqtt_flags(status)
    status.add_argument("--timeout", type=float, default=3.0)
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
                    log_level=args.log_level, metrics_port=args.metrics_port,
                    metrics_host=args.metrics_host,
                    llama={"urls": args.llama_urls})
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
    if args.command == "ask":
        return ask(cfg, args)
    return status(cfg, args.timeout)


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
    from bridge.service import Bridge

    with ExitStack() as stack:
        bridge_cfg = cfg  # cfg stays as loaded: SIGHUP compares the reloaded file with it
        if cfg.mqtt.host is None:
            from bridge.local_broker import describe, start_local_broker, use_local_broker

            broker = start_local_broker(cfg.mqtt.port)
            stack.callback(broker.stop)  # registered first, so it stops last
            log.info("%s", describe(broker))
            bridge_cfg = use_local_broker(cfg, broker)
        urls = list(cfg.llama.urls)
        if not urls:
            from bridge.embedded_llama import EmbeddedLlama

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
        host = cfg.mqtt.host or "127.0.0.1"
        print(f"bridge {cfg.bridge_id} ready: MQTT {host}:{cfg.mqtt.port}, topics "
              f"{cfg.prefix}/request/+, llama.cpp at {', '.join(urls)}. "
              f'Try: llamacpp-mqtt-bridge ask "hi"', flush=True)
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
    from bridge.client import BridgeClient, ReplyTimeout, SequenceError

    request: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}],
                               "max_tokens": args.max_tokens}
    for key in ("temperature", "seed", "chunk_bytes", "session", "profile"):
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
                print(msg.model_dump_json(exclude_none=True), flush=True)
            if msg.type == "chunk" and msg.text is not None:
                first = first or time.monotonic()
                if not args.json:
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
            elif msg.type == "reply" and not args.json:
                print(msg.content or json.dumps(msg.tool_calls), end="")
            elif msg.type == "error":
                print(f"\nerror [{msg.code}]: {msg.message}", file=sys.stderr)
                return EXIT_ERROR_REPLY
            elif msg.type in ("done", "reply"):
                total = time.monotonic() - t0
                ttft = f"{(first - t0) * 1000:.0f} ms" if first else "-"
                tps = msg.timings.tokens_per_s
                print(f"\n[{msg.finish_reason}] {msg.usage.completion_tokens} tokens, "
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
    from bridge.client import BridgeClient

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
