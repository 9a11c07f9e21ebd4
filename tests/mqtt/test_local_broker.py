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
import fcntl
import os
import queue
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config.settings import MqttSettings
from bridge.mqtt.brokers.mosquitto import (
    MOSQUITTO_ENV,
    find_binary,
)
from bridge.mqtt.device import BridgeClient
from tests.support.cli_proc import RunningBridge
from tests.support.processes import free_port
from tests.support.recorder import check_reply_stream
from tests.support.waiting import poll_until

TIMEOUT = 10.0  # anything on loopback
KINDS = ["mosquitto", "amqtt"]
PROTOCOL = {"mosquitto": "5", "amqtt": "3.1.1"}
FOLDER_GLOB = "llamacpp-mqtt-bridge-mosquitto-*"
_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


def _mosquitto() -> str:
    binary = find_binary("mosquitto")
    if binary is None:
        pytest.fail("mosquitto is not installed; the test suite needs it and does not skip. "
                    "Install it with: apt-get install -y mosquitto", pytrace=False)
    return binary


def _broker_processes(port: int) -> list[int]:
    """Pids of Mosquitto processes running a configuration generated for ``port``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # it ended while we looked
        if f"llamacpp-mqtt-bridge-mosquitto-{port}-" in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _non_loopback_ipv4() -> list[str]:
    """This machine's IPv4 addresses other than loopback (Linux ioctl SIOCGIFADDR)."""
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue  # no IPv4 address on this interface
        address = socket.inet_ntoa(packed[20:24])
        if not address.startswith("127."):
            found.append(address)
    return found


# ---------------------------------------------------------------------------- a device


class Device:
    """A paho 3.1.1 client (as on a microcontroller) that counts its connects and drops."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connacks: list[Any] = []
        self.drops = 0
        self._acks: queue.Queue[Any] = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name,
                             protocol=mqtt.MQTTv311)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: (self.connacks.append(rc),
                                                        self._acks.put(rc))
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = lambda _c, _u, _m, codes, _p: self._acks.put(codes)
        self.c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.port = port

    def _on_disconnect(self, *_: Any) -> None:
        self.drops += 1

    def connect(self) -> Device:
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        rc = self._acks.get(timeout=TIMEOUT)
        assert not rc.is_failure, f"{self.name}: refused: {rc}"
        return self

    def subscribe(self, *filters: str) -> None:
        self.c.subscribe([(f, 1) for f in filters])
        codes = self._acks.get(timeout=TIMEOUT)
        assert [getattr(c, "value", c) for c in codes] == [1] * len(filters), codes

    def received_before_marker(self) -> list[str]:
        """Publish a marker to itself; the topics of everything that came before it."""
        marker = f"marker/{self.name}/{uuid.uuid4().hex[:6]}"
        self.subscribe(marker)
        self.c.publish(marker, b"m", qos=1).wait_for_publish(TIMEOUT)
        before = []
        while True:
            try:
                msg = self.messages.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"{self.name}: marker never came back "
                                     f"(before it: {before}, drops: {self.drops})") from None
            if msg.topic == marker:
                return before
            before.append(msg.topic)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


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
            _mosquitto()
        run = CliRun(port, ["--mqtt-port", str(port), "--llama-url", llama_server,
                      "--bridge-id", "run-test", "--sessions-db", str(tmp_path / "s.db"),
                      *extra], env)
        started.append(run)
        return run

    yield start
    for run in started:
        run.end(signal.SIGKILL)
    for port in {run.port for run in started}:  # a failed test leaves no broker behind
        for pid in _broker_processes(port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _watch_status(port: int) -> Device:
    """A dashboard on llm/status/+: the filter that made amqtt leak the status."""
    watcher = Device(port, "dashboard").connect()
    watcher.subscribe("llm/status/+")
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
        device = Device(port, f"dev-{index}").connect()
        devices.append(device)
        device.subscribe(topic_filter)
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
        assert _broker_processes(port) == [pid]
        assert len(list(run_tmp.glob(FOLDER_GLOB))) == 1
    assert run.end() == 0
    assert run.problems() == [], run.log
    # The broker stopped with the bridge, before it exited, and left no folder behind.
    assert _broker_processes(port) == []
    assert list(run_tmp.glob(FOLDER_GLOB)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_twenty_devices_connect_at_once(kind: str, start_run: Callable[..., CliRun]) -> None:
    port = free_port()
    run = start_run(kind, port)
    run.wait_ready()
    watcher = _watch_status(port)  # what made amqtt fail connects that met a SUBSCRIBE
    devices = [Device(port, f"dev-{i}") for i in range(20)]
    together = threading.Barrier(len(devices))
    errors: list[BaseException] = []

    def join(device: Device) -> None:
        try:
            together.wait(TIMEOUT)
            device.connect()
            device.subscribe(f"llm/reply/{device.name}/#")
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
    assert _broker_processes(port) == [], f"mosquitto {pid} outlived the bridge"


def test_a_killed_bridge_takes_its_mosquitto_along(start_run: Callable[..., CliRun]) -> None:
    port = free_port()
    run = start_run("mosquitto", port)
    run.wait_ready()
    pid = run.broker_pid()
    assert _broker_processes(port) == [pid]
    run.end(signal.SIGKILL)  # no clean-up runs in the bridge
    left = poll_until(lambda: _broker_processes(port), lambda pids: pids == [], TIMEOUT, 0.05)
    assert left == [], f"mosquitto {pid} outlived the killed bridge"
    # Nothing removes the folder of a killed bridge; what matters is that the port is free.
    again = start_run("mosquitto", port)
    again.wait_ready()
    assert again.end() == 0
