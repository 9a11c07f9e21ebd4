"""The C client (clients/c): its unit tests and fuzz loop under AddressSanitizer and
UndefinedBehaviorSanitizer, its Arduino and ESP-IDF examples built on this machine
against stub headers, and its Linux example end to end against the real bridge.

Everything is built by ``make -C clients/c BUILD=<tmp>``: nothing is written into the
source tree. A missing compiler or libmosquitto-dev fails the tests with the package to
install (CI installs them in .ci/run); nothing is skipped.

End to end, the Linux example (``ask``, libmosquitto) asks the real bridge (real
Mosquitto, real llama.cpp) with ``max_packet`` 256, a 32-character client name and a
32-character id, while a paho subscriber on the same reply topic (subscribed before the
request) records every message; the example's stdout must be exactly the text of that
subscriber's ``chunk`` messages in ``seq`` order.
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.bridge_proc import running_bridge
from tests.support.processes import MosquittoProcess
from tests.support.recorder import Recorder, check_reply_stream, text_of
from tests.support.waiting import LOOPBACK_TIMEOUT, REPLY_TIMEOUT

C_DIR = Path(__file__).resolve().parents[2] / "clients" / "c"
MAKE_TIMEOUT = 300.0  # compiling with sanitizers on a loaded 2-core machine
FUZZ_CASES = 100_000
CLIENT = "c-client-0123456789abcdefghijklm"  # 32 characters, the device
MAX_PACKET = 256  # PubSubClient's default buffer
PROMPT = "Write one sentence about the sea."

assert len(CLIENT) == 32


def _request_id(tag: str) -> str:
    """A fresh 32-character request id."""
    return f"{tag}-{secrets.token_hex(16)}"[:32]


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed; the C client's tests need it and do not "
                    f"skip. Install it with: apt-get install -y {package}", pytrace=False)


def _require_libmosquitto() -> None:
    probe = subprocess.run(["gcc", "-E", "-x", "c", "-", "-o", "/dev/null"],
                           input="#include <mosquitto.h>\n", capture_output=True, text=True,
                           timeout=60, check=False)
    if probe.returncode != 0:
        pytest.fail("libmosquitto's headers are missing (mosquitto.h); the Linux example "
                    "needs them. Install them with: apt-get install -y libmosquitto-dev",
                    pytrace=False)


def _make(build: Path, *targets: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """``make -C clients/c BUILD=build [VAR=value ...] targets``, bounded in time."""
    command = ["make", "-C", str(C_DIR), f"BUILD={build}",
               *(f"{name}={value}" for name, value in variables.items()), *targets]
    return subprocess.run(command, capture_output=True, text=True, timeout=MAKE_TIMEOUT,
                          check=False)


def _output(result: subprocess.CompletedProcess[Any]) -> str:
    out, err = result.stdout, result.stderr
    if isinstance(out, bytes):
        out, err = out.decode(errors="replace"), err.decode(errors="replace")
    return f"exit {result.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build folder for the module (make reuses what an earlier test built)."""
    _require("make", "make")
    _require("gcc", "gcc")
    return tmp_path_factory.mktemp("c-client-build")


@pytest.fixture(scope="module")
def ask_binary(build_dir: Path) -> Path:
    """The Linux example, built with libmosquitto."""
    _require_libmosquitto()
    result = _make(build_dir, "example")
    assert result.returncode == 0, _output(result)
    binary = build_dir / "ask"
    assert binary.is_file()
    return binary


def test_unit_tests_pass_under_sanitizers(build_dir: Path) -> None:
    result = _make(build_dir, "test")
    assert result.returncode == 0, _output(result)
    # built with both sanitizers, and strict C99 with warnings as errors
    assert "-fsanitize=address,undefined" in result.stdout
    assert "-std=c99 -Wall -Wextra -Werror" in result.stdout
    # two runs: the default text buffer and a tiny one (text in many pieces)
    counts = re.findall(r"^(\d+) tests, (\d+) checks passed$", result.stdout, re.MULTILINE)
    assert len(counts) == 2, _output(result)
    for tests, checks in counts:
        assert int(tests) >= 40 and int(checks) >= 500, counts


def test_fuzz_loop_finds_nothing(build_dir: Path) -> None:
    result = _make(build_dir, "fuzz", FUZZ_CASES=str(FUZZ_CASES))
    assert result.returncode == 0, _output(result)
    assert "-fsanitize=address,undefined" in result.stdout
    found = re.search(r"fuzz: (\d+) mutated or random payloads, (\d+) payloads in all .*"
                      r" (\d+) failures$", result.stdout, re.MULTILINE)
    assert found, _output(result)
    hostile, total, failures = (int(found.group(i)) for i in (1, 2, 3))
    assert hostile >= FUZZ_CASES and total > hostile
    assert failures == 0


def test_arduino_and_espidf_examples_build_and_run_on_host(build_dir: Path) -> None:
    """Both examples compile (-Wall -Wextra -Werror) against the stub headers of the APIs
    they use, and, run against the fakes, print the canned answer whole: for the ESP-IDF
    example that answer arrives in pieces that it must put back together."""
    _require("g++", "g++")
    result = _make(build_dir, "examples-host")
    assert result.returncode == 0, _output(result)
    assert "g++ -std=c++11 -Wall -Wextra -Werror" in result.stdout
    assert "-std=gnu17 -Wall -Wextra -Werror" in result.stdout
    assert ("The sky looks blue because air scatters blue light. Über 🌊\n"
            "[done: stop, 20 tokens]\n") in result.stdout
    assert ("The sky looks blue because the air scatters blue light more than red light, "
            "said Rayleigh. Über 🌊\n") in result.stdout
    assert "stub: the sketch printed the answer and its end" in result.stdout
    assert "stub: the example printed the answer and logged its end" in result.stdout


def _ask(binary: Path, broker: MosquittoProcess, request_id: str, *extra: str,
         qos: int = 1, protocol: str = "311") -> subprocess.CompletedProcess[bytes]:
    command = [str(binary), "-h", broker.host, "-p", str(broker.port), "-c", CLIENT,
               "-q", str(qos), "-m", str(MAX_PACKET), "-i", request_id, "-V", protocol,
               *extra, PROMPT]
    return subprocess.run(command, capture_output=True, timeout=REPLY_TIMEOUT, check=False)


@pytest.mark.parametrize(("qos", "protocol"), [(0, "311"), (1, "5")])
def test_linux_example_prints_the_text_python_receives(
    mosquitto: MosquittoProcess, llama_server: str, ask_binary: Path, qos: int,
    protocol: str,
) -> None:
    request_id = _request_id(f"q{qos}")
    topic = f"llm/reply/{CLIENT}/{request_id}"
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server]):
        watcher = Recorder(mosquitto.host, mosquitto.port, v5=protocol == "5",
                           topic_filter=f"llm/reply/{CLIENT}/#")
        try:
            result = _ask(ask_binary, mosquitto, request_id, "-n", "32", "-t", "0",
                          "-s", "42", qos=qos, protocol=protocol)
            received = watcher.wait_terminal(topic, LOOPBACK_TIMEOUT)
        finally:
            watcher.close()
    assert result.returncode == 0, _output(result)
    by_seq: dict[int, Any] = {}
    for message in received:  # QoS 1 may deliver a message twice
        by_seq.setdefault(message.seq, message)
    messages = [by_seq[seq] for seq in sorted(by_seq)]
    check_reply_stream(messages)
    assert messages[-1].type == "done"
    text = text_of(messages)
    assert text, "the model's answer was empty: nothing to compare"
    assert result.stdout.decode("utf-8") == text
    assert b"exceeds max_packet" not in result.stderr, _output(result)  # every message fit


def test_linux_example_reports_an_error_reply(
    mosquitto: MosquittoProcess, llama_server: str, ask_binary: Path
) -> None:
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server]):
        result = _ask(ask_binary, mosquitto, _request_id("err"), "-t", "99")
    assert result.returncode == 1, _output(result)  # 1: an error the bridge sent
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert "bridge error bad_request" in stderr, stderr
    assert "temperature" in stderr, stderr


def test_linux_example_without_a_broker_fails_at_once(ask_binary: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [str(ask_binary), "-h", "127.0.0.1", "-p", str(port), "-c", CLIENT, "hello"],
        capture_output=True, timeout=LOOPBACK_TIMEOUT * 3, check=False)
    assert result.returncode == 4, _output(result)  # 4: the broker cannot be reached
    assert b"cannot connect to 127.0.0.1" in result.stderr
