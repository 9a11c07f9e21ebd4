"""The Mosquitto child of ``run`` on its own: configuration, failures, choice, protocol.

``tests/mqtt/test_local_broker.py`` tests it through ``run``; here are the cases that need no
bridge: the generated configuration listens on loopback only (tried on the machine's
other addresses, where it has one) with the shipped limits, a taken port or a failed
start leaves no process and no folder behind, and which broker and protocol ``run`` picks.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from bridge.config.settings import load_config
from bridge.mqtt.brokers.amqtt import EmbeddedBroker
from bridge.mqtt.brokers.local import (
    SHIPPED_LIMITS,
    EmbeddedMosquitto,
    LocalBrokerError,
    start_local_broker,
    use_local_broker,
)
from bridge.mqtt.brokers.mosquitto import (
    MOSQUITTO_ENV,
    MosquittoChild,
    MosquittoError,
    find_mosquitto,
)
from tests.support.local_broker import (
    FOLDER_GLOB,
    PROTOCOL,
    broker_processes,
    non_loopback_ipv4,
    require_mosquitto,
)
from tests.support.processes import MOSQUITTO_CONF, _Conf, free_port
from tests.support.waiting import LOOPBACK_TIMEOUT as TIMEOUT


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where EmbeddedMosquitto makes its folder, for this test only."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    return tmp_path


def test_generated_config_is_loopback_only_with_the_shipped_limits(temp_dir: Path) -> None:
    with EmbeddedMosquitto(require_mosquitto(), port=0) as broker:
        assert broker.folder is not None
        conf = (broker.folder / "mosquitto.conf").read_text()
        settings = [line.split(" ", 1) for line in conf.splitlines()
                    if line and not line.startswith("#")]
        assert [value for key, value in settings if key == "listener"] == [
            f"{broker.port} 127.0.0.1"]
        assert ["allow_anonymous", "true"] in settings
        for address in non_loopback_ipv4():  # where the machine has one, try it
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, broker.port), timeout=TIMEOUT).close()
        with socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT):
            pass
    shipped = dict(_Conf.read(MOSQUITTO_CONF).global_settings)
    assert {key: shipped[key] for key in SHIPPED_LIMITS} == SHIPPED_LIMITS
    for key, value in SHIPPED_LIMITS.items():
        assert [key, value] in settings


def test_a_taken_port_says_which_and_leaves_nothing(temp_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LocalBrokerError) as early:  # found before Mosquitto runs
            EmbeddedMosquitto(require_mosquitto(), port=port).start()
        # ... and when the port is taken after that check, Mosquitto's own failure.
        monkeypatch.setattr("bridge.mqtt.brokers.local.check_port_free", lambda host, port: None)
        with pytest.raises(LocalBrokerError) as late:
            EmbeddedMosquitto(require_mosquitto(), port=port).start()
    for error in (early.value, late.value):
        assert f"port {port} on 127.0.0.1 is already in use" in str(error)
        assert "--mqtt-port" in str(error) and "--mqtt-host" in str(error)
    assert broker_processes(port) == []
    assert list(temp_dir.glob(FOLDER_GLOB)) == []


@pytest.mark.parametrize("failure", [TimeoutError("no 'running' line"), KeyboardInterrupt()])
def test_a_failed_start_leaves_no_process(failure: BaseException, temp_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    wait_running = MosquittoChild._wait_running

    def fail_after_it_runs(self: MosquittoChild, timeout: float) -> None:
        wait_running(self, timeout)  # Mosquitto is up and listening ...
        assert self.pid is not None
        started.append(self.pid)
        raise failure  # ... and then the start fails (a timeout, or Ctrl-C)

    monkeypatch.setattr(MosquittoChild, "_wait_running", fail_after_it_runs)
    broker = EmbeddedMosquitto(require_mosquitto(), port=free_port())
    with pytest.raises((LocalBrokerError, KeyboardInterrupt)):
        broker.start()
    assert started and broker_processes(broker.port) == []
    assert list(temp_dir.glob(FOLDER_GLOB)) == []
    broker.stop()  # harmless after a failed start


def test_mosquitto_is_found_or_named_or_declined(tmp_path: Path) -> None:
    installed = require_mosquitto()
    assert find_mosquitto({}) == installed
    assert find_mosquitto({MOSQUITTO_ENV: installed}) == installed
    assert find_mosquitto({MOSQUITTO_ENV: "none"}) is None
    with pytest.raises(MosquittoError, match=MOSQUITTO_ENV):
        find_mosquitto({MOSQUITTO_ENV: str(tmp_path / "no-such-mosquitto")})


def test_the_local_broker_is_mosquitto_else_amqtt(temp_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    require_mosquitto()
    monkeypatch.delenv(MOSQUITTO_ENV, raising=False)
    broker = start_local_broker(0)
    try:
        assert (broker.kind, broker.protocol) == ("mosquitto", "5")
        assert isinstance(broker, EmbeddedMosquitto)
    finally:
        broker.stop()
    monkeypatch.setenv(MOSQUITTO_ENV, "none")
    broker = start_local_broker(0)
    try:
        assert (broker.kind, broker.protocol) == ("amqtt", "3.1.1")
        assert isinstance(broker, EmbeddedBroker)
    finally:
        broker.stop()


@pytest.mark.parametrize(("chosen", "kind", "used"), [
    (None, "mosquitto", "5"), (None, "amqtt", "3.1.1"), ("auto", "amqtt", "3.1.1"),
    ("3.1.1", "mosquitto", "3.1.1"), ("5", "amqtt", "5"),
])
def test_the_bridge_speaks_the_local_brokers_protocol_unless_told(
        chosen: str | None, kind: str, used: str) -> None:
    cfg = load_config(mqtt={"protocol": chosen, "port": 1884})
    broker = SimpleNamespace(kind=kind, protocol=PROTOCOL[kind], host="127.0.0.1", port=1884)
    bridge_cfg = use_local_broker(cfg, broker)  # type: ignore[arg-type]
    assert bridge_cfg.mqtt.protocol == used
    assert (bridge_cfg.mqtt.host, bridge_cfg.mqtt.port) == ("127.0.0.1", 1884)
    assert cfg.mqtt.host is None  # the loaded configuration is left as it was
