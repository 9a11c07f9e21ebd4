"""The broker ``run`` starts without ``--mqtt-host``, as a new user runs it.

``llamacpp-mqtt-bridge run`` runs in a child process (real llama.cpp behind it) and
devices are paho clients on loopback. Each behaviour is checked on both local brokers:
Mosquitto (the default where it is installed) and amqtt (the fallback, chosen here
with ``LLAMACPP_MQTT_BRIDGE_MOSQUITTO=none`` as on a machine without Mosquitto):

* a device gets no retained message its filters do not match, although a dashboard
  watches ``llm/status/+`` (on amqtt every CONNECT used to deliver the status);
* 20 devices connecting at once all connect once, subscribe and stay connected;
* the bridge connects with the broker's protocol at once (no MQTT 5 probe) and a
  clean start and stop log nothing at WARNING or above;
* the Mosquitto child is gone after a stop, Ctrl-C and a killed bridge, and so is its
  folder (``tests/mqtt/test_mosquitto_child.py``: a failed start, its configuration).

"Never arrives" is shown with a marker message the device publishes to itself after
subscribing: the broker sends anything it would send for the CONNECT or the
SUBSCRIBE before the marker.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.config.settings import MqttSettings
from bridge.mqtt.brokers.mosquitto import (
    MOSQUITTO_ENV,
)
from bridge.mqtt.device import BridgeClient
from tests.support.cli_proc import RunningBridge
from tests.support.device import Device
from tests.support.local_broker import (
    FOLDER_GLOB,
    PROTOCOL,
    broker_processes,
    require_mosquitto,
)
from tests.support.processes import free_port
from tests.support.recorder import check_reply_stream
from tests.support.waiting import LOOPBACK_TIMEOUT as TIMEOUT
from tests.support.waiting import poll_until

KINDS = ["mosquitto", "amqtt"]
_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


# ---------------------------------------------------------------------------- `run`


class CliRun(RunningBridge):
    """``python -m bridge run`` in its own process group, with what these tests read of its log."""

    def __init__(self, port: int, args: list[str], env: dict[str, str]) -> None:
        super().__init__(*args, env=env, new_session=True)
        self.port = port

    def broker_pid(self) -> int:
        found = re.search(r"local broker: Mosquitto \(pid (\d+)\)", self.log)
        assert found, f"no Mosquitto child in the log:\n{self.log}"
        return int(found.group(1))

    def problems(self) -> list[str]:
        return [line for line in self.lines if _PROBLEM.search(line)]

    def end(self, sig: int = signal.SIGTERM, group: bool = False) -> int:
        return self.stop(sig, group=group)


@pytest.fixture
def run_tmp() -> Iterator[Path]:
    """The TMPDIR of ``run``: where its Mosquitto folder goes, for the test to look at.

    Open to others like /tmp (pytest's own folders are not): run as root, the bridge
    starts Mosquitto as the ``mosquitto`` account, which must reach its configuration.
    """
    folder = Path(tempfile.mkdtemp(prefix="test-local-broker-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def start_run(tmp_path: Path, run_tmp: Path, llama_server: str
              ) -> Iterator[Callable[..., CliRun]]:
    """Start ``run`` with the local broker of a kind on a free port; ended at teardown."""
    started: list[CliRun] = []

    def start(kind: str, port: int, *extra: str) -> CliRun:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(run_tmp))
        if kind == "amqtt":
            env[MOSQUITTO_ENV] = "none"  # as on a machine without Mosquitto
        else:
            env.pop(MOSQUITTO_ENV, None)
            require_mosquitto()
        run = CliRun(port, ["--mqtt-port", str(port), "--llama-url", llama_server,
                      "--bridge-id", "run-test", "--sessions-db", str(tmp_path / "s.db"),
                      *extra], env)
        started.append(run)
        return run

    yield start
    for run in started:
        run.end(signal.SIGKILL)
    for port in {run.port for run in started}:  # a failed test leaves no broker behind
        for pid in broker_processes(port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _watch_status(port: int) -> Device:
    """A dashboard on llm/status/+: the filter that made amqtt leak the status."""
    watcher = Device.bare("127.0.0.1", port, "dashboard").connect()
    assert watcher.subscribe("llm/status/+") == [1]
    msg = watcher.messages.get(timeout=TIMEOUT)
    assert msg.topic == "llm/status/run-test" and msg.retain, msg.topic
    return watcher


@pytest.mark.parametrize("kind", KINDS)
def test_devices_see_only_their_own_topics_and_the_start_is_clean(
        kind: str, start_run: Callable[..., CliRun], run_tmp: Path) -> None:
    port = free_port()
    run = start_run(kind, port)
    run.wait_ready()
    assert f"local broker: {'Mosquitto' if kind == 'mosquitto' else 'amqtt'} " in run.log
    # Connected with the broker's own protocol at once: no MQTT 5 probe first.
    assert f"connected to MQTT broker (MQTT {PROTOCOL[kind]}," in run.log, run.log
    assert "trying MQTT 3.1.1" not in run.log, run.log

    watcher = _watch_status(port)
    devices = []
    for index, topic_filter in enumerate(["llm/reply/kitchen/#", "foo/bar/#", "nothing/here"]):
        device = Device.bare("127.0.0.1", port, f"dev-{index}").connect()
        devices.append(device)
        assert device.subscribe(topic_filter) == [1]
        assert device.received_before_marker() == [], f"{topic_filter} got foreign messages"

    settings = MqttSettings(host="127.0.0.1", port=port, protocol="3.1.1")
    with BridgeClient(settings, client="kitchen") as kitchen:
        msgs = list(kitchen.ask({"prompt": "Hello", "max_tokens": 8}, idle_timeout=60))
    check_reply_stream(msgs)
    assert msgs[-1].type == "done"

    for device in [watcher, *devices]:
        assert device.drops == 0 and len(device.connacks) == 1
        device.close()
    pid = run.broker_pid() if kind == "mosquitto" else None
    if pid is not None:
        assert broker_processes(port) == [pid]
        assert len(list(run_tmp.glob(FOLDER_GLOB))) == 1
    assert run.end() == 0
    assert run.problems() == [], run.log
    # The broker stopped with the bridge, before it exited, and left no folder behind.
    assert broker_processes(port) == []
    assert list(run_tmp.glob(FOLDER_GLOB)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_twenty_devices_connect_at_once(kind: str, start_run: Callable[..., CliRun]) -> None:
    port = free_port()
    run = start_run(kind, port)
    run.wait_ready()
    watcher = _watch_status(port)  # what made amqtt fail connects that met a SUBSCRIBE
    devices = [Device.bare("127.0.0.1", port, f"dev-{i}") for i in range(20)]
    together = threading.Barrier(len(devices))
    errors: list[BaseException] = []

    def join(device: Device) -> None:
        try:
            together.wait(TIMEOUT)
            device.connect()
            assert device.subscribe(f"llm/reply/{device.name}/#") == [1]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(d,)) for d in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    assert errors == [], errors
    for device in devices:
        # Still on its first connection, with its subscription: a dropped connection
        # (paho reconnects with a clean session) loses the marker's subscription.
        assert device.received_before_marker() == []
        assert (len(device.connacks), device.drops) == (1, 0), device.name
        device.close()
    watcher.close()
    assert run.end() == 0
    assert run.problems() == [], run.log


def test_ctrl_c_stops_the_bridge_then_its_mosquitto(start_run: Callable[..., CliRun]) -> None:
    port = free_port()
    run = start_run("mosquitto", port, "--log-level", "DEBUG")  # Mosquitto's lines too
    run.wait_ready()
    pid = run.broker_pid()
    watcher = _watch_status(port)
    # A terminal's Ctrl-C signals the whole foreground process group: the broker runs in
    # its own session, so it outlives the bridge's goodbye and stops after it.
    assert run.end(signal.SIGINT, group=True) == 0
    payloads = []
    while not payloads or b'"offline"' not in payloads[-1]:
        try:
            payloads.append(watcher.messages.get(timeout=TIMEOUT).payload)
        except queue.Empty:
            raise AssertionError(f"no offline status, only {payloads}") from None
    assert b'"shutdown"' in payloads[-1], payloads[-1]
    watcher.close()
    assert run.problems() == [], run.log
    order = [line for line in run.lines
             if "bridge run-test stopped" in line or re.search(r"mosquitto: .* terminating", line)]
    assert len(order) == 2 and "bridge run-test stopped" in order[0], run.log
    assert broker_processes(port) == [], f"mosquitto {pid} outlived the bridge"


def test_a_killed_bridge_takes_its_mosquitto_along(start_run: Callable[..., CliRun]) -> None:
    port = free_port()
    run = start_run("mosquitto", port)
    run.wait_ready()
    pid = run.broker_pid()
    assert broker_processes(port) == [pid]
    run.end(signal.SIGKILL)  # no clean-up runs in the bridge
    left = poll_until(lambda: broker_processes(port), lambda pids: pids == [], TIMEOUT, 0.05)
    assert left == [], f"mosquitto {pid} outlived the killed bridge"
    # Nothing removes the folder of a killed bridge; what matters is that the port is free.
    again = start_run("mosquitto", port)
    again.wait_ready()
    assert again.end() == 0
