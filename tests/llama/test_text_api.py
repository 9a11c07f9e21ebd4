"""The original script's API: ``LlamaCppClient(config)`` and the text API over the typed one.

Against the scripted llama-server: what ``generate_stream`` / ``generate`` /
``complete_stream`` / ``complete`` return, what they fill into ``debug_info`` (and that
none of it reaches llama-server), and that they fail, cancel and free the connection as
the typed API does.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import pytest
from pydantic import ValidationError

import bridge
from bridge.config.settings import DeploymentConfig, LlamaSettings
from bridge.llama.answers import DEBUG_KEYS
from bridge.llama.client import CancelToken, LlamaCppClient, RetryPolicy, Timeouts
from bridge.protocol.errors import (
    BackendHTTPError,
    BackendUnavailable,
    FirstByteTimeout,
    StreamCancelled,
)
from tests.support.cli_proc import ROOT
from tests.support.fake_llama import (
    CLOSE_SEEN_S,
    DONE,
    Respond,
    ScriptedSSEServer,
    Send,
    SSEHeaders,
    Stall,
    chat_chunk,
    chat_stream,
    completion_chunk,
    event,
    llama_error,
    usage_chunk,
)
from tests.support.llama_client import serve
from tests.support.processes import free_port
from tests.support.prompts import HI as MESSAGES

pytestmark = pytest.mark.timeout(20)

CALL = {"id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def chat_answer(content: str | None, tool_calls: list[dict[str, Any]] | None = None) -> Respond:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return Respond(200, {
        "choices": [{"index": 0, "message": message,
                     "finish_reason": "tool_calls" if tool_calls else "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
        "timings": {"predicted_n": 5}})


# --------------------------------------------------------------------------- construction


def test_the_original_import_path_gives_the_package_classes() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from llamacpp_mqtt_deploy import LlamaCppClient, "
         "DeploymentConfig; import bridge; "
         "assert LlamaCppClient is bridge.LlamaCppClient; "
         "assert DeploymentConfig is bridge.DeploymentConfig; "
         "print(LlamaCppClient(DeploymentConfig(server_url='http://localhost:8080')).base_url)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "http://localhost:8080"


def test_client_of_a_config_takes_its_url_timeouts_retries_and_key(
        clients: list[LlamaCppClient]) -> None:
    config = DeploymentConfig(server_url="http://127.0.0.1:9/", llama=LlamaSettings(
        connect_timeout_s=1.5, first_byte_timeout_s=7.0, idle_timeout_s=3.0, retries=2,
        api_key="sekrit"))  # type: ignore[arg-type]
    client = LlamaCppClient(config)
    clients.append(client)
    assert client.base_url == "http://127.0.0.1:9" == config.server_url
    assert (client.timeouts.connect, client.timeouts.first_byte, client.timeouts.idle) == (
        1.5, 7.0, 3.0)
    assert client.retry.attempts == 2
    # explicit arguments win over the config's
    mine = LlamaCppClient(config, timeouts=Timeouts(connect=0.5),
                          retry=RetryPolicy(attempts=1), api_key="other")
    clients.append(mine)
    assert (mine.timeouts.connect, mine.retry.attempts) == (0.5, 1)


def test_client_of_a_config_sends_its_api_key(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer(chat_stream(["ok"])) as server:
        config = DeploymentConfig(server_url=server.url,
                                  llama={"api_key": "sekrit"})  # type: ignore[arg-type]
        client = LlamaCppClient(config)
        clients.append(client)
        assert "".join(client.generate_stream(MESSAGES)) == "ok"
        assert server.connection(0).headers["authorization"] == "Bearer sekrit"


def test_client_of_a_config_with_several_urls_uses_the_first(
        clients: list[LlamaCppClient]) -> None:
    config = DeploymentConfig(llama={"urls": ["http://a:1", "http://b:2"]})  # type: ignore[arg-type]
    client = LlamaCppClient(config)
    clients.append(client)
    assert client.base_url == "http://a:1"


def test_client_of_a_config_without_a_url_says_what_to_set() -> None:
    with pytest.raises(ValueError, match=r"server_url='http://host:port'"):
        LlamaCppClient(DeploymentConfig())


@pytest.mark.parametrize("url", ["localhost:8080", "http://", "ftp://h:1"])
def test_bad_urls_are_refused_by_client_and_config(url: str) -> None:
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        LlamaCppClient(url)
    with pytest.raises(ValidationError, match=r"server_url .* must start with http://"):
        DeploymentConfig(server_url=url)


def test_neither_url_nor_config_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="URL \\(str\\) or a DeploymentConfig, not dict"):
        LlamaCppClient({"server_url": "http://h:1"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- generate_stream


def test_generate_stream_yields_text_and_fills_debug_info(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer(chat_stream(["Hel", "lo", " \u00e9"], finish="length")) as server:
        client = serve(clients, server)
        info: dict[str, Any] = {"mine": True}
        chunks = list(client.generate_stream(MESSAGES, 0.5, 0.9, 3, info, seed=42, top_k=5))
        body = server.connection(0).json()
    assert chunks == ["Hel", "lo", " \u00e9"]
    assert set(info) == {*DEBUG_KEYS, "mine"}
    assert info["backend"] == server.url and info["finish_reason"] == "length"
    assert info["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert info["timings"] == {"predicted_n": 3}
    assert 0 <= info["ttft_s"] <= info["elapsed_s"]
    assert info["tool_calls"] is None and info["reasoning"] is None and info["error"] is None
    # the positional order of the documented contract; debug_info never reaches the server
    assert body == {"messages": MESSAGES, "temperature": 0.5, "top_p": 0.9, "max_tokens": 3,
                    "seed": 42, "top_k": 5, "stream": True,
                    "stream_options": {"include_usage": True}}


def test_generate_stream_notes_streamed_tool_calls_and_reasoning(
        clients: list[LlamaCppClient]) -> None:
    fragments = [{"index": 0, "id": "c1", "type": "function",
                  "function": {"name": "get_weather", "arguments": '{"city": '}},
                 {"index": 0, "function": {"arguments": '"Paris"}'}}]
    script = [SSEHeaders(), Send(event(chat_chunk(reasoning="Weather? "))),
              Send(event(chat_chunk(tool_calls=fragments[:1]))),
              Send(event(chat_chunk(tool_calls=fragments[1:]))),
              Send(event(chat_chunk(finish="tool_calls"))), Send(event(usage_chunk())), Send(DONE)]
    with ScriptedSSEServer(script) as server:
        info: dict[str, Any] = {}
        chunks = list(serve(clients, server).generate_stream(MESSAGES, debug_info=info,
                                                             tools=TOOLS, tool_choice="auto"))
        body = server.connection(0).json()
    assert chunks == []  # no text: the model only called a tool
    assert info["tool_calls"] == [CALL] and info["reasoning"] == "Weather? "
    assert info["finish_reason"] == "tool_calls"
    assert body["tools"] == TOOLS and body["tool_choice"] == "auto"


def test_generate_stream_failure_raises_and_is_noted(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([llama_error(400, "too long", "exceed_context_size_error")]) as server:
        info: dict[str, Any] = {}
        with pytest.raises(BackendHTTPError) as raised:
            list(serve(clients, server).generate_stream(MESSAGES, debug_info=info))
    assert raised.value.error_type == "exceed_context_size_error"
    assert info["error"].startswith("BackendHTTPError: ") and "too long" in info["error"]
    assert info["finish_reason"] is None and info["ttft_s"] is None
    assert info["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_generate_stream_unreachable_server(clients: list[LlamaCppClient]) -> None:
    client = LlamaCppClient(f"http://127.0.0.1:{free_port()}",
                            retry=RetryPolicy(attempts=2, initial_backoff=0.01, jitter=0.0))
    clients.append(client)
    info: dict[str, Any] = {}
    with pytest.raises(BackendUnavailable):
        next(client.generate_stream(MESSAGES, debug_info=info))
    assert info["error"].startswith("BackendUnavailable")


def test_stopping_early_closes_the_connection(clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("one"))), Send(event(chat_chunk("two"))),
              Stall(10)]
    with ScriptedSSEServer(script) as server:
        info: dict[str, Any] = {}
        chunks = serve(clients, server, idle=10.0).generate_stream(MESSAGES, debug_info=info)
        for chunk in chunks:
            assert chunk == "one"
            break
        chunks.close()  # what leaving the loop does once the iterator is dropped
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    assert info["finish_reason"] is None and info["error"] is None
    assert info["usage"]["completion_tokens"] >= 1


def test_generate_stream_cancelled_through_its_token(clients: list[LlamaCppClient]) -> None:
    token = CancelToken()
    script = [SSEHeaders(), Send(event(chat_chunk("one"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        info: dict[str, Any] = {}
        chunks = serve(clients, server, idle=10.0).generate_stream(
            MESSAGES, debug_info=info, cancel_token=token)
        assert next(chunks) == "one"
        threading.Timer(0.1, token.cancel).start()
        with pytest.raises(StreamCancelled):
            next(chunks)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    assert info["error"].startswith("StreamCancelled")


def test_nothing_is_sent_until_iteration(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer(chat_stream(["x"])) as server:
        chunks = serve(clients, server).generate_stream(MESSAGES)
        assert server.connections == []
        assert list(chunks) == ["x"]


def test_complete_stream_yields_the_completion(clients: list[LlamaCppClient]) -> None:
    script = [SSEHeaders(), Send(event(completion_chunk("Once"))),
              Send(event(completion_chunk(" upon"))), Send(event(completion_chunk(finish="stop"))),
              Send(DONE)]
    with ScriptedSSEServer(script) as server:
        info: dict[str, Any] = {}
        chunks = list(serve(clients, server).complete_stream("Tell", 0.0, None, 2, info, seed=1))
        conn = server.connection(0)
    assert chunks == ["Once", " upon"]
    assert conn.path == "/v1/completions"
    assert conn.json() == {"prompt": "Tell", "temperature": 0.0, "max_tokens": 2, "seed": 1,
                           "stream": True, "stream_options": {"include_usage": True}}
    assert info["finish_reason"] == "stop" and info["backend"] == server.url


# --------------------------------------------------------------------------- generate


def test_generate_returns_the_text(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([chat_answer("Hello there.")]) as server:
        info: dict[str, Any] = {}
        answer = serve(clients, server).generate(MESSAGES, max_tokens=8, debug_info=info)
        body = server.connection(0).json()
    assert answer == "Hello there."
    assert info["finish_reason"] == "stop" and info["tool_calls"] is None
    assert info["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert info["ttft_s"] is None and info["elapsed_s"] >= 0
    assert body == {"messages": MESSAGES, "max_tokens": 8, "stream": False}


def test_generate_returns_the_tool_calls(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([chat_answer(None, [CALL])]) as server:
        info: dict[str, Any] = {}
        answer = serve(clients, server).generate(MESSAGES, None, None, None, info, TOOLS,
                                                 "required")
        body = server.connection(0).json()
    assert answer == [CALL]
    assert info["tool_calls"] == [CALL] and info["finish_reason"] == "tool_calls"
    assert body["tools"] == TOOLS and body["tool_choice"] == "required"
    assert "debug_info" not in body


def test_generate_failure_is_noted(clients: list[LlamaCppClient]) -> None:
    with ScriptedSSEServer([Stall(10)]) as server:
        info: dict[str, Any] = {}
        with pytest.raises(FirstByteTimeout, match=r"non_streamed=0\.3 s") as raised:
            serve(clients, server, non_streamed=0.3).generate(MESSAGES, debug_info=info)
    assert info["error"] == f"FirstByteTimeout: {raised.value}"
    assert info["finish_reason"] is None and info["backend"] == server.url


def test_complete_returns_the_text(clients: list[LlamaCppClient]) -> None:
    answer = {"choices": [{"text": " there", "index": 0, "finish_reason": "length"}]}
    with ScriptedSSEServer([Respond(200, answer)]) as server:
        info: dict[str, Any] = {}
        text = serve(clients, server).complete("hi", max_tokens=1, debug_info=info)
        assert server.connection(0).path == "/v1/completions"
    assert text == " there" and info["finish_reason"] == "length" and info["usage"] is None


def test_the_public_api_has_the_config_and_client() -> None:
    assert bridge.LlamaCppClient is LlamaCppClient
    assert bridge.DeploymentConfig is DeploymentConfig
