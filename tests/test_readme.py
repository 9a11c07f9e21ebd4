"""The README's examples, pasted as they are, against a bridge started as it says.

The bridge is ``llamacpp-mqtt-bridge run`` on embedded defaults (real llama.cpp with the
packaged Gemma 3 270M). The only change to a pasted command is the broker port: the
tests use a free one, not 1883 (``-p PORT`` for the Mosquitto tools, ``--mqtt-port``
for the command line, ``port=`` in Python).

The ``LlamaCppClient`` examples talk to a llama-server as the README starts one
(``python -m bridge.llama.embedded --port 8080``: the packaged model with its quick-start
chat template, which ends answers after a sentence or two): the bridge's own embedded
llama.cpp, behind a tap that records what it sends. The only change to a pasted example
is its URL, ``http://localhost:8080``, which becomes the tap's. The examples sample
without a seed, so their text differs from run to run: each is compared with what
llama-server sent for that very request, as the tap recorded it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest

from bridge import BridgeClient, MqttSettings
from bridge.config.settings import DeploymentConfig
from bridge.protocol.packet import packet_bytes
from tests.support.cli_proc import ROOT, Line, RunningBridge, SubWatcher, cli
from tests.support.fake_llama import FakeLlama, answer_with
from tests.support.processes import free_port
from tests.support.prompts import TEMPLATE_MARKERS
from tests.support.tap import Exchange, HttpTap

README = (ROOT / "README.md").read_text(encoding="utf-8")
# A slow, shared CI machine makes a few tokens a second: bounds for the answers to end.
ANSWER_TIMEOUT = 300.0
TERMINAL = ("done", "reply", "error")
README_LLAMA_URL = "http://localhost:8080"  # the llama-server URL of the Python examples


def code_block(lang: str, containing: str) -> str:
    """The one README code block of language ``lang`` that contains ``containing``."""
    blocks = [body for fence_lang, body in re.findall(r"^```(\w*)\n(.*?)^```", README,
                                                      re.MULTILINE | re.DOTALL)
              if fence_lang == lang and containing in body]
    assert len(blocks) == 1, f"{len(blocks)} README ```{lang} blocks contain {containing!r}"
    return str(blocks[0])


def on_port(script: str, port: int) -> str:
    """A shell block with the Mosquitto tools pointed at ``port``."""
    return re.sub(r"\b(mosquitto_pub|mosquitto_sub)\b", rf"\1 -p {port}", script)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=ANSWER_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done


def on_llama(code: str, url: str) -> str:
    """A Python example pointed at the llama-server ``url`` instead of localhost:8080."""
    assert README_LLAMA_URL in code
    return code.replace(README_LLAMA_URL, url)


def sse_events(exchange: Exchange) -> list[dict[str, Any]]:
    """The JSON events of a recorded streamed answer."""
    return [json.loads(line[6:]) for line in exchange.response.decode().splitlines()
            if line.startswith("data: {")]


def run_shell(script: str) -> None:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def ended(topic: str) -> Any:
    def check(lines: list[Line]) -> bool:
        return any(line.topic == topic and (line.message or {}).get("type") in TERMINAL
                   for line in lines)
    return check


def text(messages: list[dict[str, Any]]) -> str:
    return "".join(m.get("text", "") for m in messages if m.get("type") == "chunk")


def check_answer(messages: list[dict[str, Any]]) -> None:
    """start, then chunks (and heartbeats), then done; seq 0, 1, 2 …; clean text."""
    assert messages, "no reply"
    assert [m["seq"] for m in messages] == list(range(len(messages))), messages
    kinds = [m["type"] for m in messages if m["type"] != "progress"]
    assert kinds[0] == "start" and kinds[-1] == "done", kinds
    assert set(kinds[1:-1]) <= {"chunk"}, kinds
    answer = text(messages)
    assert not any(marker in answer for marker in TEMPLATE_MARKERS), answer


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, RunningBridge]]:
    """``llamacpp-mqtt-bridge run`` as the README starts it: the broker port and the bridge."""
    port = free_port()
    db = tmp_path_factory.mktemp("readme") / "sessions.db"
    bridge = RunningBridge("--mqtt-port", str(port), "--sessions-db", str(db),
                           "--bridge-id", "readme")
    try:
        bridge.wait_ready()
        yield port, bridge
    finally:
        bridge.stop()


@pytest.fixture(scope="module")
def readme_bridge(readme_run: tuple[int, RunningBridge]) -> int:
    """The broker port of the README's bridge."""
    return readme_run[0]


@pytest.fixture(scope="module")
def readme_llama(readme_run: tuple[int, RunningBridge]) -> str:
    """The URL of the README bridge's embedded llama.cpp, from its ready line."""
    found = re.search(r"ready: .* llama\.cpp at (http://\S+?)\. ", readme_run[1].log)
    assert found is not None, readme_run[1].log
    return found.group(1)


@pytest.fixture
def terminal_1(readme_bridge: int) -> Iterator[SubWatcher]:
    """Terminal 1 of the README: ``mosquitto_sub`` watching device kitchen's replies."""
    block = code_block("sh", "# terminal 1")
    command = next(line for line in block.splitlines() if line.startswith("mosquitto_sub"))
    watcher = SubWatcher(on_port(command, readme_bridge))
    try:
        # mosquitto_sub says nothing once subscribed: publish until it shows a message.
        probe = "llm/reply/kitchen/probe"
        for _ in range(100):
            run_shell(on_port(f"mosquitto_pub -h 127.0.0.1 -t {probe} -m ping", readme_bridge))
            if watcher.wait_for(lambda lines: any(x.topic == probe for x in lines), 0.5):
                break
        assert watcher.on(probe) == [] and watcher.topics() == [probe], watcher.lines
        yield watcher
    finally:
        watcher.stop()


def test_mosquitto_examples_answer_as_the_readme_shows(readme_bridge: int,
                                                       terminal_1: SubWatcher) -> None:
    run_shell(on_port(code_block("sh", "# terminal 2: ask"), readme_bridge))
    assert terminal_1.wait_for(ended("llm/reply/kitchen/q1"), ANSWER_TIMEOUT)
    plain = [t for t in terminal_1.topics() if re.fullmatch(r"llm/reply/kitchen/[0-9a-f]{16}", t)]
    assert len(plain) == 1, terminal_1.topics()  # the plain-text request's generated id
    assert terminal_1.wait_for(ended(plain[0]), ANSWER_TIMEOUT)

    sky, q1 = terminal_1.on(plain[0]), terminal_1.on("llm/reply/kitchen/q1")
    check_answer(sky)
    check_answer(q1)
    # No max_tokens in the request: max_tokens_default bounds it, as the README says.
    assert sky[-1]["usage"]["completion_tokens"] <= 256
    assert q1[-1]["usage"]["completion_tokens"] <= 32
    for line in terminal_1.lines:
        if line.topic == "llm/reply/kitchen/q1" and '"chunk"' in line.payload:
            assert len(line.payload.encode()) <= 128  # "chunk_bytes":128

    # The README's sample of q1's stream is what the bridge really sends.
    sample = [Line(*row.split(" ", 1)) for row in code_block("", "llm/reply/kitchen/q1")
              .splitlines()]
    shown = [line.message for line in sample]
    assert all(m is not None for m in shown) and {line.topic for line in sample} == {
        "llm/reply/kitchen/q1"}
    check_answer([m for m in shown if m is not None])
    assert shown[0] == {**q1[0], "queue": 0}, (shown[0], q1[0])  # the real model name
    assert shown[-1] is not None and set(shown[-1]) == set(q1[-1])
    assert set(shown[-1]["usage"]) == set(q1[-1]["usage"])
    # A model that ends at once sends no text, so it has no ttft_ms or tokens_per_s to report.
    if any(m["type"] == "chunk" for m in q1):
        assert set(shown[-1]["timings"]) == set(q1[-1]["timings"])
    else:
        llama = {"cache_n", "prompt_n"}  # llama-server's, whether text came or not
        assert set(q1[-1]["timings"]) - llama == {"queue_ms", "total_ms"} \
            < set(shown[-1]["timings"])


def test_cancel_example_cancels_a_running_stream(readme_bridge: int,
                                                 terminal_1: SubWatcher) -> None:
    run_shell(on_port(code_block("sh", "cancel it"), readme_bridge))
    topic = "llm/reply/kitchen/q2"
    assert terminal_1.wait_for(ended(topic), ANSWER_TIMEOUT)
    q2 = terminal_1.on(topic)
    check_answer(q2)
    assert q2[0]["queue"] == 0  # it was running, not waiting, when the cancel came
    assert q2[-1]["finish_reason"] == "cancelled", q2[-1]
    assert q2[-1]["usage"]["completion_tokens"] < 2000


def test_devices_example_fits_every_message_in_256_bytes(readme_bridge: int,
                                                         terminal_1: SubWatcher) -> None:
    run_shell(on_port(code_block("sh", '"max_packet":256'), readme_bridge))
    topic = "llm/reply/kitchen/tiny"
    assert terminal_1.wait_for(ended(topic), ANSWER_TIMEOUT)
    tiny = terminal_1.on(topic)
    check_answer(tiny)
    for line in terminal_1.lines:
        if line.topic == topic:  # mosquitto_sub speaks MQTT 3.1.1: no properties arrive
            size = packet_bytes(topic, len(line.payload.encode()), None)
            assert size <= 256, (size, line.payload)


def test_sessions_example_remembers_the_name(readme_bridge: int,
                                             terminal_1: SubWatcher) -> None:
    run_shell(on_port(code_block("sh", '"session":"cook"'), readme_bridge))
    for rid in ("t1", "t2", "t3"):
        assert terminal_1.wait_for(ended(f"llm/reply/kitchen/{rid}"), ANSWER_TIMEOUT), rid
    t1, t2, t3 = (terminal_1.on(f"llm/reply/kitchen/{rid}") for rid in ("t1", "t2", "t3"))
    check_answer(t1)
    check_answer(t2)
    assert "Ada" in text(t2), text(t2)
    assert [m["type"] for m in t3 if m["type"] != "progress"] == ["start", "done"]
    assert t3[-1]["finish_reason"] == "cleared"
    # The same chat without the session does not know the name: t2 remembered it.
    question = {"role": "user", "content": "What is my name?"}
    with BridgeClient(MqttSettings(host="127.0.0.1", port=readme_bridge),
                      client="kitchen-control") as dev:
        alone = [m.model_dump(exclude_none=True) for m in dev.ask(
            {"messages": [question], "temperature": 0, "max_tokens": 32},
            idle_timeout=ANSWER_TIMEOUT)]
    check_answer(alone)
    assert "Ada" not in text(alone)


def test_python_example_prints_the_stream(readme_bridge: int) -> None:
    code = code_block("python", "with BridgeClient(").replace("port=1883",
                                                             f"port={readme_bridge}")
    assert f"port={readme_bridge}" in code
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=ANSWER_TIMEOUT)
    assert done.returncode == 0, done.stderr
    kinds = [line.split(" ", 1)[0] for line in done.stdout.splitlines()]
    assert kinds[0] == "start" and kinds[-1] == "done" and "chunk" in kinds, done.stdout


def test_async_client_example_streams_asks_at_once_and_cancels(readme_bridge: int) -> None:
    code = code_block("python", "AsyncBridgeClient").replace("port=1883",
                                                             f"port={readme_bridge}")
    assert f"port={readme_bridge}" in code
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=ANSWER_TIMEOUT)
    assert done.returncode == 0, done.stderr
    *streamed, france, italy, cancelled = done.stdout.splitlines()
    assert "".join(streamed).strip(), done.stdout  # the sky answer (maybe several lines)
    assert not any(marker in done.stdout for marker in TEMPLATE_MARKERS)
    assert france.startswith("done: The capital of France is"), done.stdout
    assert italy.startswith("done: The capital of Italy is"), done.stdout
    assert cancelled == "long: cancelled", done.stdout


def test_async_llama_client_example_streams_an_answer(llama_server: str) -> None:
    """The asyncio client's example against the real llama.cpp server; the only change is
    the server's URL."""
    code = code_block("python", "AsyncLlamaCppClient(")
    assert code.count("http://localhost:8080") == 1
    done = subprocess.run([sys.executable, "-c", code.replace("http://localhost:8080",
                                                              llama_server)],
                          cwd=ROOT, capture_output=True, text=True, timeout=ANSWER_TIMEOUT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "ok", done.stdout  # health()
    assert "".join(lines[1:-1]).strip(), done.stdout  # the streamed answer
    finish, usage = lines[-1].split(" ", 1)
    assert finish in ("stop", "length"), done.stdout
    assert "'completion_tokens': " in usage, done.stdout


def test_by_hand_ask_and_status(readme_bridge: int) -> None:
    block = code_block("sh", "llamacpp-mqtt-bridge ask")
    for line in block.splitlines():
        command = line.split("#", 1)[0].split()
        if command[1:2] in (["ask"], ["status"]):
            assert command[0] == ".venv/bin/llamacpp-mqtt-bridge"
            argv = [a.strip('"') for a in command[1:]]
            done = subprocess.run(cli(*argv, "--mqtt-port", str(readme_bridge)), cwd=ROOT,
                                  capture_output=True, text=True, timeout=ANSWER_TIMEOUT)
            assert done.returncode == 0, done.stderr
            if argv[0] == "ask":
                assert "tokens, first token" in done.stderr  # the summary line
                assert not any(marker in done.stdout for marker in TEMPLATE_MARKERS)
            else:
                assert "llm/status/readme: online" in done.stdout


def test_profile_example_is_a_valid_config() -> None:
    profile = tomllib.loads(code_block("toml", "[profiles.kitchen]"))
    cfg = DeploymentConfig(**profile)
    assert cfg.profiles["kitchen"].max_tokens == 96


# ---------------------------------------------------------------------------- Python API


def test_llama_client_snippet_prints_what_llama_server_sent(readme_llama: str) -> None:
    code = code_block("python", "for chunk in client.generate_stream(messages):")
    assert 'DeploymentConfig(server_url="http://localhost:8080")' in code
    # The snippet sets no seed, so the packaged model samples at random, and now and then
    # it ends at once: run it again (at most 3 times) until there is text to compare.
    for _ in range(3):
        with HttpTap(readme_llama) as tap:
            done = run_python(on_llama(code, tap.url))
            sent = tap.generations()
        assert len(sent) == 1 and sent[0].finished
        assert sent[0].json()["messages"] == [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me about AI."}]
        answer = sent[0].sse_text()
        assert done.stdout == answer  # every chunk printed as it came, nothing else
        if answer.strip():
            break
    assert answer.strip(), "llama-server sent no text in 3 runs"
    assert not any(marker in answer for marker in TEMPLATE_MARKERS)


def test_llama_client_debug_info_example_on_llama_cpp(readme_llama: str) -> None:
    code = code_block("python", "debug_info = {}")
    with HttpTap(readme_llama) as tap:
        done = run_python(on_llama(code, tap.url))
        streamed, once = tap.generations()
    events = sse_events(streamed)
    finish = next(c["finish_reason"] for e in events for c in e.get("choices") or ()
                  if c.get("finish_reason"))
    usage = [e["usage"] for e in events if e.get("usage")][-1]
    message = json.loads(once.response)["choices"][0]["message"]
    assert once.json()["tools"][0]["function"]["name"] == "get_weather"
    assert not message.get("tool_calls")  # the packaged model answers in text, as it says
    # The packaged base model may end at once: then there is no first text to time.
    first = r"first text after \d+\.\d\d s" if streamed.sse_text() else "no text"
    expected = (re.escape(f"{streamed.sse_text()}\n[{finish}, {usage['completion_tokens']} "
                          "tokens, ") + first
                + re.escape(f", from {tap.url}]\n{message['content']}\n"))
    assert re.fullmatch(expected, done.stdout), (expected, done.stdout)


def test_llama_client_debug_info_example_prints_tool_calls() -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    code = code_block("python", "debug_info = {}")
    with FakeLlama(answer_with(tool_calls=lambda body: [call] if body.get("tools") else None)) \
            as fake:
        done = run_python(on_llama(code, fake.url))
        bodies = fake.wait_bodies(2)
    assert [b["stream"] for b in bodies] == [True, False] and "tools" in bodies[1]
    assert re.fullmatch(re.escape("Hello from the fake.\n[stop, 4 tokens, first text after ")
                        + r"\d+\.\d\d" + re.escape(f" s, from {fake.url}]\n"
                                                     'get_weather {"city": "Paris"}\n'),
                        done.stdout), done.stdout
