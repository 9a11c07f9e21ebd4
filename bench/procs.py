"""The processes of a benchmark: brokers, the fake llama-server, the bridge, devices.

Each runs in its own process so its CPU time can be told apart (psutil), listens
on 127.0.0.1 only, and is stopped by the context manager that started it (SIGTERM,
then SIGKILL after a deadline). Mosquitto runs from the shipped
``mosquitto/mosquitto.conf`` through the test rig (``tests.support.processes``).

``python -m bench.procs amqtt --port N`` runs the embedded amqtt broker alone in a
process (prints its port, serves until stdin closes).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Broker:
    kind: str  # "mosquitto" or "amqtt"
    host: str
    port: int
    pid: int

    @property
    def protocol(self) -> str:
        """What the bridge ends up speaking with it (``auto``: 5 if the broker accepts it)."""
        return "5" if self.kind == "mosquitto" else "3.1.1"


_started: list[subprocess.Popen[Any]] = []


def _popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Popen, remembered so that :func:`_kill_leftovers` can stop it whatever happens."""
    proc = subprocess.Popen(cmd, **kwargs)
    _started.append(proc)
    return proc


@atexit.register
def _kill_leftovers() -> None:
    for proc in _started:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
                proc.wait(5)


def _stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _first_line(proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), True)
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < end:
        if sel.select(0.2):
            line = proc.stdout.readline().decode().strip()
            if line:
                return line
        if proc.poll() is not None:
            break
    raise RuntimeError(f"{what} did not start (exit status {proc.poll()})")


@contextlib.contextmanager
def mosquitto() -> Iterator[Broker]:
    """Mosquitto from the shipped configuration on a free port."""
    sys.path.insert(0, str(REPO))
    from tests.support.processes import MosquittoProcess

    with tempfile.TemporaryDirectory(prefix="bench-mosq-") as tmp:
        proc = MosquittoProcess(Path(tmp), "plain")
        proc.start()
        try:
            assert proc.pid is not None
            yield Broker("mosquitto", proc.host, proc.port, proc.pid)
        finally:
            proc.stop()


@contextlib.contextmanager
def amqtt() -> Iterator[Broker]:
    """The embedded amqtt broker, alone in a process."""
    proc = _popen([PY, "-m", "bench.procs", "amqtt"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(_first_line(proc, "amqtt broker"))
        yield Broker("amqtt", "127.0.0.1", port, proc.pid)
    finally:
        _stop(proc)


@contextlib.contextmanager
def broker(kind: str) -> Iterator[Broker]:
    with (mosquitto() if kind == "mosquitto" else amqtt()) as b:
        yield b


@dataclass
class Fake:
    url: str
    pid: int


@contextlib.contextmanager
def fake_llama(slots: int = 512) -> Iterator[Fake]:
    """The fake llama-server (:mod:`bench.fake_llama`) in its own process."""
    proc = _popen([PY, "-m", "bench.fake_llama", "--slots", str(slots),
                             "--max-s", "3600"],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield Fake(_first_line(proc, "fake llama-server"), proc.pid)
    finally:
        _stop(proc)


@dataclass
class BridgeProc:
    pid: int
    bridge_id: str
    log: Path


BENCH_ENV = {
    # A load test from few "devices" must not hit the per-client limits.
    "BRIDGE_CLIENT_RATE_PER_MIN": "1000000",
    "BRIDGE_CLIENT_MAX_INFLIGHT": "64",
    "BRIDGE_QUEUE_SIZE": "4096",
    "BRIDGE_MAX_TOKENS_CAP": "1000000",
    "BRIDGE_MAX_GENERATION_S": "600",
}


@contextlib.contextmanager
def bridge(b: Broker, llama_url: str | list[str], *, bridge_id: str, max_concurrent: int,
           flush_ms: float, qos: int, env: dict[str, str] | None = None,
           log_dir: Path, source: Path | None = None) -> Iterator[BridgeProc]:
    """``python -m bridge run`` as a subprocess; ready once it logged that it serves.

    ``source``: a directory holding another copy of the ``bridge`` package to run
    instead of this checkout's (for before/after comparisons, ``BENCH_BRIDGE_SOURCE``).
    ``llama_url``: one backend or several (``--llama-url`` each).
    """
    source = source or (Path(os.environ["BENCH_BRIDGE_SOURCE"])
                        if os.environ.get("BENCH_BRIDGE_SOURCE") else REPO)
    log = log_dir / f"{bridge_id}.log"
    # The QoS goes through a config file, which every version takes: bench.ab runs old
    # checkouts too, and before 2026-11-21 BRIDGE_MQTT__QOS from the environment was refused.
    conf = log_dir / f"{bridge_id}.toml"
    conf.write_text(f"[mqtt]\nqos = {int(qos)}\n", encoding="utf-8")
    full_env = {**os.environ, **BENCH_ENV, **(env or {})}
    cmd = [PY, "-m", "bridge", "run", "--config", str(conf),
           "--mqtt-host", b.host, "--mqtt-port", str(b.port),
           *(arg for url in ([llama_url] if isinstance(llama_url, str) else llama_url)
             for arg in ("--llama-url", url)),
           "--max-concurrent", str(max_concurrent),
           "--flush-ms", str(flush_ms), "--bridge-id", bridge_id, "--log-level", "INFO",
           "--sessions-db", str(log_dir / f"{bridge_id}.db"),
           # amqtt speaks 3.1.1 only: skip the bridge's MQTT 5 probe (3 s per start).
           "--mqtt-protocol", "5" if b.protocol == "5" else "3.1.1"]
    with open(log, "wb") as out:
        proc = _popen(cmd, cwd=source, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 60
        while b" serving " not in log.read_bytes():
            if proc.poll() is not None:
                raise RuntimeError(f"bridge exited ({proc.returncode}):\n"
                                   f"{log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > end:
                raise RuntimeError(f"bridge not serving after 60 s:\n"
                                   f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        yield BridgeProc(proc.pid, bridge_id, log)
    finally:
        _stop(proc)


def run_json(cmd: list[str], timeout: float, on_ready: Any = None) -> dict[str, Any]:
    """Run a bench helper that prints ``{"ready": true}`` then one JSON result line.

    Args:
        cmd: the command.
        timeout: seconds for the whole run (the helper is killed after it).
        on_ready: called once the helper reported it is ready.
    """
    import threading

    proc = _popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    killer = threading.Timer(timeout, proc.kill)  # a helper that hangs is killed
    killer.daemon = True
    killer.start()
    try:
        end = time.monotonic() + timeout
        result: dict[str, Any] | None = None
        for raw in proc.stdout:
            line = json.loads(raw)
            if line.get("ready"):
                if on_ready is not None:
                    on_ready()
                continue
            result = line
            break
        proc.wait(max(1.0, end - time.monotonic()))
        if result is None:
            raise RuntimeError(f"{cmd[2]} gave no result (exit {proc.returncode})")
        return result
    finally:
        killer.cancel()
        _stop(proc, 2)


def _amqtt_main(port: int) -> int:
    import logging

    from bridge.mqtt.brokers.amqtt import EmbeddedBroker

    # amqtt logs a warning for every refused MQTT 5 CONNECT; the bridges get --mqtt-protocol.
    logging.basicConfig(level=logging.ERROR)
    broker = EmbeddedBroker("127.0.0.1", port, log_level=logging.ERROR)
    broker.start()
    print(broker.port, flush=True)
    try:
        while sys.stdin.buffer.read1(4096):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "amqtt":
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        sys.exit(_amqtt_main(int(sys.argv[3]) if len(sys.argv) > 3 else 0))
    sys.exit("usage: python -m bench.procs amqtt [--port N]")
