"""A real ``redis-server`` (Debian's package) on a free loopback port, for the tests.

Each instance has its own data folder and a password, listens on 127.0.0.1 only and
keeps its data in an append-only file there, so :meth:`RedisProcess.restart` brings
back what was stored (as a production Redis with persistence would).
"""

from __future__ import annotations

import atexit
import contextlib
import secrets
import shutil
import subprocess
import weakref
from pathlib import Path

import pytest
import redis

from tests.support.processes import LOCALHOST, free_port
from tests.support.waiting import poll_until

REDIS_SERVER = "redis-server"
_live: weakref.WeakSet[RedisProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if a test run ends without fixture teardown."""
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.kill()


def require_redis() -> str:
    """The ``redis-server`` binary, or fail saying how to install it."""
    found = shutil.which(REDIS_SERVER) or shutil.which("/usr/bin/redis-server")
    if found is None:
        pytest.fail("redis-server is not installed: `sudo apt-get install redis-server` "
                    "(.ci/run installs it)", pytrace=False)
    return found


class RedisProcess:
    """``redis-server`` on 127.0.0.1 with its own folder, port and password.

    Args:
        workdir: its folder (config, append-only file, log).
        port: the port; None picks a free one (kept across :meth:`restart`).
    """

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self.password = secrets.token_hex(8)
        self.log_path = self.workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0``, what ``sessions_url`` takes."""
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> redis.Redis:
        """A client for checks made by the test itself (timeouts of 5 s)."""
        return redis.Redis(host=self.host, port=self.port, password=self.password,
                           socket_timeout=5, socket_connect_timeout=5)

    def start(self, timeout: float = 10.0) -> RedisProcess:
        binary = require_redis()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        conf.write_text("\n".join([
            f"bind {self.host}",
            f"port {self.port}",
            "protected-mode yes",
            f"requirepass {self.password}",
            f"dir {self.workdir}",
            "appendonly yes",
            "appendfsync always",
            'save ""',
            "daemonize no",
            f"logfile {self.log_path}",
            "tcp-keepalive 60",
            "",
        ]))
        self._proc = subprocess.Popen([binary, str(conf)], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _live.add(self)
        probe = self.client()
        try:
            def answers() -> bool:
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log_tail()}")
                try:
                    return bool(probe.ping())
                except redis.RedisError:
                    return False

            if not poll_until(answers, bool, timeout, interval=0.05):
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING within {timeout} s: "
                                   f"{self.log_tail()}")
        finally:
            probe.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM: it writes its data), and wait."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None
        _live.discard(self)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self.stop()

    def restart(self, timeout: float = 10.0) -> RedisProcess:
        """Stop and start again on the same port, with the same data and password."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
