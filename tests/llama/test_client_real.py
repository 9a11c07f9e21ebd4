"""LlamaCppClient against a real llama.cpp server (xllamacpp + Gemma 3 270M, CPU).

The server runs in a child process so the client talks HTTP to it exactly as to
``llama-server``. Gemma 3 270M is a base model whose answers are often nonsense:
tests compare streamed and non-streamed output of the same greedy request, and
check structure and counts, never words.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bridge.config.settings import DeploymentConfig
from bridge.llama.client import LlamaCppClient, TextDelta, Timeouts
from bridge.protocol.errors import BackendHTTPError, StreamCancelled
from bridge.protocol.messages import ChatMessage
from tests.support.llama_client import collect
from tests.support.tap import Exchange, HttpTap
from tests.support.waiting import poll_until

pytestmark = [pytest.mark.llama, pytest.mark.timeout(180)]


SAMPLING: dict[str, Any] = {"temperature": 0.0, "seed": 42, "max_tokens": 16}
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."}]




@pytest.fixture
def real_llama(llama_server: str) -> str:
    """The session's real llama.cpp server (tests/conftest.py: 2 slots, 2048 tokens each)."""
    return llama_server


@pytest.fixture
def client(real_llama: str) -> Iterator[LlamaCppClient]:
    c = LlamaCppClient(real_llama, timeouts=Timeouts(connect=5, first_byte=60, idle=30,
                                                     request=10, non_streamed=120))
    yield c
    c.close()


def no_slot_busy(client: LlamaCppClient, within: float) -> bool:
    """Poll /slots until no slot is processing, up to ``within`` seconds."""
    def idle(slots: list[dict[str, Any]]) -> bool:
        return not any(slot.get("is_processing") for slot in slots)

    return idle(poll_until(client.slots, idle, within, 0.1))


def test_streamed_chat_equals_non_streamed(client: LlamaCppClient) -> None:
    text, end = collect(client.stream_chat(MESSAGES, **SAMPLING))
    gen = client.chat([ChatMessage(role=str(m["role"]), content=m["content"])  # type: ignore[arg-type]
                       for m in MESSAGES], **SAMPLING)
    assert text == gen.content
    assert end.finish_reason == gen.finish_reason
    assert end.finish_reason in ("stop", "length")
    assert end.usage is not None and gen.usage is not None
    assert end.usage.completion_tokens == gen.usage.completion_tokens
    assert end.usage.prompt_tokens == gen.usage.prompt_tokens > 0
    assert 1 <= end.usage.completion_tokens <= 16
    assert end.timings is not None and "predicted_n" in end.timings
    if end.finish_reason == "length":
        assert end.usage.completion_tokens == 16


def test_streamed_completion_equals_non_streamed(client: LlamaCppClient) -> None:
    prompt = "The capital of France is"
    text, end = collect(client.stream_completion(prompt, **SAMPLING))
    gen = client.completion(prompt, **SAMPLING)
    assert text == gen.content
    assert end.finish_reason == gen.finish_reason
    assert end.usage is not None and gen.usage is not None
    assert end.usage.completion_tokens == gen.usage.completion_tokens >= 1


def test_non_streamed_chat(client: LlamaCppClient) -> None:
    gen = client.chat(MESSAGES, **SAMPLING)
    assert isinstance(gen.content, str)
    assert gen.tool_calls is None
    assert gen.finish_reason in ("stop", "length")
    assert gen.usage is not None and gen.usage.prompt_tokens > 0
    assert 0 < gen.usage.completion_tokens <= 16
    assert gen.timings is not None


def test_cancel_frees_the_slot(client: LlamaCppClient) -> None:
    stream = client.stream_chat(MESSAGES, temperature=0.0, seed=42, max_tokens=2000,
                                ignore_eos=True)  # would run ~30 s if not cancelled
    seen = 0
    busy_during_stream = False
    canceller: threading.Thread | None = None
    with pytest.raises(StreamCancelled), stream:
        for delta in stream:
            if isinstance(delta, TextDelta):
                seen += 1
            if seen == 3 and canceller is None:
                busy_during_stream = any(s.get("is_processing") for s in client.slots())
                canceller = threading.Thread(target=stream.cancel)
                cancelled_at = time.monotonic()
                canceller.start()
    assert canceller is not None
    canceller.join(5)
    assert time.monotonic() - cancelled_at < 5
    assert busy_during_stream, "the slot should have been busy while streaming"
    assert no_slot_busy(client, within=5.0), "llama-server kept generating after cancel"


def test_context_overflow_is_http_error(client: LlamaCppClient) -> None:
    words = " ".join(f"word{i}" for i in range(3000))
    stream = client.stream_chat([{"role": "user", "content": words}], max_tokens=8)
    with pytest.raises(BackendHTTPError) as info, stream:
        stream.open()
    assert info.value.status == 400
    assert info.value.error_type == "exceed_context_size_error"
    assert "context" in info.value.message
    with pytest.raises(BackendHTTPError) as again:
        client.chat([{"role": "user", "content": words}], max_tokens=8)
    assert again.value.error_type == "exceed_context_size_error"


def test_health_props_slots_models(client: LlamaCppClient) -> None:
    health = client.health()
    assert (health.ok, health.status, health.http_status) == (True, "ok", 200)
    props = client.props()
    assert props.total_slots == 2
    assert props.n_ctx == 2048  # 4096 shared by 2 slots
    assert props.model is not None and props.model.endswith(".gguf")
    assert "supports_tools" in props.chat_template_caps
    assert len(client.slots()) == 2
    models = client.models()
    assert len(models) == 1 and models[0].endswith(".gguf")


COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _counts(usage: dict[str, Any]) -> dict[str, Any]:
    """The token counts of a ``usage`` object (llama-server adds ``prompt_tokens_details``)."""
    return {key: usage[key] for key in COUNTS}


def _last_usage(stream: Exchange) -> Any:
    """The counts of the last event that carried ``usage``, in a recorded SSE response."""
    usages = [json.loads(line[5:])["usage"] for line in stream.response.decode().splitlines()
              if line.startswith("data: {") and '"usage"' in line]
    return _counts(usages[-1])


def test_text_api_gives_what_llama_server_sent(real_llama: str) -> None:
    """The original script's API against llama-server: the text of each call is what the
    server sent for that very request (recorded on the wire), debug_info its usage."""
    streamed: dict[str, Any] = {}
    once: dict[str, Any] = {}
    with HttpTap(real_llama) as tap, \
            LlamaCppClient(DeploymentConfig(server_url=tap.url)) as client:
        chunks = list(client.generate_stream(MESSAGES, debug_info=streamed, **SAMPLING))
        answer = client.generate(MESSAGES, debug_info=once, **SAMPLING)
        stream_x, once_x = tap.generations()
    assert chunks and all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks) == stream_x.sse_text()
    assert streamed["usage"] == _last_usage(stream_x)
    assert streamed["timings"]["predicted_n"] == streamed["usage"]["completion_tokens"]
    assert streamed["backend"] == tap.url and streamed["error"] is None
    assert streamed["finish_reason"] in ("stop", "length")
    assert 0 < streamed["ttft_s"] <= streamed["elapsed_s"]
    reply = json.loads(once_x.response)
    assert answer == reply["choices"][0]["message"]["content"]
    assert once["usage"] == _counts(reply["usage"]) and once["finish_reason"] in ("stop", "length")
    for x in (stream_x, once_x):
        assert "debug_info" not in x.json()
