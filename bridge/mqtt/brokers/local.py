"""The broker ``run`` starts when no ``--mqtt-host`` is given.

Mosquitto when it is installed (:func:`~bridge.mqtt.brokers.mosquitto.find_mosquitto`): a child
process with a configuration generated here -- one loopback listener, MQTT 3.1.1 and
5, the queue and size limits of the shipped ``mosquitto/mosquitto.conf`` -- in its own
temporary folder, stopped and removed with the bridge. Otherwise the in-process amqtt
broker (:mod:`bridge.mqtt.brokers.amqtt`), which speaks only MQTT 3.1.1.

Either way the bridge learns which protocol the broker speaks and connects with it at
once (:func:`use_local_broker`) instead of probing.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

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


class LocalBrokerError(RuntimeError):
    """The local broker could not start or stop (the message says why and what to do)."""


class LocalBroker(Protocol):
    """What ``run`` needs of a local broker, Mosquitto or amqtt."""

    kind: Literal["mosquitto", "amqtt"]
    protocol: Literal["5", "3.1.1"]
    host: str

    @property
    def port(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def port_in_use_error(host: str, port: int) -> LocalBrokerError:
    """The error for a taken port: which port, and which flags change it."""
    return LocalBrokerError(
        f"cannot start the embedded MQTT broker: port {port} on {host} is already in use "
        f"(another broker such as Mosquitto, or another bridge?). Use that broker with "
        f"--mqtt-host/--mqtt-port, or pick a free port for the embedded one with --mqtt-port.")


def check_port_free(host: str, port: int) -> None:
    """Fail early, with a clear message, when ``host:port`` cannot be bound.

    SO_REUSEADDR, as brokers set it, so a port in TIME_WAIT does not count as taken.

    Raises:
        LocalBrokerError: the port is taken, or ``host`` is not an address of this machine.
    """
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use_error(host, port) from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LocalBrokerError(f"cannot start the embedded MQTT broker: address "
                                       f"{host} is not an address of this machine.") from exc
            raise LocalBrokerError(f"cannot start the embedded MQTT broker on {host}:{port}: "
                                   f"{exc}") from exc


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _unprivileged_account(folder: Path) -> str | None:
    """The account to start Mosquitto as: ``mosquitto`` if we are root and it can.

    Mosquitto started as root switches to its ``mosquitto`` account (Debian's package
    makes it) by itself, after reading its configuration; starting it as that account
    instead keeps the parent-death signal (see :class:`MosquittoChild`). That needs the
    account and a ``folder`` it can reach: every directory above it open to others
    (``/tmp`` is; a private TMPDIR is not, and then Mosquitto switches by itself).
    """
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    if not all(parent.stat().st_mode & stat.S_IXOTH for parent in folder.parents):
        return None
    return "mosquitto"


class EmbeddedMosquitto:
    """Mosquitto as the bridge's child process, configured for one machine.

    Args:
        binary: the mosquitto program.
        host: listener address; loopback only, since anonymous clients are admitted.
        port: listener port; 0 picks a free one (read it back from :attr:`port`).
        start_timeout: seconds :meth:`start` waits for the listener.
        stop_timeout: seconds :meth:`stop` waits for a clean exit before SIGKILL.
    """

    kind: Literal["mosquitto", "amqtt"] = "mosquitto"
    protocol: Literal["5", "3.1.1"] = "5"

    def __init__(self, binary: str, host: str = "127.0.0.1", port: int = 1883, *,
                 start_timeout: float = 10.0, stop_timeout: float = 5.0) -> None:
        if not host.startswith("127.") and host != "::1":
            raise ValueError(f"the embedded Mosquitto admits anonymous clients, so it "
                             f"listens on loopback only, not on {host!r}")
        self.binary = binary
        self.host = host
        self._requested_port = port
        self._port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.folder: Path | None = None
        self._child: MosquittoChild | None = None

    @property
    def port(self) -> int:
        """The listener's port (the one picked, when started with port 0)."""
        return self._port

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
            f"listener {self._port} {self.host}",
            "protocol mqtt",
            "# Anonymous access, only because the one listener is loopback: nothing",
            "# off this machine can connect. Devices on the LAN need a broker with",
            "# passwords and TLS, such as the one mosquitto/ describes.",
            "allow_anonymous true",
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

    def start(self) -> None:
        """Write the configuration, start Mosquitto, return once it accepts connections.

        Raises:
            LocalBrokerError: the port is taken (the message names it and the flags that
                change it), or Mosquitto failed to start (with its output). No process
                or folder is left behind.
        """
        if self._child is not None:
            return
        attempts = 3 if self._requested_port == 0 else 1  # a picked port may be taken
        for attempt in range(attempts):
            self._port = self._requested_port or _free_port(self.host)
            check_port_free(self.host, self._port)
            self.folder = Path(tempfile.mkdtemp(prefix=f"llamacpp-mqtt-bridge-mosquitto-"
                                                       f"{self._port}-"))
            conf = self.folder / "mosquitto.conf"
            conf.write_text(self.config(), encoding="utf-8")
            user = _unprivileged_account(self.folder)
            if user is not None:  # it must read its configuration as that user
                shutil.chown(self.folder, user)
                shutil.chown(conf, user)
            child = MosquittoChild(self.binary, conf, host=self.host, ports=[self._port],
                                   cwd=self.folder, user=user,
                                   logger=logging.getLogger("bridge.mosquitto"))
            try:
                child.start(self.start_timeout)
            except MosquittoStartError as exc:
                self._remove_folder()
                if exc.port_in_use and attempt + 1 < attempts:
                    continue
                if exc.port_in_use:
                    raise port_in_use_error(self.host, self._port) from exc
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


def start_local_broker(port: int, host: str = "127.0.0.1") -> LocalBroker:
    """Start the broker for ``run`` without ``--mqtt-host``: Mosquitto, else amqtt.

    Mosquitto is the binary :func:`find_mosquitto` finds (the environment variable
    ``LLAMACPP_MQTT_BRIDGE_MOSQUITTO`` overrides the search; ``none`` means amqtt).

    Args:
        port: the port to listen on (0: a free one).
        host: the loopback address to listen on.

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
        broker = EmbeddedMosquitto(binary, host, port)
    else:
        from bridge.mqtt.brokers.amqtt import EmbeddedBroker

        broker = EmbeddedBroker(host, port)
    broker.start()
    return broker


def describe(broker: LocalBroker) -> str:
    """One line for the log: which broker, where, which protocol (and why amqtt)."""
    where = f"on {broker.host}:{broker.port}, MQTT {broker.protocol}"
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
