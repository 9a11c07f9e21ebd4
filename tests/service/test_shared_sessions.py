"""Several bridges share sessions, duplicates and leases through a real Redis.

Two bridges in one shared group on Mosquitto (MQTT 5; Mosquitto hands consecutive
requests to the members in turn), two real llama.cpp servers, one ``redis-server``:

- a conversation whose turns alternate between the bridges remembers every turn, and
  its turns stay on the backend that holds its prompt cache;
- two turns of one session that reach the two bridges at once are answered one after
  the other, the second with the first in its history;
- a resend while the first bridge runs the request is not run again, and a resend
  after the answer gets the same messages from the other bridge;
- a bridge SIGKILLed mid-answer leaves no stuck session or id once its lease ends;
- Redis stopped mid-run: session requests get a retryable error naming it, others
  are answered; Redis back: full service, history kept.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from bridge.llama.client import LlamaCppClient
from bridge.mqtt.link import MqttLink
from bridge.protocol.messages import TERMINAL_TYPES, decode_reply
from bridge.service.bridge import Bridge
from tests.support.bridge_proc import bridge_process, running_bridge
from tests.support.device import Device
from tests.support.exactly_once import assert_exactly_once
from tests.support.processes import MosquittoProcess, free_port
from tests.support.recorder import Recorded, Recorder
from tests.support.redis_server import RedisProcess

pytestmark = [pytest.mark.llama, pytest.mark.mosquitto]

TIMEOUT = 180.0
GROUP = "g"
LEASE_S = 2.0
SAMPLING: dict[str, Any] = {"temperature": 0, "seed": 42, "max_tokens": 16}


@contextmanager
def _two_bridges(mosquitto: MosquittoProcess, llama_pair: list[str], redis: RedisProcess,
                 **overrides: Any) -> Iterator[tuple[Bridge, Bridge]]:
    common: dict[str, Any] = {"protocol": "5", "shared_group": GROUP,
                              "sessions_url": redis.url, "session_lease_s": LEASE_S,
                              "max_tokens_cap": 400, **overrides}
    with running_bridge(mosquitto.host, mosquitto.port, llama_pair, bridge_id="b1",
                        **common) as b1, \
            running_bridge(mosquitto.host, mosquitto.port, llama_pair, bridge_id="b2",
                           **common) as b2:
        yield b1, b2


class Conversation:
    """A device on the broker and a recorder of ``llm/#``: asks and reads answers."""

    def __init__(self, mosquitto: MosquittoProcess, client: str = "dev") -> None:
        self.client = client
        self.rec = Recorder(mosquitto.host, mosquitto.port, topic_filter="llm/#")
        self.device = Device.bare(mosquitto.host, mosquitto.port, f"{client}-device",
                                  protocol="5").connect()

    def close(self) -> None:
        self.device.close()
        self.rec.close()

    def send(self, request: dict[str, Any]) -> int:
        """Publish ``request``; returns the recorder's position before it."""
        since = len(self.rec.messages)
        self.device.request_as(self.client, request)
        return since

    def replies(self, request_id: str, since: int = 0) -> list[Any]:
        topic = f"llm/reply/{self.client}/{request_id}"
        return [decode_reply(m.payload) for m in self.rec.messages[since:] if m.topic == topic]

    def wait_terminal(self, request_id: str, since: int = 0, timeout: float = TIMEOUT) -> list[Any]:
        ok = self.rec.wait_for(lambda _ms: any(r.type in TERMINAL_TYPES
                                               for r in self.replies(request_id, since)),
                               timeout)
        assert ok, f"no terminal message for {request_id}: {self.replies(request_id, since)}"
        return self.replies(request_id, since)

    def ask(self, request: dict[str, Any]) -> list[Any]:
        return self.wait_terminal(request["id"], self.send(request))


@pytest.fixture
def talk(mosquitto: MosquittoProcess) -> Iterator[Conversation]:
    conversation = Conversation(mosquitto)
    try:
        yield conversation
    finally:
        conversation.close()


def _text(replies: list[Any]) -> str:
    return "".join(r.text or "" for r in replies if r.type == "chunk")



def _who(bridges: tuple[Bridge, ...], before: list[int]) -> list[int]:
    """Which bridges accepted a request since ``before`` (their accepted counts then)."""
    return [i for i, (b, n) in enumerate(zip(bridges, before, strict=True))
            if b.stats["accepted"] > n]


def _accepted(bridges: tuple[Bridge, ...]) -> list[int]:
    return [b.stats["accepted"] for b in bridges]


def _conversation_tokens(llama_url: str, turns: list[tuple[str, str]], last: str) -> int:
    """Prompt tokens llama-server counts for the whole conversation sent at once."""
    messages: list[dict[str, Any]] = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": last})
    with LlamaCppClient(llama_url) as client:
        answer = client.chat(messages, max_tokens=1, temperature=0)
    assert answer.usage is not None
    return answer.usage.prompt_tokens


def test_turns_alternate_between_bridges_remember_and_stay_on_their_backend(
        talk: Conversation, mosquitto: MosquittoProcess, llama_pair: list[str],
        redis_server: RedisProcess) -> None:
    with _two_bridges(mosquitto, llama_pair, redis_server) as bridges:
        prompts = ["My name is Ada.", "I live in Lyon.", "What is my name?",
                   "Where do I live?"]
        turns: list[tuple[str, str]] = []
        served_by, backends = [], []
        for n, prompt in enumerate(prompts):
            before = _accepted(bridges)
            replies = talk.ask({"id": f"t{n}", "session": "chat", "prompt": prompt,
                                **SAMPLING})
            assert replies[-1].type == "done", replies[-1]
            assert_exactly_once(replies)
            (who,) = _who(bridges, before)
            served_by.append(who)
            backends.append(bridges[who].sessions.last_backend("dev", "chat"))
            # the whole conversation so far was sent, whichever bridge stored it
            assert replies[-1].usage.prompt_tokens == _conversation_tokens(
                llama_pair[0], turns, prompt), (n, served_by)
            if n:  # the backend's prompt cache held the earlier turns
                assert replies[-1].timings.cache_n > 0, replies[-1].timings
            turns.append((prompt, _text(replies)))
        assert set(served_by) == {0, 1}, served_by  # both bridges served turns
        assert any(a != b for a, b in itertools.pairwise(served_by)), served_by
        # one backend all along, though the bridges alternated (affinity, shared)
        assert len(set(backends)) == 1 and backends[0] in llama_pair, backends
        # each bridge reads the same history from Redis
        assert bridges[0].sessions.store.history("dev", "chat") == \
            bridges[1].sessions.store.history("dev", "chat")
        assert len(bridges[0].sessions.store.history("dev", "chat")) == len(prompts)


def test_two_turns_at_once_on_two_bridges_are_answered_one_after_the_other(
        talk: Conversation, mosquitto: MosquittoProcess, llama_pair: list[str],
        redis_server: RedisProcess) -> None:
    with _two_bridges(mosquitto, llama_pair, redis_server) as bridges:
        before = _accepted(bridges)
        since = talk.send({"id": "a", "session": "race", "prompt": "Count: one, two,",
                           **{**SAMPLING, "max_tokens": 48}})
        talk.send({"id": "b", "session": "race", "prompt": "And then?", **SAMPLING})
        first, second = talk.wait_terminal("a", since), talk.wait_terminal("b", since)
        assert sorted(_accepted(bridges)[i] - before[i] for i in (0, 1)) == [1, 1], \
            "the two turns did not reach two bridges"
        for replies in (first, second):
            assert_exactly_once(replies)
            assert replies[-1].type == "done", replies[-1]

        def position(request_id: str, kind: Callable[[Any], bool]) -> int:
            topic = f"llm/reply/dev/{request_id}"
            return next(i for i, m in enumerate(talk.rec.messages[since:])
                        if m.topic == topic and kind(decode_reply(m.payload)))

        # whichever took the session's turn first ran to its end before the other
        # sent a single chunk, and the other had it in its history
        a_end = position("a", lambda r: r.type in TERMINAL_TYPES)
        b_end = position("b", lambda r: r.type in TERMINAL_TYPES)
        one, other = ("a", "b") if a_end < b_end else ("b", "a")
        one_end = min(a_end, b_end)
        chunks = [i for i, m in enumerate(talk.rec.messages[since:])
                  if m.topic == f"llm/reply/dev/{other}" and b'"chunk"' in m.payload]
        assert chunks and min(chunks) > one_end, (one, other, chunks, one_end)
        prompts = {"a": "Count: one, two,", "b": "And then?"}
        stored = bridges[0].sessions.store.history("dev", "race")
        assert [turn[0]["content"] for turn in stored] == [prompts[one], prompts[other]]
        # the later turn's prompt was the whole conversation: the first turn included
        earlier = first if one == "a" else second
        later = second if one == "a" else first
        assert later[-1].usage.prompt_tokens == _conversation_tokens(
            llama_pair[0], [(prompts[one], _text(earlier))], prompts[other])


def test_a_resend_is_not_run_twice_and_later_gets_the_same_answer(
        talk: Conversation, mosquitto: MosquittoProcess, llama_pair: list[str],
        redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    # A broker slow to acknowledge the terminal message: the device has the answer
    # before its bridge hears back, and a resend sent at once must find it answered.
    acknowledged = MqttLink.delivered

    def slow(link: MqttLink, info: Any, timeout: float) -> bool | None:
        if timeout > 0:
            time.sleep(1.0)
        return acknowledged(link, info, timeout)

    monkeypatch.setattr(MqttLink, "delivered", slow)
    with _two_bridges(mosquitto, llama_pair, redis_server) as bridges:
        request = {"id": "long", "prompt": "Count: one, two, three,", "temperature": 0,
                   "max_tokens": 120}
        before = _accepted(bridges)
        since = talk.send(request)
        assert talk.rec.wait_for(lambda _ms: any(
            r.type == "chunk" for r in talk.replies("long", since)), TIMEOUT)
        (runner,) = _who(bridges, before)
        # the resend goes to the other bridge (round robin), which sees the claim
        resent = talk.send(request)
        replies = talk.wait_terminal("long", since)
        assert replies[-1].type == "done", replies[-1]
        assert_exactly_once(replies)
        assert _accepted(bridges) == [n + (i == runner) for i, n in enumerate(before)]
        assert [r.type for r in talk.replies("long", resent)].count("start") == 0

        # a resend after the answer: the same messages again, from either bridge
        payloads = [m.payload for m in talk.rec.messages[since:]
                    if m.topic == "llm/reply/dev/long"]

        def replayed(since: int) -> list[bytes]:
            return [m.payload for m in talk.rec.messages[since:]
                    if m.topic == "llm/reply/dev/long"]

        for _ in range(2):  # round robin: one of the two resends reaches the other
            again = talk.send(request)

            def complete(_ms: list[Recorded], since: int = again) -> bool:
                return len(replayed(since)) >= len(payloads)

            assert talk.rec.wait_for(complete, TIMEOUT)
            assert replayed(again)[:len(payloads)] == payloads
        assert _accepted(bridges) == [n + (i == runner) for i, n in enumerate(before)]


def test_a_killed_bridge_leaves_no_stuck_session_or_id_once_its_lease_ends(
        talk: Conversation, mosquitto: MosquittoProcess, llama_pair: list[str],
        redis_server: RedisProcess, tmp_path: Path) -> None:
    env = {"BRIDGE_SESSIONS_URL": redis_server.url, "BRIDGE_SESSION_LEASE_S": str(LEASE_S),
           "BRIDGE_MQTT__SESSION_EXPIRY_S": "2", "BRIDGE_MAX_TOKENS_CAP": "2000"}
    store = redis_server.client()
    with bridge_process(tmp_path, mosquitto.host, mosquitto.port, llama_pair, "b2", env,
                        free_port(), shared_group=GROUP) as proc:
        assert talk.rec.wait_for(lambda ms: _status(ms, "b2", "online"), 60), \
            (tmp_path / "b2.log").read_text(errors="replace")[-3000:]
        first = talk.ask({"id": "t0", "session": "chat", "prompt": "My name is Ada.",
                          **SAMPLING})
        assert first[-1].type == "done"
        # b2, the group's only member, runs a long turn of the session
        request = {"id": "long", "session": "chat", "prompt": "Count: one, two, three,",
                   "temperature": 0, "max_tokens": 2000}
        since = talk.send(request)
        assert talk.rec.wait_for(lambda _ms: any(
            r.type == "chunk" for r in talk.replies("long", since)), TIMEOUT)
        assert _get(store, "llm:turn:dev:chat") is not None
        assert (_get(store, "llm:req:dev:long") or b"").startswith(b"run:b2/")
        with running_bridge(mosquitto.host, mosquitto.port, llama_pair, protocol="5",
                            bridge_id="b1", shared_group=GROUP,
                            sessions_url=redis_server.url,
                            session_lease_s=LEASE_S) as b1:
            mark = len(talk.rec.messages)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            # the broker stops routing to b2 once its session ends (its Will)
            assert talk.rec.wait_for(lambda ms: _status(ms[mark:], "b2", "offline"), 60)
            # its leases end by themselves
            assert talk.rec.wait_for(lambda _ms: _get(store, "llm:turn:dev:chat") is None
                                     and _get(store, "llm:req:dev:long") is None,
                                     10 * LEASE_S)
            # the device's resend with the same id runs on b1, then the next turn
            resent = talk.send({**request, "max_tokens": 8})
            again = talk.wait_terminal("long", resent)
            assert_exactly_once(again)
            assert again[-1].type == "done", again[-1]
            after = talk.ask({"id": "t2", "session": "chat", "prompt": "What is my name?",
                              **SAMPLING})
            assert after[-1].type == "done", after[-1]
            assert b1.stats["accepted"] == 2
            history = b1.sessions.store.history("dev", "chat")
            assert [turn[0]["content"] for turn in history] == \
                ["My name is Ada.", "Count: one, two, three,", "What is my name?"]
            assert _get(store, "llm:req:dev:long") == b"done"


def _get(store: redis.Redis, key: str) -> bytes | None:
    value = store.get(key)
    assert value is None or isinstance(value, bytes)
    return value


def _status(messages: list[Recorded], bridge_id: str, state: str) -> bool:
    return any(m.topic == f"llm/status/{bridge_id}" and json.loads(m.payload)["state"] == state
               for m in messages)


def test_redis_stopped_mid_run_gives_typed_errors_then_full_service(
        talk: Conversation, mosquitto: MosquittoProcess, llama_pair: list[str],
        redis_server: RedisProcess) -> None:
    with _two_bridges(mosquitto, llama_pair, redis_server) as bridges:
        assert talk.ask({"id": "t0", "session": "chat", "prompt": "My name is Ada.",
                         **SAMPLING})[-1].type == "done"
        redis_server.stop()
        for n in range(2):  # whichever bridge it reaches
            replies = talk.ask({"id": f"down{n}", "session": "chat",
                                "prompt": "What is my name?", **SAMPLING})
            error = replies[-1]
            assert error.type == "error" and error.retryable, error
            # the cause for the device; the log has the address (devices need not know it)
            assert error.code == "internal", error
            assert error.message.startswith("session store unavailable"), error
            assert "127.0.0.1" not in error.message
            plain = talk.ask({"id": f"plain{n}", "prompt": "Hi", **SAMPLING})
            assert plain[-1].type == "done", plain[-1]  # needs no Redis: served
        redis_server.start()

        def served(n: int) -> bool:
            replies = talk.ask({"id": f"back{n}", "session": "chat",
                                "prompt": "What is my name?", **SAMPLING})
            return bool(replies[-1].type == "done")

        # each bridge reconnects by itself (a few retries while it notices)
        results = [served(n) for n in range(12)]
        assert results[-4:] == [True] * 4, results
        # the turn written before the outage is still there, and the new ones after it
        history = bridges[0].sessions.store.history("dev", "chat")
        assert history[0][0]["content"] == "My name is Ada.", history
        assert len(history) == 1 + sum(results), (len(history), results)
