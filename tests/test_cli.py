"""The command line as a user runs it (README quick start): real processes, real sockets.

``run`` with no ``--mqtt-host`` starts a local broker (Mosquitto, installed here) and,
with no ``--llama-url``, an embedded llama.cpp: exactly the quick-start path. The local
broker itself is tested in ``tests/mqtt/test_local_broker.py``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli_proc import ROOT, RunningBridge
from tests.support.cli_proc import cli as _cli
from tests.support.processes import free_port


@pytest.fixture
def embedded_bridge(tmp_path: Path) -> Iterator[tuple[RunningBridge, int]]:
    """The quick-start bridge: embedded broker on a free port, embedded llama.cpp."""
    port = free_port()
    bridge = RunningBridge("--mqtt-port", str(port), "--bridge-id", "cli-test",
                           "--sessions-db", str(tmp_path / "s.db"))
    try:
        bridge.wait_ready()
        yield bridge, port
    finally:
        bridge.stop()


def test_run_ask_status_on_embedded_defaults(embedded_bridge: tuple[RunningBridge, int]) -> None:
    bridge, port = embedded_bridge
    ask = subprocess.run(_cli("ask", "Say hello.", "--mqtt-port", str(port), "--max-tokens", "16",
                              "--temperature", "0"),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ask.returncode == 0, ask.stderr
    assert ask.stdout.strip(), "no answer text printed"
    assert "tokens, first token" in ask.stderr and "tokens/s" in ask.stderr, ask.stderr

    status = subprocess.run(_cli("status", "--mqtt-port", str(port)), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "llm/status/cli-test: online" in status.stdout, status.stdout
    assert "backend-1 ok (" in status.stdout  # the backend is healthy, shown by its name
    assert "http://" not in status.stdout  # never by its URL

    assert bridge.stop() == 0
    log = "".join(bridge.lines)
    assert "outcome=done" in log, log
    assert "Traceback" not in log, log


def test_ask_reports_errors_with_exit_codes(embedded_bridge: tuple[RunningBridge, int]) -> None:
    _, port = embedded_bridge
    bad = subprocess.run(_cli("ask", "x", "--mqtt-port", str(port), "--chunk-bytes", "1",
                              "--max-tokens", "0"),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad
    assert "error [bad_request]" in bad.stderr and "max_tokens" in bad.stderr, bad.stderr


def test_ask_max_packet_is_sent_and_a_too_small_one_names_the_minimum(
        embedded_bridge: tuple[RunningBridge, int]) -> None:
    _, port = embedded_bridge
    small = subprocess.run(_cli("ask", "Say hi.", "--mqtt-port", str(port), "--client", "tiny",
                                "--max-packet", "200", "--max-tokens", "8", "--json"),
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert small.returncode == 0, small.stderr
    messages = [json.loads(line) for line in small.stdout.splitlines()]
    done = messages[-1]
    assert done["type"] == "done" and "tokens_per_s" not in done.get("timings", {}), done
    refused = subprocess.run(_cli("ask", "x", "--mqtt-port", str(port), "--client", "tiny",
                                  "--max-packet", "166"),  # 167 needed with a 12-char id
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused
    assert "error [bad_request]" in refused.stderr and "max_packet>=" in refused.stderr
    # so small that only the smallest error fits: the CLI says why there is no message
    tiny = subprocess.run(_cli("ask", "x", "--mqtt-port", str(port), "--client", "tiny",
                               "--max-packet", "120"),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert tiny.returncode == 1, tiny
    assert "error [bad_request]: (no message: it did not fit max_packet)" in tiny.stderr


def test_ask_into_a_closed_pipe_stops_quietly(
        embedded_bridge: tuple[RunningBridge, int]) -> None:
    _, port = embedded_bridge
    command = shlex.join(_cli("ask", "Count to fifty.", "--mqtt-port", str(port), "--json",
                            "--max-tokens", "48", "--chunk-bytes", "128"))
    piped = subprocess.run(["bash", "-o", "pipefail", "-c", f"{command} | head -n 1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert json.loads(piped.stdout)["type"] == "start"
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr


def test_ask_without_a_bridge_says_so() -> None:
    port = free_port()  # nothing listens there
    result = subprocess.run(_cli("ask", "hi", "--mqtt-port", str(port)), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert f"127.0.0.1:{port}" in result.stderr


def test_bad_configuration_exits_2_without_starting(tmp_path: Path) -> None:
    conf = tmp_path / "bridge.toml"
    conf.write_text("chunk_bytes = 5\n")
    result = subprocess.run(_cli("run", "--config", str(conf)), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "chunk_bytes" in result.stderr


def test_embedded_broker_port_taken_is_a_clear_error(llama_server: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(_cli("run", "--mqtt-port", str(port), "--llama-url", llama_server),
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "already in use" in result.stderr and "--mqtt-host" in result.stderr


@pytest.mark.parametrize("entry", [["-m", "bridge"], ["llamacpp_mqtt_deploy.py"]])
def test_entry_points_show_help(entry: list[str]) -> None:
    result = subprocess.run([sys.executable, *entry, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for command in ("run", "ask", "status"):
        assert command in result.stdout


def test_deploy_script_reexports_the_client_and_config() -> None:
    result = subprocess.run(
        [sys.executable, "-c",
         "from llamacpp_mqtt_deploy import LlamaCppClient, DeploymentConfig; "
         "print(LlamaCppClient.__name__, DeploymentConfig().prefix)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LlamaCppClient", "llm"]
