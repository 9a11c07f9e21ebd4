"""EmbeddedLlama: llama.cpp's HTTP server (xllamacpp) in a child process.

Uses a private server (``make_llama``) where the test kills or restarts it, the
session server (``llama``) otherwise.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import requests

from bridge.llama.embedded import EmbeddedLlama, EmbeddedLlamaError
from bridge.llama.embedded_server import BASE_MODEL_CHAT_TEMPLATE, BASE_MODEL_STOPS
from tests.support.prompts import TEMPLATE_MARKERS
from tests.support.waiting import LOOPBACK_TIMEOUT as TIMEOUT


def test_session_server_is_healthy_with_two_slots(llama: EmbeddedLlama) -> None:
    health = requests.get(llama.url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    props = requests.get(llama.url + "/props", timeout=TIMEOUT).json()
    assert props["total_slots"] == 2
    # Listens on loopback only.
    assert llama.url.startswith("http://127.0.0.1:")
    conns = psutil.Process(llama.pid).net_connections(kind="tcp")
    listening = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}, listening


def test_kill_restart_and_stop(make_llama: Callable[..., EmbeddedLlama]) -> None:
    server = make_llama(parallel=1, ctx=1024)
    url, pid = server.url, server.pid
    assert requests.get(url + "/props", timeout=TIMEOUT).json()["total_slots"] == 1

    server.kill()
    assert server.pid is None and not server.running()
    assert pid is not None and not psutil.pid_exists(pid)  # killed and reaped
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=TIMEOUT)

    assert server.restart() == url  # same port: clients reconnect to the same URL
    assert requests.get(url + "/health", timeout=TIMEOUT).status_code == 200

    child_pid = server.pid
    server.stop()
    assert child_pid is not None and not psutil.pid_exists(child_pid)
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=TIMEOUT)
    server.stop()  # idempotent


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of the child's stdout, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return proc.stdout.readline().decode().strip()


BY_HAND = [sys.executable, "-m", "bridge.llama.embedded", "--port", "0", "--parallel", "1",
           "--ctx", "512", "--threads", "1"]


def test_child_exits_when_stdin_closes(tmp_path: Path) -> None:
    """The server cannot outlive its parent: it serves only while stdin is open."""
    proc = subprocess.Popen(
        BY_HAND,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = _readline(proc, 120)  # one line: the URL
        assert line.startswith("http://127.0.0.1:"), line
        assert requests.get(line + "/health", timeout=TIMEOUT).status_code == 200
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)


def test_started_in_the_background_it_serves_until_sigterm() -> None:
    """Run by hand as a background job (stdin on /dev/null, at its end at once), the
    server keeps serving; SIGTERM ends it."""
    proc = subprocess.Popen(BY_HAND, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2])
    try:
        line = _readline(proc, 120)
        assert line.startswith("http://127.0.0.1:"), line
        assert requests.get(line + "/health", timeout=TIMEOUT).status_code == 200
        assert proc.poll() is None, "it stopped at the end of stdin"
        proc.terminate()
        assert proc.wait(TIMEOUT) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)


def test_startup_failure_names_the_log(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file")
    server = EmbeddedLlama(
        parallel=1, ctx=512, model=bogus, log_path=tmp_path / "llama.log", startup_timeout=60
    )
    with pytest.raises(EmbeddedLlamaError) as err:
        server.start()
    assert "llama.log" in str(err.value)
    assert server.pid is None
    server.stop()


def test_packaged_base_model_answers_chat_as_plain_text(
        make_llama: Callable[..., EmbeddedLlama]) -> None:
    """The quick-start default: the base model's chat is a plain transcript, its answer
    ends where the model would write the next turn, and it reports the file's name."""
    server = make_llama(parallel=1, ctx=1024, chat_template=None)
    props = requests.get(server.url + "/props", timeout=TIMEOUT).json()
    assert props["chat_template"].strip() == BASE_MODEL_CHAT_TEMPLATE.strip()
    assert props["model_alias"] == "gemma-3-270m-q4_k_m.gguf"
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": " Hello! "},
                    {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    rendered = requests.post(server.url + "/apply-template", json={"messages": conversation},
                             timeout=TIMEOUT).json()["prompt"]
    assert rendered == "Be brief.\n\nUser: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:"
    for question in ("Why is the sky blue?", "Hello", "Tell me a short story about a robot."):
        answer = requests.post(server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": question}], "max_tokens": 64,
            "temperature": 0, "seed": 42}, timeout=300).json()["choices"][0]
        content = answer["message"]["content"]
        assert content.strip(), question
        assert not any(m in content for m in (*TEMPLATE_MARKERS, *BASE_MODEL_STOPS)), content
        assert answer["finish_reason"] == "stop", answer  # ended by itself, not by max_tokens
