"""Real servers for the tests: Mosquitto, the embedded amqtt broker, llama.cpp.

In the style of llama.cpp's ``tools/server/tests/utils.py`` ``ServerProcess``: each
helper starts the real thing on a free 127.0.0.1 port, waits (with a deadline)
until it accepts connections, and can be stopped, killed, paused and restarted
for fault tests.

Mosquitto is started from the SHIPPED ``mosquitto/mosquitto.conf``: its global
settings (queues, persistence, sizes, auth mode...) are kept as they are, and
only listeners, paths, ``user`` and logging are rewritten for a temporary
directory -- so the tests exercise the production configuration. The ``secure``
preset also loads the shipped ``mosquitto/acl`` verbatim.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import os
import signal
import socket
import subprocess
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bridge.llama.embedded import EmbeddedLlama, EmbeddedLlamaError, EmbeddedLlamaUnavailable
from bridge.mqtt.brokers.amqtt import EmbeddedBroker
from bridge.mqtt.brokers.mosquitto import (
    MosquittoChild,
    MosquittoStartError,
    find_binary,
    wait_for_port,
)

__all__ = [
    "CERTS_DIR",
    "MOSQUITTO_ACL",
    "MOSQUITTO_CONF",
    "SECURE_USERS",
    "BrokerInfo",
    "EmbeddedBroker",
    "EmbeddedLlama",
    "EmbeddedLlamaError",
    "EmbeddedLlamaUnavailable",
    "MosquittoProcess",
    "free_port",
    "mosquitto_available",
    "running_amqtt",
    "running_llama",
    "wait_for_port",
]

LOCALHOST = "127.0.0.1"  # tests never bind anything else
REPO = Path(__file__).resolve().parents[2]
MOSQUITTO_CONF = REPO / "mosquitto" / "mosquitto.conf"
MOSQUITTO_ACL = REPO / "mosquitto" / "acl"
CERTS_DIR = REPO / "tests" / "certs"

#: Accounts of the ``secure`` preset (username -> password). Device names are the
#: ``{client}`` topic level; bridge names have ``user`` blocks in the shipped ACL.
SECURE_USERS: dict[str, str] = {
    "dev-a": "pw-dev-a",
    "dev-b": "pw-dev-b",
    "bridge@1": "pw-bridge-1",
    "bridge@2": "pw-bridge-2",
}

# Settings of the shipped conf replaced by the test rig (paths and process
# identity) or set per preset (auth). Everything else in its global section is kept.
_REWRITTEN = {
    "pid_file",
    "user",
    "persistence_location",
    "log_dest",
    "password_file",
    "acl_file",
    "allow_anonymous",
}
# Listener-scoped settings that name files; rewritten to the test certificates.
_CERT_KEYS = {"certfile": "server.crt", "keyfile": "server.key", "cafile": "ca.crt"}

_live: weakref.WeakSet[MosquittoProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if a test run ends without fixture teardown (e.g. an exit())."""
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.kill()


# ---------------------------------------------------------------------------- ports


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free a moment ago (bind to 0, read it, close).

    Args:
        host: the address to check on.

    Returns:
        The port number. Another process may take it before you bind it: helpers
        that use it retry with a new port if binding fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_available() -> bool:
    """Whether the ``mosquitto`` and ``mosquitto_passwd`` binaries can be found.

    Returns:
        True if both are on PATH (or in /usr/sbin, where Debian puts mosquitto).
    """
    return find_binary("mosquitto") is not None and find_binary("mosquitto_passwd") is not None


# ---------------------------------------------------------------------------- brokers


@dataclass(frozen=True)
class BrokerInfo:
    """How to reach a test broker.

    Attributes:
        host: address (always 127.0.0.1).
        port: TCP port (plaintext).
        protocol: MQTT version to connect with: ``"3.1.1"`` or ``"5"`` (the
            bridge's ``MqttSettings.protocol`` spelling).
        kind: ``"amqtt"`` or ``"mosquitto"``.
        username: credentials, if the broker needs them.
        password: see ``username``.
        ca_file: set when ``port`` is a TLS listener: the CA to verify it with.
    """

    host: str
    port: int
    protocol: Literal["3.1.1", "5"]
    kind: Literal["amqtt", "mosquitto"]
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None

    @property
    def tls(self) -> bool:
        """Whether to connect with TLS."""
        return self.ca_file is not None

    @property
    def v5(self) -> bool:
        """Whether to connect with MQTT 5."""
        return self.protocol == "5"

    @property
    def label(self) -> str:
        """``amqtt``, ``mosquitto-v311`` or ``mosquitto-v5`` (the fixture ids)."""
        if self.kind == "amqtt":
            return "amqtt"
        return "mosquitto-v5" if self.v5 else "mosquitto-v311"


@contextlib.contextmanager
def running_amqtt(port: int = 0) -> Iterator[EmbeddedBroker]:
    """An :class:`EmbeddedBroker` on 127.0.0.1, stopped on exit.

    Args:
        port: 0 (default) lets the OS pick a free port -- no race; read ``.port``.

    Yields:
        The started broker.
    """
    broker = EmbeddedBroker(LOCALHOST, port)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def running_llama(parallel: int = 2, ctx: int = 4096, **kwargs: Any) -> Iterator[EmbeddedLlama]:
    """An :class:`EmbeddedLlama` (real llama.cpp + Gemma 3 270M), stopped on exit.

    Args:
        parallel: slots.
        ctx: total context.
        kwargs: further :class:`EmbeddedLlama` arguments (``chat_template``, ``threads``...).

    Yields:
        The started server; ``.url`` is its base URL.
    """
    llama = EmbeddedLlama(parallel=parallel, ctx=ctx, **kwargs)
    llama.start()
    try:
        yield llama
    finally:
        llama.stop()


# ---------------------------------------------------------------------------- mosquitto


@dataclass
class _Conf:
    """The shipped mosquitto.conf, split into its global section and listener blocks."""

    global_settings: list[tuple[str, str]] = field(default_factory=list)
    listeners: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> _Conf:
        conf = cls()
        current: list[tuple[str, str]] | None = None
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition(" ")
            value = value.strip()
            if key == "listener":
                current = []
                conf.listeners.append((value, current))
            elif current is not None:
                current.append((key, value))
            else:
                conf.global_settings.append((key, value))
        return conf

    def listener(self, port: str) -> list[tuple[str, str]]:
        """Settings of the shipped listener on ``port`` (e.g. ``"1883"``)."""
        for header, settings in self.listeners:
            if header.split()[0] == port:
                return list(settings)
        raise KeyError(f"{MOSQUITTO_CONF} has no listener on port {port}")


class MosquittoProcess:
    """A Mosquitto broker on 127.0.0.1, configured from the shipped conf.

    Presets:

    * ``plain``: anonymous, MQTT 3.1.1 and 5, one plaintext listener on ``port``.
      (The shipped loopback listener minus ``use_username_as_clientid``, which
      would refuse clients without a username.)
    * ``secure``: ``allow_anonymous false``, a password file made with
      ``mosquitto_passwd -b`` for :data:`SECURE_USERS`, the shipped ACL verbatim,
      a TLS listener on ``port`` with the certificates in ``tests/certs`` and, like
      production, a plaintext listener with the same auth on ``plain_port``.

    Persistence is on (in ``workdir/data``), with the shipped queue limits.

    Args:
        workdir: a private directory for conf, password file, data and log.
        preset: ``plain`` or ``secure``.
        port: listener port (the TLS one for ``secure``); None picks a free one.
        users: accounts for ``secure`` (default :data:`SECURE_USERS`).
        extra_conf: lines appended to the global section (e.g. to shrink a limit).
    """

    def __init__(
        self,
        workdir: Path,
        preset: Literal["plain", "secure"] = "plain",
        *,
        port: int | None = None,
        users: dict[str, str] | None = None,
        extra_conf: str = "",
    ) -> None:
        if preset not in ("plain", "secure"):
            raise ValueError(f"unknown preset {preset!r}")
        self.workdir = Path(workdir)
        self.preset = preset
        self.host = LOCALHOST
        self.users = dict(SECURE_USERS if users is None else users)
        self.extra_conf = extra_conf
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.plain_port = free_port() if preset == "secure" else self.port
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.data_dir = self.workdir / "data"
        self.password_file = self.workdir / "passwd"
        self._child: MosquittoChild | None = None

    # -- public helpers

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The broker process, or None when not running."""
        return self._child.proc if self._child is not None else None

    @property
    def pid(self) -> int | None:
        """Process id, or None when not running."""
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def tls(self) -> bool:
        """Whether ``port`` is a TLS listener (``secure`` preset)."""
        return self.preset == "secure"

    @property
    def ca_file(self) -> Path:
        """The test CA certificate, to verify the ``secure`` listener."""
        return CERTS_DIR / "ca.crt"

    def info(
        self,
        protocol: Literal["3.1.1", "5"] = "5",
        username: str | None = None,
        *,
        tls: bool = False,
    ) -> BrokerInfo:
        """A :class:`BrokerInfo` for one of the listeners.

        Args:
            protocol: MQTT version clients should use.
            username: an account of :attr:`users` (``secure`` preset).
            tls: the TLS listener (``secure`` preset) instead of the plaintext one.

        Returns:
            Connection details.
        """
        if tls and not self.tls:
            raise ValueError("the plain preset has no TLS listener")
        password = self.users[username] if username is not None else None
        port, ca = (self.port, self.ca_file) if tls else (self.plain_port, None)
        return BrokerInfo(self.host, port, protocol, "mosquitto", username, password, ca)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the broker's log.

        Args:
            lines: how many.

        Returns:
            The text (or a note if there is no log yet).
        """
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Write the conf, start Mosquitto, wait until every listener accepts connections.

        If the port was picked automatically and someone took it meanwhile, retries
        with fresh ports (up to 3 times).

        Args:
            timeout: seconds to wait for the listeners.

        Returns:
            self.

        Raises:
            RuntimeError: Mosquitto is missing, exited, or did not listen in time
                (the message includes the log tail).
        """
        if self.running:
            return self
        binary = find_binary("mosquitto")
        if binary is None:
            raise RuntimeError(
                "mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        if self.preset == "secure":
            self._write_password_file()
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.conf_path.write_text(self.render_conf(), encoding="utf-8")
            # Mosquitto logs to the file itself (log_dest file); its stdout and stderr,
            # what it says before the config is read, go there too. A port that accepts
            # connections may belong to someone else (that is how a taken port looks):
            # the child waits for Mosquitto's own "running" line before trying the ports.
            child = MosquittoChild(binary, self.conf_path, host=self.host,
                                   ports=sorted({self.port, self.plain_port}),
                                   cwd=self.workdir, output_file=self.log_path,
                                   die_with_parent=False)
            self._child = child
            _live.add(self)
            try:
                child.start(timeout)
                return self
            except MosquittoStartError as exc:
                self._child = None
                _live.discard(self)
                if exc.port_in_use and attempt + 1 < attempts:
                    self.port = free_port()
                    self.plain_port = free_port() if self.preset == "secure" else self.port
                    continue
                raise RuntimeError(
                    f"mosquitto ({self.preset}) did not start on {self.host}:{self.port}: "
                    f"{exc}\n--- {self.log_path} ---\n{self.log_tail()}"
                ) from exc
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence database), wait, SIGKILL if needed.

        Args:
            timeout: seconds to wait for a clean exit.
        """
        child, self._child = self._child, None
        if child is not None:
            child.stop(timeout)
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL: a crash. Whatever was not yet autosaved is lost."""
        child, self._child = self._child, None
        if child is not None:
            child.kill()
        _live.discard(self)

    def pause(self) -> None:
        """SIGSTOP: the broker freezes (connections stay open, nothing is answered)."""
        if self._child is not None:
            self._child.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._child is not None:
            self._child.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> MosquittoProcess:
        """Stop (cleanly, if still running) and start again on the same ports.

        The persistence directory is kept, so persistent sessions, their queued
        messages and retained messages survive (if they were saved: a clean stop
        saves them, a :meth:`kill` loses what was not autosaved).

        Args:
            timeout: seconds for stopping and for starting.

        Returns:
            self.
        """
        self.stop(timeout)
        self._fixed_port = True  # clients expect the same address
        return self.start(timeout)

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoProcess({self.preset}, {self.host}:{self.port}, pid={self.pid})"

    # -- configuration

    def render_conf(self) -> str:
        """The test configuration derived from the shipped ``mosquitto/mosquitto.conf``.

        Returns:
            The configuration text.
        """
        shipped = _Conf.read(MOSQUITTO_CONF)
        lines = [
            f"# Generated by tests/support/processes.py from {MOSQUITTO_CONF}",
            f"# preset: {self.preset}",
            "",
            "# --- shipped global settings (paths, user, auth mode rewritten) ---",
        ]
        lines += [f"{k} {v}".rstrip() for k, v in shipped.global_settings if k not in _REWRITTEN]
        lines += [
            "",
            "# --- test rig ---",
            # Stay the user we are: as root Mosquitto would otherwise switch to the
            # `mosquitto` user, which cannot read this private temporary directory.
            f"user {getpass.getuser()}",
            f"persistence_location {self.data_dir}/",
            f"log_dest file {self.log_path}",
        ]
        if self.preset == "plain":
            lines.append("allow_anonymous true")
        else:
            lines += [
                "allow_anonymous false",
                f"password_file {self.password_file}",
                f"acl_file {MOSQUITTO_ACL}",
            ]
        if self.extra_conf:
            lines += ["", "# --- extra ---", self.extra_conf.strip()]

        loopback = shipped.listener("1883")
        if self.preset == "plain":
            loopback = [(k, v) for k, v in loopback if k != "use_username_as_clientid"]
            lines += ["", f"listener {self.port} {LOCALHOST}"]
            lines += [f"{k} {v}" for k, v in loopback]
        else:
            lines += ["", f"listener {self.plain_port} {LOCALHOST}"]
            lines += [f"{k} {v}" for k, v in loopback]
            lines += ["", f"listener {self.port} {LOCALHOST}"]
            for key, value in shipped.listener("8883"):
                if key in _CERT_KEYS:
                    value = str(CERTS_DIR / _CERT_KEYS[key])
                lines.append(f"{key} {value}")
        # The shipped websockets listener is left out on purpose: Mosquitto 2.0.11
        # binds it on all interfaces whatever address it is given.
        return "\n".join(lines) + "\n"

    def _write_password_file(self) -> None:
        passwd = find_binary("mosquitto_passwd")
        if passwd is None:
            raise RuntimeError("mosquitto_passwd is missing: apt-get install -y mosquitto")
        self.password_file.unlink(missing_ok=True)
        for index, (user, password) in enumerate(self.users.items()):
            create = ["-c"] if index == 0 else []
            cmd = [passwd, *create, "-b", str(self.password_file), user, password]
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        # Mosquitto 2.0.x warns about (newer versions refuse) world-readable password files.
        os.chmod(self.password_file, 0o600)
