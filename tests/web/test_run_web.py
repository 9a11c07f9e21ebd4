"""``llamacpp-mqtt-bridge run --web-port``, as the README starts it: the page is served,
a real browser loads it, connects to the local broker over WebSockets and shows the
bridge from its retained status, with a clean console -- on Mosquitto and on amqtt.
And the README's static-server command serves the page with working types.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.mqtt.brokers.mosquitto import MOSQUITTO_ENV
from tests.support.browser import PHONE, Browser
from tests.support.cli_proc import RunningBridge, cli
from tests.support.local_broker import broker_processes, require_mosquitto
from tests.support.processes import REPO, free_port, wait_for_port
from tests.support.waiting import LOOPBACK_TIMEOUT

README = (REPO / "README.md").read_text(encoding="utf-8")
PNG = b"\x89PNG\r\n\x1a\n"


def readme_block(containing: str) -> str:
    """The one README ``sh`` block that contains ``containing``."""
    blocks = [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", README,
                                                re.MULTILINE | re.DOTALL)
              if lang == "sh" and containing in body]
    assert len(blocks) == 1, f"{len(blocks)} README sh blocks contain {containing!r}"
    return str(blocks[0])


def readme_run_flags(web_port: int) -> list[str]:
    """The flags of the README's ``run --web-port 8080``, on ``web_port`` instead."""
    line = readme_block("run --web-port 8080").split("#", 1)[0]
    words = shlex.split(line)
    assert words[:2] == [".venv/bin/llamacpp-mqtt-bridge", "run"], words
    return [str(web_port) if word == "8080" else word for word in words[2:]]


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=LOOPBACK_TIMEOUT) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, \
            response.read()


@pytest.fixture
def run_tmp() -> Iterator[Path]:
    """``run``'s TMPDIR, open to others like /tmp: started as root, its Mosquitto runs as
    the ``mosquitto`` account, which must reach the configuration folder made there."""
    folder = Path(tempfile.mkdtemp(prefix="test-web-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _env(kind: str, run_tmp: Path) -> dict[str, str]:
    env = dict(os.environ, TMPDIR=str(run_tmp))
    if kind == "amqtt":
        env[MOSQUITTO_ENV] = "none"  # as on a machine without Mosquitto
    else:
        require_mosquitto()
        env.pop(MOSQUITTO_ENV, None)
    return env


def _ready_line(bridge: RunningBridge) -> str:
    return next(line for line in bridge.lines if " ready: " in line)


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_the_page_connects_to_the_local_broker_and_shows_the_bridge(
        kind: str, browser: Browser, llama_server: str, run_tmp: Path, tmp_path: Path) -> None:
    web_port, mqtt_port = free_port(), free_port()
    bridge_id = f"web-{kind}"
    bridge = RunningBridge(*readme_run_flags(web_port), "--mqtt-port", str(mqtt_port),
                           "--llama-url", llama_server, "--bridge-id", bridge_id,
                           "--sessions-db", str(tmp_path / "s.db"), env=_env(kind, run_tmp))
    page = f"http://127.0.0.1:{web_port}/"
    try:
        bridge.wait_ready()
        assert _ready_line(bridge).rstrip().endswith(f"Web page: {page}"), bridge.log
        bridge.wait_line(f"web page: {page} (MQTT over WebSockets: ws://127.0.0.1:")

        status, headers, body = get(page + "config.json")
        config: dict[str, Any] = json.loads(body)
        assert (status, headers["content-type"]) == (200, "application/json")
        found = re.fullmatch(r"ws://127\.0\.0\.1:(\d+)", config["mqtt_url"])
        assert found is not None and int(found.group(1)) != mqtt_port, config
        assert (config["prefix"], config["heartbeat_s"]) == ("llm", 5.0)
        if kind == "mosquitto":
            assert config["protocol_version"] == 5
            assert config["username"] == "web" and len(config["password"]) >= 20
        else:
            assert config["protocol_version"] == 4
            assert "username" not in config and "password" not in config

        browser.open(page)
        browser.wait(lambda _: browser.text("#connection") == "connected",
                     message="the page connected")
        item = f'li[data-bridge="{bridge_id}"]'
        browser.wait(lambda _: browser.text(f"{item} .bridge-state") == "online",
                     message=f"{bridge_id} online in the grid")
        assert browser.text(f"{item} .bridge-name") == bridge_id
        assert browser.text("#broker") == config["mqtt_url"]
        shot = browser.screenshot(tmp_path / f"desktop-{kind}.png")
        assert shot.read_bytes().startswith(PNG)
        browser.size(PHONE)
        assert browser.driver.execute_script("return window.innerWidth") == PHONE[0]
        assert browser.screenshot(tmp_path / f"phone-{kind}.png").read_bytes().startswith(PNG)
        browser.assert_no_console_errors()
    finally:
        code = bridge.stop()
        for pid in broker_processes(mqtt_port):  # a failed test leaves no broker behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 0, bridge.log
    assert "Traceback" not in bridge.log
    with socket.socket() as probe:  # the page's port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", web_port))


def test_a_taken_web_port_stops_run_at_once_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # No broker or llama.cpp is started: the page's port is checked first.
        done = subprocess.run(
            cli("run", "--web-port", str(port), "--mqtt-host", "127.0.0.1", "--mqtt-port",
                str(free_port()), "--llama-url", "http://127.0.0.1:9"),
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert (f"cannot serve the web page: port {port} on 127.0.0.1 is already in use; "
            "pick a free one with --web-port") in done.stderr


def test_the_readme_static_server_serves_the_page_with_its_types() -> None:
    port = free_port()
    command = readme_block("http.server").strip()
    command = command.replace(".venv/bin/python", shlex.quote(sys.executable))
    command = command.replace("http.server 8000", f"http.server {port}")
    env = dict(os.environ, PYTHONPATH=str(REPO))  # the package of this checkout
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, LOOPBACK_TIMEOUT, proc)
        base = f"http://127.0.0.1:{port}/"
        status, headers, body = get(base)
        assert status == 200 and b'<script type="importmap">' in body
        for path in ("app.js", "vendor/mqtt.esm.js"):
            status, headers, _ = get(base + path)
            # Any JavaScript type runs a module; Python's comes from /etc/mime.types.
            assert headers["content-type"].split(";")[0] in ("text/javascript",
                                                              "application/javascript")
        status, _, body = get(base + "config.json")
        assert json.loads(body)["mqtt_url"] is None  # the shipped file: the page asks
    finally:
        proc.terminate()
        proc.wait(10)
