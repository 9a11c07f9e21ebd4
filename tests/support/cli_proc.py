"""The command line as a user runs it: ``llamacpp-mqtt-bridge run`` in a child process,
and ``mosquitto_sub -v`` watching what the bridge publishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.processes import REPO as ROOT

READY_TIMEOUT = 120.0


def cli(*args: str) -> list[str]:
    """``llamacpp-mqtt-bridge ARGS`` of this checkout (``python -m bridge``, run from ROOT)."""
    return [sys.executable, "-m", "bridge", *args]


class RunningBridge:
    """``llamacpp-mqtt-bridge run ARGS`` in a child process, with its output (the log) collected.

    Args:
        args: the flags of ``run``.
        env: the child's environment (default: this process's).
        new_session: give the child its own process group, so that a test can send it a
            terminal's Ctrl-C (:meth:`stop` with ``group=True``).
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 new_session: bool = False) -> None:
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cli("run", *args), cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=new_session)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
            if " ready: " in line:
                self.ready.set()
        with self._cond:
            self._eof = True
            self._cond.notify_all()
        self.ready.set()  # EOF: wake the waiter, who checks the exit code

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        assert self.ready.wait(READY_TIMEOUT), f"bridge not ready:\n{self.log}"
        assert self.proc.poll() is None, f"bridge exited:\n{self.log}"

    def wait_line(self, needle: str, after: int = 0, timeout: float = READY_TIMEOUT) -> int:
        """Wait for a line containing ``needle`` (from line ``after`` on); return its index."""
        def find() -> int | None:
            return next((i for i in range(after, len(self.lines)) if needle in self.lines[i]),
                        None)

        with self._cond:
            self._cond.wait_for(lambda: find() is not None or self._eof, timeout)
            found = find()
            assert found is not None, f"no {needle!r} in the bridge's output:\n{self.log}"
            return found

    def stop(self, sig: int = signal.SIGTERM, *, group: bool = False) -> int:
        """Send ``sig`` (to the whole process group, like Ctrl-C, if ``group``) and wait;
        kill it if it has not exited within 30 s. Returns its exit code."""
        if self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._reader.join(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@dataclass(frozen=True)
class Line:
    """One ``mosquitto_sub -v`` line: the topic and the JSON payload (None if not JSON)."""

    topic: str
    payload: str

    @property
    def message(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.payload)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class SubWatcher:
    """A ``mosquitto_sub ... -v`` command in a child process, its lines collected.

    Args:
        command: the command line (a shell string, as a README shows it).
        cwd: where to run it.
    """

    def __init__(self, command: str, cwd: Path = ROOT) -> None:
        self.proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[Line] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            topic, _, payload = raw.rstrip("\n").partition(" ")
            with self._cond:
                self.lines.append(Line(topic, payload))
                self._cond.notify_all()

    def wait_for(self, done: Callable[[list[Line]], bool], timeout: float) -> bool:
        """Wait until ``done(lines)`` holds; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: done(self.lines), timeout)

    def on(self, topic: str) -> list[dict[str, Any]]:
        """The JSON messages seen on ``topic``, in arrival order."""
        with self._cond:
            return [m for line in self.lines if line.topic == topic
                    if (m := line.message) is not None]

    def topics(self) -> list[str]:
        """Every topic seen, in order of first appearance."""
        with self._cond:
            return list(dict.fromkeys(line.topic for line in self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._reader.join(10)
