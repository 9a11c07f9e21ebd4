"""The command line's flags, and the configuration they make (README, *Configuration*).

Every ``run`` flag is also a TOML key and an environment variable (see
``bridge.config.settings``); flags win over the environment, which wins over the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bridge.config.settings import DeploymentConfig, MqttSettings, WebSettings, load_config
from bridge.version import __version__


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
    """The configuration of parsed flags: a flag left out (None) falls back to the
    environment, then the ``--config`` file, then the default."""
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
