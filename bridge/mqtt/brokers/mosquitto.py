"""Mosquitto as a child process: find the binary, start it, wait until it serves, stop it.

Used by the bridge's local broker (:mod:`bridge.mqtt.brokers.local`) and by the test rig
(``tests/support/processes.py``), so both find, start and stop Mosquitto the same way.
The configuration file is the caller's; this module only runs it.

Mosquitto's output goes either to a file (the caller's conf may log there too) or,
line by line, into a Python logger: lines starting ``Error`` at ERROR, ``Warning`` at
WARNING, the rest (start-up, connections) at DEBUG, since a line per device connect
is too chatty for a service log at INFO.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "MOSQUITTO_ENV",
    "MosquittoChild",
    "MosquittoError",
    "MosquittoStartError",
    "find_binary",
    "find_mosquitto",
    "wait_for_port",
]

#: Environment variable naming the mosquitto binary to use, or ``none`` for no Mosquitto.
MOSQUITTO_ENV = "LLAMACPP_MQTT_BRIDGE_MOSQUITTO"
# Debian and Ubuntu install mosquitto in /usr/sbin, which is not on a normal user's PATH.
_SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_RUNNING = " running"  # Mosquitto 2 logs "mosquitto version X running" once it listens
_TAIL_LINES = 200
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class MosquittoError(RuntimeError):
    """Mosquitto cannot be found or run."""


class MosquittoStartError(MosquittoError):
    """Mosquitto exited or did not listen in time while starting.

    Attributes:
        output: what Mosquitto printed while starting.
        port_in_use: whether it said a port is taken.
    """

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output
        self.port_in_use = "Address already in use" in output


def find_binary(name: str) -> str | None:
    """Look a program up on PATH, then in the system directories.

    Args:
        name: the program, e.g. ``mosquitto`` or ``mosquitto_passwd``.

    Returns:
        Its path, or None when it is not installed.
    """
    return shutil.which(name) or shutil.which(name, path=_SYSTEM_PATH)


def find_mosquitto(env: Mapping[str, str] | None = None) -> str | None:
    """The mosquitto binary to run: :data:`MOSQUITTO_ENV` if set, else the installed one.

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        The path, or None when Mosquitto is absent or the variable is ``none``.

    Raises:
        MosquittoError: the variable names a file that is not an executable program.
    """
    chosen = (os.environ if env is None else env).get(MOSQUITTO_ENV, "").strip()
    if not chosen:
        return find_binary("mosquitto")
    if chosen.lower() == "none":
        return None
    path = shutil.which(chosen)
    if path is None:
        raise MosquittoError(f"{MOSQUITTO_ENV}={chosen!r} is not an executable program; "
                             f"give the path of mosquitto, or 'none' to use no Mosquitto")
    return path


def wait_for_port(host: str, port: int, deadline: float = 10.0,
                  proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Args:
        host: address to connect to.
        port: TCP port.
        deadline: seconds to wait at most.
        proc: if given, fail at once when this process exits meanwhile.

    Raises:
        TimeoutError: nothing accepted connections in time.
        RuntimeError: ``proc`` exited first.
    """
    end = time.monotonic() + deadline
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) "
                               f"before {port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= end:
            raise TimeoutError(f"{host}:{port} did not accept connections within {deadline} s")
        time.sleep(0.02)  # poll interval, bounded by the deadline above


def _level(line: str) -> int:
    """The log level of one line of Mosquitto output (it prints no level itself)."""
    if line.startswith("Error"):
        return logging.ERROR
    if line.startswith("Warning"):
        return logging.WARNING
    return logging.DEBUG


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux).

    A bridge killed with SIGKILL runs no clean-up: without this its Mosquitto would
    live on, holding the port, and the next ``run`` would fail. The signal comes when
    the *thread* that started the child ends, so start it from a thread that lives
    as long as the broker should (the main thread, in ``run``).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class MosquittoChild:
    """One Mosquitto process run from a configuration file.

    Args:
        binary: the mosquitto program (see :func:`find_mosquitto`).
        conf_path: its configuration file.
        host: the address its listeners are on (to check that they accept connections).
        ports: the ports of its listeners.
        cwd: working directory of the process.
        output_file: append Mosquitto's stdout and stderr to this file; None sends
            every line to ``logger`` instead.
        logger: where the lines go when there is no ``output_file``.
        die_with_parent: on Linux, SIGTERM the child when the thread that started it
            ends (so a killed parent leaves no broker behind).
        user: run Mosquitto as this account (the parent must be root). Mosquitto
            started as root drops to its ``mosquitto`` account itself, but that change
            of user also cancels ``die_with_parent``; switching before it starts keeps it.
    """

    def __init__(self, binary: str, conf_path: Path, *, host: str, ports: Sequence[int],
                 cwd: Path | None = None, output_file: Path | None = None,
                 logger: logging.Logger | None = None, die_with_parent: bool = True,
                 user: str | None = None) -> None:
        self.binary = binary
        self.conf_path = conf_path
        self.host = host
        self.ports = list(ports)
        self.cwd = cwd
        self.output_file = output_file
        self.logger = logger or logging.getLogger("bridge.mosquitto")
        self.die_with_parent = die_with_parent
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._running_seen = threading.Event()
        self._reader: threading.Thread | None = None
        self._file_offset = 0

    @property
    def pid(self) -> int | None:
        """Process id, or None when not started."""
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        """What Mosquitto printed since the last :meth:`start` (the last 200 lines
        when it goes to the logger)."""
        if self.output_file is None:
            return "\n".join(self._tail)
        try:
            with open(self.output_file, "rb") as f:
                f.seek(self._file_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def start(self, timeout: float = 10.0) -> None:
        """Start Mosquitto and return once it reports running and every port accepts.

        On any failure the process is killed before the error is raised.

        Args:
            timeout: seconds to wait for it.

        Raises:
            MosquittoStartError: it exited (``port_in_use`` tells whether a port was
                taken) or did not listen within ``timeout``; the message has its output.
        """
        self._tail.clear()
        self._running_seen.clear()
        out: IO[bytes] | int = subprocess.PIPE
        if self.output_file is not None:
            self._file_offset = (self.output_file.stat().st_size
                                 if self.output_file.exists() else 0)
            out = open(self.output_file, "ab")  # noqa: SIM115  # closed below, after Popen
        account = pwd.getpwnam(self.user) if self.user is not None else None
        try:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                # Its own session: a Ctrl-C in the terminal reaches only the parent,
                # which then stops the broker last, after saying goodbye over it.
                start_new_session=True,
                # The user is switched before preexec_fn runs (CPython's order).
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
                preexec_fn=_parent_death_signal() if self.die_with_parent else None)
        except OSError as exc:
            raise MosquittoError(f"cannot run {self.binary}: {exc}") from exc
        finally:
            if not isinstance(out, int):
                out.close()
        if self.proc.stdout is not None:
            self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,),
                                            name=f"mosquitto-{self.proc.pid}-output",
                                            daemon=True)
            self._reader.start()
        try:
            self._wait_running(timeout)
            end = time.monotonic() + timeout
            for port in self.ports:
                wait_for_port(self.host, port, max(0.1, end - time.monotonic()), self.proc)
        except BaseException as exc:  # Ctrl-C too: leave no broker behind
            self.kill()
            if not isinstance(exc, TimeoutError | RuntimeError):
                raise
            output = self.output()
            raise MosquittoStartError(
                f"mosquitto did not start on {self.host}:{','.join(map(str, self.ports))}: "
                f"{exc}\n--- mosquitto output ---\n{output.rstrip() or '(none)'}",
                output) from exc

    def _wait_running(self, timeout: float) -> None:
        proc = self.proc
        assert proc is not None
        end = time.monotonic() + timeout
        while not self._seen_running():
            if proc.poll() is not None:
                if self._reader is not None:
                    self._reader.join(2.0)  # take in its last words
                raise RuntimeError(f"mosquitto exited with status {proc.returncode}")
            if time.monotonic() >= end:
                raise TimeoutError(f"mosquitto did not report running within {timeout:g} s")
            # Poll interval, bounded by the deadline above (a file gives no event).
            self._running_seen.wait(0.02)

    def _seen_running(self) -> bool:
        if self.output_file is None:
            return self._running_seen.is_set()
        return _RUNNING in self.output()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            if _RUNNING in line:
                self._running_seen.set()
            self.logger.log(_level(line), "mosquitto: %s", line)
        stream.close()

    def send_signal(self, sig: int) -> None:
        """Send a signal to the process, if it runs (e.g. SIGSTOP, SIGCONT, SIGUSR1)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto then saves its database, if any), wait, SIGKILL if needed.

        Safe to call twice or before :meth:`start`.

        Args:
            timeout: seconds to wait for a clean exit.
        """
        proc = self.proc
        if proc is None:
            return
        end = time.monotonic() + timeout
        while proc.poll() is None:
            left = end - time.monotonic()
            if left <= 0:
                self.logger.warning("mosquitto (pid %d) did not stop within %g s; killing it",
                                    proc.pid, timeout)
                break
            # Again and again: Mosquitto 2.0 sets its run flag only after it has logged
            # "running", so a SIGTERM that comes just then is lost (seen 1 in 8 times).
            self.send_signal(signal.SIGTERM)
            self.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only then
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(min(left, 0.5))
        self.kill()

    def kill(self) -> None:
        """SIGKILL (if still alive), reap the process and end the output reader."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait(10)
        if self._reader is not None:
            self._reader.join(2.0)  # the pipe closes with the process
            self._reader = None
        self.proc = None
