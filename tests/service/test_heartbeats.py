"""Heartbeats: a request the bridge holds gets a ``progress`` after every ``heartbeat_s``
of silence, whatever it waits for -- the first token (``prompt_progress``) or the next one
mid-answer (no field) -- so a slow backend never looks like a lost request, which
devices resend after three heartbeats.

A scripted llama-server holds its stream before the first token and again after it;
the test lets it go on only once the device has the heartbeat it expects there.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.support.bridge_proc import running_bridge
from tests.support.device import bridge_client
from tests.support.fake_llama import FakeLlama, Script, held_chat_stream
from tests.support.processes import MosquittoProcess
from tests.support.recorder import check_reply_stream, text_of
from tests.support.waiting import REPLY_TIMEOUT

pytestmark = pytest.mark.mosquitto

HELD_S = 30.0  # how long a hold lasts if the heartbeat it waits for never comes


def test_heartbeats_come_before_the_first_token_and_mid_answer(
        mosquitto: MosquittoProcess) -> None:
    first_token, next_token = threading.Event(), threading.Event()

    def script_for(path: str, body: dict[str, Any]) -> Script:
        return held_chat_stream(first_token, next_token, max_seconds=HELD_S)

    seen: list[Any] = []
    with FakeLlama(script_for) as fake, \
            running_bridge(mosquitto.host, mosquitto.port, [fake.url], protocol="5",
                           heartbeat_s=0.2), \
            bridge_client(mosquitto, "dev-beat", protocol="5") as dev:
        request = {"id": "slow", "messages": [{"role": "user", "content": "Say hello."}]}
        for msg in dev.ask(request, idle_timeout=REPLY_TIMEOUT):
            seen.append(msg)
            if msg.type == "progress":
                # the gate of the wait this heartbeat is about; the other stays closed
                (next_token if any(m.type == "chunk" for m in seen) else first_token).set()
    check_reply_stream(seen)
    assert text_of(seen) == "Hello there.", seen
    assert seen[-1].type == "done" and seen[-1].finish_reason == "stop", seen[-1]
    first_chunk = next(i for i, m in enumerate(seen) if m.type == "chunk")
    before, after = seen[1:first_chunk], seen[first_chunk + 1:-1]
    # waiting for the first token: prompt_progress, with how long
    assert before and all(m.type == "progress" for m in before), before
    assert all(m.prompt_progress["waiting_ms"] >= 0 and m.queued_ms is None
               for m in before), before
    # mid-answer: heartbeats without a field, then the rest of the text
    beats = [m for m in after if m.type == "progress"]
    assert beats, f"no heartbeat while the stream was held after its first token: {seen}"
    assert all(m.prompt_progress is None and m.queued_ms is None for m in beats), beats
    assert [m.type for m in after if m.type != "progress"] == ["chunk"], after
