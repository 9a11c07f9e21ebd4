"""The broker ``run`` starts when no ``--mqtt-host`` is given.

Mosquitto when it is installed (:func:`~bridge.mqtt.brokers.mosquitto.find_mosquitto`): a child
process with a configuration generated here -- one loopback listener, MQTT 3.1.1 and
5, the queue and size limits of the shipped ``mosquitto/mosquitto.conf``, and for the
web page (``run --web-port``) a WebSocket listener -- in its own temporary folder,
stopped and removed with the bridge. Otherwise the in-process amqtt
broker (:mod:`bridge.mqtt.brokers.amqtt`), which speaks only MQTT 3.1.1.

Either way the bridge learns which protocol the broker speaks and connects with it at
once (:func:`use_local_broker`) instead of probing.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from bridge.mqtt.brokers.base import (
    LocalBroker,
    LocalBrokerError,
    check_port_free,
    port_in_use_error,
)
from bridge.mqtt.brokers.mosquitto import (
    MOSQUITTO_ENV,
    MosquittoChild,
    MosquittoError,
    MosquittoStartError,
)
from bridge.mqtt.brokers.mosquitto import find_mosquitto as find_mosquitto

if TYPE_CHECKING:
    from bridge.config.settings import DeploymentConfig

__all__ = [
    "EmbeddedMosquitto",
    "LocalBroker",
    "LocalBrokerError",
    "check_port_free",
    "find_mosquitto",
    "start_local_broker",
    "use_local_broker",
]

_log = logging.getLogger(__name__)

# The limits of the shipped mosquitto/mosquitto.conf (tests/mqtt/test_local_broker.py checks
# they stay equal; that file says why each is set). The default of 1000 queued messages
# silently drops QoS 1 reply chunks for a slow subscriber.
SHIPPED_LIMITS = {
    "max_queued_messages": "100000",
    "max_queued_bytes": "33554432",
    "max_inflight_messages": "20",
    "queue_qos0_messages": "false",
    "max_packet_size": "262144",
    "persistent_client_expiration": "14d",
    "set_tcp_nodelay": "true",
}


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# The account the page logs in with on the WebSocket listener (see EmbeddedMosquitto.config).
WS_USERNAME = "web"


def _password_line(username: str, password: str) -> str:
    """One line of a Mosquitto password file, as ``mosquitto_passwd`` (2.0) writes it.

    ``$7$``: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, base64 -- made here so
    that the local broker needs no ``mosquitto_passwd`` program.
    """
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return (f"{username}:$7$101${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}\n")


def _unprivileged_account(folder: Path) -> str | None:
    """The account to start Mosquitto as: ``mosquitto`` if we are root and it can.

    Mosquitto started as root switches to its ``mosquitto`` account (Debian's package
    makes it) by itself, after reading its configuration; starting it as that account
    instead keeps the parent-death signal (see :class:`MosquittoChild`). That needs the
    account and a ``folder`` it can reach: every directory above it open to others
    (``/tmp`` is; a private TMPDIR is not, and then Mosquitto switches by itself).
    """
    if not _switches_user():
        return None
    if not all(parent.stat().st_mode & stat.S_IXOTH for parent in folder.parents):
        return None
    return "mosquitto"


def _switches_user() -> bool:
    """Whether Mosquitto, started as we are, switches to its ``mosquitto`` account by itself
    (after reading its configuration, before reading a password file)."""
    if os.geteuid() != 0:
        return False
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return False
    return True


class EmbeddedMosquitto:
    """Mosquitto as the bridge's child process, configured for one machine.

    Args:
        binary: the mosquitto program.
        host: listener address; loopback only, since anonymous clients are admitted.
        port: listener port; 0 picks a free one (read it back from :attr:`port`).
        ws_port: port of an MQTT-over-WebSocket listener for browsers; 0 picks a free
            one, None (the default) starts none.
        start_timeout: seconds :meth:`start` waits for the listener.
        stop_timeout: seconds :meth:`stop` waits for a clean exit before SIGKILL.
    """

    kind: Literal["mosquitto", "amqtt"] = "mosquitto"
    protocol: Literal["5", "3.1.1"] = "5"

    def __init__(self, binary: str, host: str = "127.0.0.1", port: int = 1883, *,
                 ws_port: int | None = None, start_timeout: float = 10.0,
                 stop_timeout: float = 5.0) -> None:
        if not host.startswith("127.") and host != "::1":
            raise ValueError(f"the embedded Mosquitto admits anonymous clients, so it "
                             f"listens on loopback only, not on {host!r}")
        self.binary = binary
        self.host = host
        self._requested_port = port
        self._port = port
        self._requested_ws_port = ws_port
        self._ws_port = ws_port
        # A new password for each broker: only whoever reads the page's config.json (served
        # on loopback) or this broker's private folder learns it.
        self._ws_account: tuple[str, str] | None = \
            None if ws_port is None else (WS_USERNAME, secrets.token_urlsafe(18))
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.folder: Path | None = None
        self._child: MosquittoChild | None = None

    @property
    def port(self) -> int:
        """The listener's port (the one picked, when started with port 0)."""
        return self._port

    @property
    def ws_port(self) -> int | None:
        """The WebSocket listener's port (the one picked, for 0); None: no such listener."""
        return self._ws_port

    @property
    def ws_account(self) -> tuple[str, str] | None:
        """Username and password the WebSocket listener requires; None: no such listener."""
        return self._ws_account

    @property
    def pid(self) -> int | None:
        """Mosquitto's process id while it runs."""
        return self._child.pid if self._child is not None else None

    def config(self) -> str:
        """The generated ``mosquitto.conf``.

        Returns:
            Its text.
        """
        lines = [
            "# Generated by llamacpp-mqtt-bridge for `run` without --mqtt-host: a broker",
            "# for this machine that starts and stops with the bridge.",
            *self._listeners(),
            "# The broker lives as long as the bridge and its folder is removed when it",
            "# stops, so a database would only cost a write at every stop. Sessions and",
            "# queued replies last while the bridge runs.",
            "persistence false",
            "# Limits as in the shipped mosquitto/mosquitto.conf (it says why); Nagle off",
            "# so small reply chunks are not held back.",
            *(f"{key} {value}" for key, value in SHIPPED_LIMITS.items()),
            "# Into the bridge's log (logger bridge.mosquitto), which adds timestamps.",
            "# stderr, not stdout: Mosquitto does not flush stdout, and a pipe buffers it.",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp false",
        ]
        return "\n".join(lines) + "\n"

    def _listeners(self) -> list[str]:
        anonymous = [
            "# Anonymous access, only because the listener is loopback: nothing",
            "# off this machine can connect. Devices on the LAN need a broker with",
            "# passwords and TLS, such as the one mosquitto/ describes.",
            "allow_anonymous true",
        ]
        if self._ws_port is None:
            return [f"listener {self._port} {self.host}", "protocol mqtt", *anonymous]
        return [
            "# Login rules per listener: anonymous on TCP, a password on WebSockets.",
            "per_listener_settings true",
            f"listener {self._port} {self.host}", "protocol mqtt", *anonymous,
            "# For the web page (run --web-port), which learns the account from its",
            "# config.json. A password although the address is loopback: Mosquitto",
            "# 2.0.11 (Debian 12) binds websockets listeners on ALL interfaces whatever",
            "# the address (eclipse-mosquitto/mosquitto#3045, fixed in 2.0.12).",
            f"listener {self._ws_port} {self.host}", "protocol websockets",
            "allow_anonymous false", "password_file passwd",
        ]

    def _write_files(self, folder: Path) -> list[Path]:
        """The configuration (and the WebSocket account's password file) in ``folder``."""
        conf = folder / "mosquitto.conf"
        conf.write_text(self.config(), encoding="utf-8")
        if self._ws_account is None:
            return [conf]
        passwd = folder / "passwd"
        # Private before the hash is in it: Mosquitto 2.0 warns about (later versions
        # refuse) a password file others can read.
        passwd.touch(mode=0o600)
        passwd.write_text(_password_line(*self._ws_account), encoding="utf-8")
        return [conf, passwd]

    def start(self) -> None:
        """Write the configuration, start Mosquitto, return once it accepts connections.

        Raises:
            LocalBrokerError: the port is taken (the message names it and the flags that
                change it), or Mosquitto failed to start (with its output). No process
                or folder is left behind.
        """
        if self._child is not None:
            return
        picked = self._requested_port == 0 or self._requested_ws_port == 0
        attempts = 3 if picked else 1  # a picked port may be taken
        for attempt in range(attempts):
            self._port = self._requested_port or _free_port(self.host)
            check_port_free(self.host, self._port)
            ports = [self._port]
            if self._requested_ws_port is not None:
                self._ws_port = self._requested_ws_port or _free_port(self.host)
                check_port_free(self.host, self._ws_port, websocket=True)
                ports.append(self._ws_port)
            self.folder = Path(tempfile.mkdtemp(prefix=f"llamacpp-mqtt-bridge-mosquitto-"
                                                       f"{self._port}-"))
            files = self._write_files(self.folder)
            user = _unprivileged_account(self.folder)
            if user is not None:  # it must read its configuration as that user
                for path in (self.folder, *files):
                    shutil.chown(path, user)
            elif len(files) > 1 and _switches_user():
                self._remove_folder()
                raise LocalBrokerError(
                    f"cannot give the embedded Mosquitto its WebSocket listener: started as "
                    f"root it runs as the mosquitto account, which cannot reach its password "
                    f"file under {tempfile.gettempdir()}. Use a TMPDIR open to others (/tmp).")
            child = MosquittoChild(self.binary, files[0], host=self.host, ports=ports,
                                   cwd=self.folder, user=user,
                                   logger=logging.getLogger("bridge.mosquitto"))
            try:
                child.start(self.start_timeout)
            except MosquittoStartError as exc:
                self._remove_folder()
                if exc.port_in_use and attempt + 1 < attempts:
                    continue
                if exc.port_in_use:
                    raise port_in_use_error(self.host, *ports) from exc
                raise LocalBrokerError(f"cannot start the embedded MQTT broker (Mosquitto, "
                                       f"{self.binary}): {exc}") from exc
            except BaseException:  # e.g. KeyboardInterrupt: leave no broker behind
                child.kill()
                self._remove_folder()
                raise
            self._child = child
            _log.debug("mosquitto (pid %s) listening on %s:%d", child.pid, self.host,
                       self._port)
            return

    def stop(self) -> None:
        """Stop Mosquitto (SIGTERM, then SIGKILL after ``stop_timeout``), remove its folder.

        Safe to call twice or on a broker that never started.
        """
        child, self._child = self._child, None
        try:
            if child is not None:
                child.stop(self.stop_timeout)
        finally:
            self._remove_folder()

    def _remove_folder(self) -> None:
        folder, self.folder = self.folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> EmbeddedMosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedMosquitto({self.host}:{self.port}, pid={self.pid})"


def start_local_broker(port: int, host: str = "127.0.0.1", *,
                       ws_port: int | None = None) -> LocalBroker:
    """Start the broker for ``run`` without ``--mqtt-host``: Mosquitto, else amqtt.

    Mosquitto is the binary :func:`find_mosquitto` finds (the environment variable
    ``LLAMACPP_MQTT_BRIDGE_MOSQUITTO`` overrides the search; ``none`` means amqtt).

    Args:
        port: the port to listen on (0: a free one).
        host: the loopback address to listen on.
        ws_port: the port of an MQTT-over-WebSocket listener for the web page (0: a
            free one); None: no such listener.

    Returns:
        The started broker.

    Raises:
        LocalBrokerError: it could not start (the message says why and what to do).
    """
    try:
        binary = find_mosquitto()
    except MosquittoError as exc:
        raise LocalBrokerError(str(exc)) from exc
    broker: LocalBroker
    if binary is not None:
        broker = EmbeddedMosquitto(binary, host, port, ws_port=ws_port)
    else:
        from bridge.mqtt.brokers.amqtt import EmbeddedBroker

        broker = EmbeddedBroker(host, port, ws_port=ws_port)
    broker.start()
    return broker


def describe(broker: LocalBroker) -> str:
    """One line for the log: which broker, where, which protocol (and why amqtt)."""
    where = f"on {broker.host}:{broker.port}, MQTT {broker.protocol}"
    if broker.ws_port is not None:
        where += f", WebSocket on {broker.host}:{broker.ws_port}"
    if broker.kind == "mosquitto":
        return f"local broker: Mosquitto (pid {getattr(broker, 'pid', None)}) {where}"
    if os.environ.get(MOSQUITTO_ENV, "").strip().lower() == "none":
        why = f"{MOSQUITTO_ENV}=none"
    else:
        why = "Mosquitto is not installed; apt-get install mosquitto gives the better broker"
    return f"local broker: amqtt {where} ({why})"


def use_local_broker(cfg: DeploymentConfig, broker: LocalBroker) -> DeploymentConfig:
    """The configuration to run the bridge with against ``broker``.

    ``auto`` means "MQTT 5 if the broker speaks it": here the answer is known, so the
    bridge connects with the broker's protocol at once instead of trying MQTT 5 first
    (3 s lost on amqtt). A version the user chose (``5`` or ``3.1.1``) is kept.

    Args:
        cfg: the configuration as loaded.
        broker: the started local broker.

    Returns:
        A copy of ``cfg`` with the broker's address and, for ``auto``, its protocol.
    """
    update: dict[str, object] = {"host": broker.host, "port": broker.port}
    if cfg.mqtt.protocol == "auto":
        update["protocol"] = broker.protocol
    return cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update=update)})
