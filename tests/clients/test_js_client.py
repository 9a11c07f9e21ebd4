"""The JavaScript client (clients/js): its Node tests, run by Node's own test runner.

``node --test`` runs every file in ``clients/js/test/``: the pure ones (protocol logic,
backoff, the client on an MQTT.js double and a fake clock) and ``bridge.test.js``, which
needs a real bridge, Mosquitto and llama.cpp. This module starts those and hands their
addresses to the Node tests in environment variables (``LLMB_MQTT_URL``, ``LLMB_PREFIX``,
``LLMB_HEARTBEAT_S``, ``LLMB_BRIDGE_ID``); the Node tests skip without them, and a skip
fails here. The TAP summary must count every ``test(`` of the test files as passed.

A missing ``node`` or MQTT.js fails (never skips) with what to install.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge.protocol.packet import packet_bytes
from tests.support.bridge_proc import running_bridge
from tests.support.processes import MosquittoProcess

JS_DIR = Path(__file__).resolve().parents[2] / "clients" / "js"
NODE_TIMEOUT_S = 540.0
"""The whole Node run: about 20 s on a quiet machine, minutes when llama.cpp shares two
cores with other test runs (it then makes a token or two a second)."""
HEARTBEAT_S = 0.5  # short, so heartbeats and resends happen within a test
BRIDGE_ID = "js-client-bridge"


def _node() -> str:
    """The ``node`` binary with MQTT.js installed for the client; fails with what to do."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; the JavaScript client's tests need it and do not "
                    "skip. Install it with: apt-get install -y nodejs npm", pytrace=False)
    if not (JS_DIR / "node_modules" / "mqtt" / "package.json").is_file():
        pytest.fail("MQTT.js is not installed for clients/js; run: npm ci --prefix clients/js",
                    pytrace=False)
    return node


def _expected_tests() -> int:
    """How many top-level ``test(`` calls the Node test files hold."""
    files = sorted((JS_DIR / "test").glob("*.test.js"))
    assert files, "no Node test files in clients/js/test"
    return sum(len(re.findall(r"^test\(", f.read_text(), re.MULTILINE)) for f in files)


def _summary(tap: str) -> dict[str, int]:
    """The counts of the TAP summary (``# pass 12`` ...)."""
    return {key: int(value) for key, value in re.findall(r"^# (\w+) (\d+)$", tap, re.MULTILINE)}


@pytest.mark.timeout(NODE_TIMEOUT_S + 60)
def test_node_tests_pass_against_the_real_bridge(mosquitto: MosquittoProcess,
                                                 llama_server: str) -> None:
    node = _node()
    expected = _expected_tests()
    env = {
        **os.environ,
        "LLMB_MQTT_URL": f"mqtt://{mosquitto.host}:{mosquitto.port}",
        "LLMB_PREFIX": "llm",
        "LLMB_HEARTBEAT_S": str(HEARTBEAT_S),
        "LLMB_BRIDGE_ID": BRIDGE_ID,
    }
    # max_tokens_cap 1000: the cancel test needs an answer long enough to be stopped.
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server], protocol="5",
                        heartbeat_s=HEARTBEAT_S, max_tokens_cap=1000, bridge_id=BRIDGE_ID):
        done = subprocess.run([node, "--test", "--test-reporter=tap", "test/"], cwd=JS_DIR,
                              env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT_S,
                              check=False)
    report = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    counts = _summary(done.stdout)
    assert done.returncode == 0, report
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, report
    assert counts.get("skipped") == 0 and counts.get("todo") == 0, report
    assert counts.get("tests") == counts.get("pass") == expected > 0, (counts, expected, report)


def test_packet_bytes_counts_like_the_bridge() -> None:
    node = _node()
    rng = random.Random(16)
    topics = ["llm/reply/a/b", "llm/reply/dash-1/q1", "llm/reply/k/été", "llm/reply/k/😀",
              "p/reply/" + "c" * 64 + "/" + "i" * 64]
    cases: list[tuple[str, int, int | None]] = []
    for topic in topics:
        for length in (0, 1, 127, 16_300, 16_400, 2_097_100, 2_097_200,
                       *(rng.randrange(0, 70_000) for _ in range(20))):
            cases.append((topic, length, rng.choice([None, 0, 3, 256])))
    script = ("import { packetBytes } from './packet.js';\n"
              "const cases = JSON.parse(process.argv[1]);\n"
              "console.log(JSON.stringify(cases.map(([t, n, c]) => packetBytes(t, n, c))));\n")
    done = subprocess.run([node, "--input-type=module", "-e", script, json.dumps(cases)],
                          cwd=JS_DIR, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    want = [packet_bytes(t, n, None if c is None else b"x" * c) for t, n, c in cases]
    assert got == want
