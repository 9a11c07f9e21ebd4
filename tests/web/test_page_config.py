"""What the page's ``config.json`` says for each way of running the bridge, and the
``[web]`` settings and flags that decide it. Pure unit tests: nothing is started."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import cli
from bridge.config.settings import load_config
from bridge.web.page import page_config, warn_if_unreachable


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("BRIDGE_"):
            monkeypatch.delenv(name)


def local(kind: str, ws_port: int | None = 9100) -> Any:
    """A started local broker as ``run`` sees it."""
    return SimpleNamespace(kind=kind, protocol={"mosquitto": "5", "amqtt": "3.1.1"}[kind],
                           host="127.0.0.1", port=1883, ws_port=ws_port,
                           ws_account=("web", "s3cret") if kind == "mosquitto" else None)


def test_local_mosquitto_gives_its_listener_and_account() -> None:
    cfg = load_config(web={"port": 8080}, prefix="home/llm", heartbeat_s=2.5)
    assert page_config(cfg, local("mosquitto")) == {
        "mqtt_url": "ws://127.0.0.1:9100", "prefix": "home/llm", "heartbeat_s": 2.5,
        "protocol_version": 5, "username": "web", "password": "s3cret"}


def test_local_amqtt_speaks_3_1_1_and_needs_no_account() -> None:
    cfg = load_config(web={"port": 8080})
    assert page_config(cfg, local("amqtt")) == {
        "mqtt_url": "ws://127.0.0.1:9100", "prefix": "llm", "heartbeat_s": 5.0,
        "protocol_version": 4}


def test_your_own_broker_never_gives_the_bridges_account() -> None:
    cfg = load_config(web={"port": 8080, "mqtt_url": "wss://broker.lan/mqtt"},
                      mqtt={"host": "broker.lan", "username": "bridge@1", "password": "pw"})
    config = page_config(cfg, None)
    assert config == {"mqtt_url": "wss://broker.lan/mqtt", "prefix": "llm",
                      "heartbeat_s": 5.0, "protocol_version": None}
    assert "pw" not in repr(config) and "bridge@1" not in repr(config)
    chosen = load_config(web={"port": 8080}, mqtt={"host": "b", "protocol": "3.1.1"})
    assert page_config(chosen, None)["protocol_version"] == 4
    # A URL given for the local broker (e.g. behind a proxy) wins, without the account.
    proxied = load_config(web={"port": 8080, "mqtt_url": "wss://gw.lan/mqtt"})
    assert "password" not in page_config(proxied, local("mosquitto"))


def test_warnings_say_when_a_browser_cannot_connect(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.web")
    caplog.set_level(logging.WARNING, "test.web")
    own = load_config(web={"port": 8080}, mqtt={"host": "broker.lan"})
    warn_if_unreachable(own, page_config(own, None), log)
    lan = load_config(web={"port": 8080, "host": "0.0.0.0"})
    warn_if_unreachable(lan, page_config(lan, local("mosquitto")), log)
    quiet = load_config(web={"port": 8080})
    warn_if_unreachable(quiet, page_config(quiet, local("mosquitto")), log)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "--web-mqtt-url" in messages[0]
    assert "served on 0.0.0.0" in messages[1] and "only a browser on this machine" in messages[1]


def test_flags_environment_and_file_reach_the_web_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = cli.build_parser().parse_args(
        ["run", "--web-port", "8080", "--web-host", "::1", "--web-mqtt-url",
         "ws://gw:9001", "--ws-port", "9100"])
    web = cli._config(args).web
    assert (web.port, web.host, web.mqtt_url, web.ws_port) == (8080, "::1", "ws://gw:9001", 9100)
    monkeypatch.setenv("BRIDGE_WEB__PORT", "8181")
    conf = tmp_path / "b.toml"
    conf.write_text('[web]\nport = 8282\nhost = "127.0.0.2"\n')
    cfg = load_config(conf)
    assert (cfg.web.port, cfg.web.host) == (8181, "127.0.0.2")  # environment over file
    monkeypatch.delenv("BRIDGE_WEB__PORT")
    assert load_config().web.port is None  # off by default


@pytest.mark.parametrize(("flags", "says"), [
    (["--web-mqtt-url", "http://broker:9001"], "must be a WebSocket URL"),
    (["--web-mqtt-url", "ws://"], "must be a WebSocket URL"),
    (["--web-port", "0"], "web.port"),
    (["--ws-port", "70000"], "web.ws_port"),
])
def test_bad_web_settings_are_configuration_errors(
        flags: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", *flags]) == cli.EXIT_USAGE
    assert says in capsys.readouterr().err
