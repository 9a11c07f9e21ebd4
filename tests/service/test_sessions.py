"""Sessions: server-side conversations in SQLite (README, *Sessions and profiles*).

- the store on its own (bounds, eviction, restart, threads) and the context fitting;
- the scheduler running one conversation's requests one at a time, in order;
- the bridge with a fake llama-server that records the exact bodies it was sent;
- the bridge end to end against the real llama.cpp server and Mosquitto: memory across
  a bridge restart (the prompt the real server counted equals that of the whole
  conversation sent directly), trimming to a small context, clear, and ordering.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config.settings import load_config
from bridge.llama.client import LlamaCppClient
from bridge.protocol.errors import BackendHTTPError, SessionStoreError
from bridge.protocol.messages import TERMINAL_TYPES
from bridge.service.scheduler import FairQueue, WorkerPool
from bridge.service.session_store import SessionLimits, SessionStore
from bridge.service.sessions import PER_MESSAGE_TOKENS, PROMPT_TOKENS, fit_history
from tests.support.bridge_proc import running_bridge
from tests.support.clock import FakeClock
from tests.support.device import ask, bridge_client
from tests.support.fake_llama import FakeLlama, answer_with, words
from tests.support.processes import MosquittoProcess
from tests.support.prompts import SEED, assistant, user
from tests.support.recorder import Recorder, check_reply_stream, text_of
from tests.support.waiting import REPLY_TIMEOUT as TIMEOUT

WAIT = 10.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SessionStore]:
    s = SessionStore(tmp_path / "s.db")
    yield s
    s.close()


# ============================================================================ the store


def test_history_roundtrip_keyed_by_client_and_session(store: SessionStore) -> None:
    assert store.history("dev", "s1") == []
    store.append("dev", "s1", [user("hi"), assistant("hello")])
    store.append("dev", "s1", [user("again"), assistant("yes")])
    store.append("other", "s1", [user("mine"), assistant("ok")])
    assert store.history("dev", "s1") == [[user("hi"), assistant("hello")],
                                          [user("again"), assistant("yes")]]
    assert store.history("other", "s1") == [[user("mine"), assistant("ok")]]
    assert store.history("dev", "s2") == []


def test_survives_reopening_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "s.db"  # the directory is created
    first = SessionStore(path)
    first.append("dev", "s", [user("ünïcödé ✓"), assistant("ok")])
    first.close()
    second = SessionStore(path)
    try:
        assert second.history("dev", "s") == [[user("ünïcödé ✓"), assistant("ok")]]
    finally:
        second.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_file_is_created_on_first_use_only(tmp_path: Path) -> None:
    s = SessionStore(tmp_path / "lazy.db")
    s.close()
    assert not (tmp_path / "lazy.db").exists()


def test_closed_store_raises_a_bridge_error(store: SessionStore) -> None:
    store.close()
    with pytest.raises(SessionStoreError, match="closed"):
        store.history("dev", "s")


def test_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    s = SessionStore(tmp_path / "file" / "s.db")  # a file where a directory should be
    with pytest.raises(SessionStoreError, match="sessions_db"):
        s.append("dev", "s", [user("x")])
    s.close()


def test_clear(store: SessionStore) -> None:
    store.append("dev", "s", [user("a"), assistant("b")])
    assert store.clear("dev", "s") is True
    assert store.history("dev", "s") == []
    assert store.clear("dev", "s") is False


def test_max_messages_drops_oldest_turns(tmp_path: Path) -> None:
    s = SessionStore(tmp_path / "s.db", SessionLimits(max_messages=4))
    try:
        for i in range(3):
            result = s.append("dev", "s", [user(f"q{i}"), assistant(f"a{i}")])
        assert result.turns_dropped == 1
        assert s.history("dev", "s") == [[user("q1"), assistant("a1")],
                                         [user("q2"), assistant("a2")]]
    finally:
        s.close()


def test_max_bytes_drops_oldest_turns_and_an_oversized_turn_is_not_kept(tmp_path: Path) -> None:
    s = SessionStore(tmp_path / "s.db", SessionLimits(max_bytes=1024))
    try:
        s.append("dev", "s", [user("x" * 300), assistant("a")])
        s.append("dev", "s", [user("y" * 300), assistant("b")])
        result = s.append("dev", "s", [user("z" * 300), assistant("c")])
        assert result.turns_dropped == 1 and result.turn_kept
        assert [t[1]["content"] for t in s.history("dev", "s")] == ["b", "c"]
        huge = s.append("dev", "s", [user("w" * 2000), assistant("d")])
        assert not huge.turn_kept
        assert s.history("dev", "s") == []
    finally:
        s.close()


def test_sessions_per_client_evicts_least_recently_used(tmp_path: Path) -> None:
    clock = FakeClock()
    s = SessionStore(tmp_path / "s.db", SessionLimits(per_client=2), clock=clock)
    try:
        for name in ("a", "b"):
            clock.now += 1
            s.append("dev", name, [user(name), assistant("ok")])
        clock.now += 1
        s.append("dev", "a", [user("a again"), assistant("ok")])  # "b" is now the LRU
        clock.now += 1
        s.append("other", "x", [user("x"), assistant("ok")])  # another client: no effect
        clock.now += 1
        result = s.append("dev", "c", [user("c"), assistant("ok")])
        assert result.sessions_evicted == 1
        assert sorted(s.sessions("dev")) == [("dev", "a"), ("dev", "c")]
        assert s.history("dev", "b") == []
        assert s.history("other", "x")
    finally:
        s.close()


def test_sessions_max_evicts_across_clients(tmp_path: Path) -> None:
    clock = FakeClock()
    s = SessionStore(tmp_path / "s.db", SessionLimits(max_sessions=3), clock=clock)
    try:
        for i in range(5):
            clock.now += 1
            s.append(f"dev{i}", "s", [user("q"), assistant("a")])
        assert s.sessions() == [("dev2", "s"), ("dev3", "s"), ("dev4", "s")]
    finally:
        s.close()


def test_idle_sessions_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    s = SessionStore(tmp_path / "s.db", SessionLimits(ttl_s=100), clock=clock)
    try:
        s.append("dev", "old", [user("q"), assistant("a")])
        clock.now += 50
        s.append("dev", "new", [user("q"), assistant("a")])
        clock.now += 60  # "old" idle for 110 s, "new" for 60 s
        assert s.history("dev", "old") == []
        assert s.history("dev", "new")
        s.append("dev", "third", [user("q"), assistant("a")])  # purges expired sessions
        assert ("dev", "old") not in s.sessions()
        # an expired session that is written again starts afresh
        clock.now += 200
        s.append("dev", "new", [user("fresh"), assistant("a")])
        assert s.history("dev", "new") == [[user("fresh"), assistant("a")]]
    finally:
        s.close()


def test_concurrent_writers_from_threads(store: SessionStore) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        try:
            barrier.wait(WAIT)
            for j in range(20):
                store.append(f"dev{i % 4}", f"s{i}", [user(f"{i}-{j}"), assistant("ok")])
                store.history(f"dev{i % 4}", f"s{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in range(8):
        turns = store.history(f"dev{i % 4}", f"s{i}")
        assert [t[0]["content"] for t in turns] == [f"{i}-{j}" for j in range(20)]


# ============================================================================ fitting


def test_fit_history_drops_whole_oldest_turns() -> None:
    turns = [[user(f"old {i} " + "w " * 20), assistant("a b c")] for i in range(6)]
    fixed = [{"role": "system", "content": "be nice"}, user("new question")]
    counted: list[str] = []

    def count(text: str) -> int:
        counted.append(text)
        return words(text)

    per_turn = (22 + PER_MESSAGE_TOKENS) + (3 + PER_MESSAGE_TOKENS)
    fixed_cost = PROMPT_TOKENS + (2 + PER_MESSAGE_TOKENS) + (2 + PER_MESSAGE_TOKENS)
    budget = fixed_cost + 2 * per_turn + per_turn // 2
    kept, dropped = fit_history(fixed, turns, budget, count)
    assert kept == turns[-2:] and dropped == 4
    assert counted  # the byte bound did not fit: tokens were counted

    counted.clear()
    kept, dropped = fit_history(fixed, turns, 100_000, count)
    assert kept == turns and dropped == 0
    assert not counted  # the byte bound fits: nothing to count

    kept, dropped = fit_history(fixed, turns, fixed_cost, count)
    assert kept == [] and dropped == 6


# ============================================================================ the scheduler


def test_one_conversation_runs_one_request_at_a_time_others_overtake() -> None:
    q: FairQueue[str] = FairQueue(16)
    pool = WorkerPool(q, 3)
    log: list[str] = []
    lock = threading.Lock()
    first_running = threading.Event()
    release_first = threading.Event()
    other_done = threading.Event()
    all_done = threading.Event()

    def job(name: str, *, wait: threading.Event | None = None,
            signal: threading.Event | None = None) -> Any:
        def run() -> None:
            with lock:
                log.append(f"start {name}")
            if name == "s1-a":
                first_running.set()
            if wait is not None:
                assert wait.wait(WAIT)
            with lock:
                log.append(f"end {name}")
                if len([e for e in log if e.startswith("end")]) == 4:
                    all_done.set()
            if signal is not None:
                signal.set()
        return run

    pool.start()
    try:
        q.put("dev", "a", job("s1-a", wait=release_first), group=("dev", "s1"))
        assert first_running.wait(WAIT)
        q.put("dev", "b", job("s1-b"), group=("dev", "s1"))
        q.put("dev", "c", job("s1-c"), group=("dev", "s1"))
        q.put("dev", "d", job("s2-d", signal=other_done), group=("dev", "s2"))
        assert other_done.wait(WAIT), log  # another conversation of the same client overtakes
        with lock:
            assert "start s1-b" not in log and "start s1-c" not in log, log
        assert len(q) == 2
        release_first.set()
        assert all_done.wait(WAIT), log
    finally:
        q.drain()
        pool.stop()
    s1 = [e for e in log if "s1-" in e]
    assert s1 == ["start s1-a", "end s1-a", "start s1-b", "end s1-b", "start s1-c", "end s1-c"]


def test_a_failing_job_frees_its_conversation() -> None:
    q: FairQueue[str] = FairQueue(4)

    def boom() -> None:
        raise RuntimeError("job failed")

    q.put("dev", "a", boom, group="g")
    q.put("dev", "b", lambda: None, group="g")
    first = q.get(timeout=0)
    assert first is not None
    assert q.get(timeout=0) is None  # "b" waits for "a"
    with pytest.raises(RuntimeError):
        first()
    second = q.get(timeout=0)
    assert second is not None


# ============================================================================ bridge + fake llama


def test_history_is_sent_and_survives_a_bridge_restart(mosquitto: MosquittoProcess,
                                                       tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    with FakeLlama(answer_with(lambda body: ["Nice", " to meet", " you."])) as fake:
        with running_bridge(mosquitto.host, mosquitto.port, [fake.url], sessions_db=db), \
                bridge_client(mosquitto, "dev-z", protocol="5") as dev:
            first = ask(dev, {"session": "s1",
                              "messages": [user("My name is Zorblax.")]})
        assert first[-1].type == "done" and first[-1].finish_reason == "stop"
        # a new bridge on the same file
        with running_bridge(mosquitto.host, mosquitto.port, [fake.url], sessions_db=db), \
                bridge_client(mosquitto, "dev-z", protocol="5") as dev, \
                bridge_client(mosquitto, "dev-other", protocol="5") as other:
            second = ask(dev, {"session": "s1", "prompt": "What is my name?"})
            stranger = ask(other, {"session": "s1", "prompt": "What is my name?"})
        bodies = fake.chat_bodies()
    assert second[-1].type == "done" and stranger[-1].type == "done"
    assert bodies[0]["messages"] == [user("My name is Zorblax.")]
    # 'prompt' with a session is one user message, after the remembered turn
    assert bodies[1]["messages"] == [user("My name is Zorblax."), assistant("Nice to meet you."),
                                     user("What is my name?")]
    # sessions are per client: another device's "s1" is another conversation
    assert bodies[2]["messages"] == [user("What is my name?")]
    assert second[-1].usage.prompt_tokens > first[-1].usage.prompt_tokens


def test_system_messages_and_profile_are_sent_but_not_stored(mosquitto: MosquittoProcess,
                                                             tmp_path: Path) -> None:
    profiles = {"brief": {"system": "Be brief."}}
    with FakeLlama() as fake, \
            running_bridge(mosquitto.host, mosquitto.port, [fake.url],
                           sessions_db=tmp_path / "s.db", profiles=profiles) as bridge, \
            bridge_client(mosquitto, "dev-p", protocol="5") as dev:
        one = ask(dev, {"session": "s", "profile": "brief", "messages": [user("one")],
                        "stream": False})
        two = ask(dev, {"session": "s", "messages": [{"role": "system", "content": "Own."},
                                                     user("two")]})
        stored = bridge.sessions.store.history("dev-p", "s")
        bodies = fake.chat_bodies()
    assert one[-1].type == "reply" and one[-1].content == "Hello from the fake."
    assert two[-1].type == "done"
    assert bodies[0]["messages"] == [{"role": "system", "content": "Be brief."}, user("one")]
    assert bodies[1]["messages"] == [{"role": "system", "content": "Own."}, user("one"),
                                     assistant("Hello from the fake."), user("two")]
    assert stored == [[user("one"), assistant("Hello from the fake.")],
                      [user("two"), assistant("Hello from the fake.")]]


def test_history_is_trimmed_to_the_context_oldest_first(mosquitto: MosquittoProcess,
                                                        tmp_path: Path) -> None:
    n_ctx, max_tokens = 400, 20
    system = {"role": "system", "content": "You are a test."}
    with FakeLlama(n_ctx=n_ctx) as fake, \
            running_bridge(mosquitto.host, mosquitto.port, [fake.url], max_tokens_cap=max_tokens,
                           sessions_db=tmp_path / "s.db") as bridge, \
            bridge_client(mosquitto, "dev-t", protocol="5") as dev:
        for i in range(10):
            msgs = ask(dev, {"session": "s", "messages": [
                system, user(f"question {i}: " + "blah " * 28)]})
            assert msgs[-1].type == "done", msgs[-1]
        bodies = fake.chat_bodies()
        stored = bridge.sessions.store.history("dev-t", "s")
    assert len(stored) == 10  # trimming shapes what is sent, not what is kept
    assert fake.tokenize_calls > 0

    def cost(messages: list[dict[str, Any]]) -> int:
        return sum(words(m["content"]) + PER_MESSAGE_TOKENS for m in messages)

    budget = n_ctx - max_tokens
    trimmed = 0
    for i, body in enumerate(bodies):
        sent = body["messages"]
        assert sent[0] == system and sent[-1]["content"].startswith(f"question {i}:")
        history = sent[1:-1]
        assert len(history) % 2 == 0 and all(  # whole turns, user first
            m["role"] == ("user" if k % 2 == 0 else "assistant") for k, m in enumerate(history))
        turns = [history[k:k + 2] for k in range(0, len(history), 2)]
        assert turns == stored[i - len(turns):i], f"request {i}: not the newest turns"
        assert PROMPT_TOKENS + cost(sent) <= budget
        if len(turns) < i:  # some were left out: the next older one would not have fit
            trimmed += 1
            older = stored[i - len(turns) - 1]
            assert PROMPT_TOKENS + cost(sent) + cost(older) > budget
    assert trimmed >= 3
    assert len(bodies[-1]["messages"]) < 2 * 9 + 2


def test_clear_answers_cleared_and_forgets(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    with FakeLlama() as fake, \
            running_bridge(mosquitto.host, mosquitto.port, [fake.url],
                           sessions_db=tmp_path / "s.db"), \
            bridge_client(mosquitto, "dev-c", protocol="5") as dev:
        ask(dev, {"session": "s", "prompt": "remember this"})
        cleared = ask(dev, {"session": "s", "clear": True})
        after = ask(dev, {"session": "s", "prompt": "anything?"})
        ask(dev, {"session": "s", "prompt": "and now?"})
        restart = ask(dev, {"session": "s", "clear": True, "prompt": "fresh start"})
        bodies = fake.chat_bodies()
    assert [m.type for m in cleared] == ["start", "done"]
    assert cleared[-1].finish_reason == "cleared"
    assert after[-1].type == "done"
    assert bodies[1]["messages"] == [user("anything?")]
    assert len(bodies[2]["messages"]) == 3
    # clear with a message: cleared, then answered as the first turn
    assert restart[-1].type == "done" and restart[-1].finish_reason == "stop"
    assert bodies[3]["messages"] == [user("fresh start")]


def _terminal_index(rec: Recorder, topic: str) -> int:
    for i, m in enumerate(rec.messages):
        if m.topic == topic and json.loads(m.payload)["type"] in TERMINAL_TYPES:
            return i
    raise AssertionError(f"no terminal on {topic}")


def _first_index(rec: Recorder, topic: str, kind: str) -> int:
    for i, m in enumerate(rec.messages):
        if m.topic == topic and json.loads(m.payload)["type"] == kind:
            return i
    raise AssertionError(f"no {kind} on {topic}")


def test_two_requests_on_one_session_are_answered_in_order(mosquitto: MosquittoProcess,
                                                           tmp_path: Path) -> None:
    rec = Recorder(mosquitto.host, mosquitto.port, topic_filter="llm/reply/dev-o/#")
    try:
        with FakeLlama(slots=3) as fake, \
                running_bridge(mosquitto.host, mosquitto.port, [fake.url],
                               sessions_db=tmp_path / "s.db"), \
                bridge_client(mosquitto, "dev-o", protocol="5") as dev:
            gate = fake.hold_next()
            dev.send({"id": "a", "session": "s", "prompt": "first"}, subscribe=False)
            fake.wait_bodies(1)  # "a" is streaming and held after its first piece
            dev.send({"id": "b", "session": "s", "prompt": "second"}, subscribe=False)
            dev.send({"id": "c", "session": "t", "prompt": "elsewhere"}, subscribe=False)
            rec.wait_terminal("llm/reply/dev-o/c", TIMEOUT)  # another session runs meanwhile
            assert rec.wait_for(lambda ms: any(m.topic == "llm/reply/dev-o/b" for m in ms), WAIT)
            assert [b["messages"][-1]["content"] for b in fake.chat_bodies()] == \
                ["first", "elsewhere"], "the second request of the session started too early"
            gate.set()
            a = rec.wait_terminal("llm/reply/dev-o/a", TIMEOUT)
            b = rec.wait_terminal("llm/reply/dev-o/b", TIMEOUT)
            bodies = fake.chat_bodies()
    finally:
        rec.close()
    check_reply_stream(a)
    check_reply_stream(b)
    assert a[-1].type == "done" and b[-1].type == "done"
    assert _terminal_index(rec, "llm/reply/dev-o/a") < _first_index(rec, "llm/reply/dev-o/b",
                                                                     "chunk")
    assert bodies[2]["messages"] == [user("first"), assistant("Hello from the fake."),
                                     user("second")]


# ============================================================================ real llama.cpp


def _direct_usage(llama_url: str, messages: list[dict[str, Any]], max_tokens: int) -> Any:
    with LlamaCppClient(llama_url) as client:
        return client.chat(messages, temperature=0, seed=SEED, max_tokens=max_tokens)


def test_real_llama_remembers_a_turn_across_a_bridge_restart(
        mosquitto: MosquittoProcess, llama_server: str, tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    sampling = {"temperature": 0, "seed": SEED, "max_tokens": 24}
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server], sessions_db=db), \
            bridge_client(mosquitto, "dev-real", protocol="5") as dev:
        baseline = ask(dev, {"messages": [user("What is my name?")], **sampling})
        first = ask(dev, {"session": "me", "messages": [user("My name is Zorblax.")],
                          **sampling})
    answer1 = text_of(first)
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server], sessions_db=db), \
            bridge_client(mosquitto, "dev-real", protocol="5") as dev:
        second = ask(dev, {"session": "me", "prompt": "What is my name?", **sampling})
    for msgs in (baseline, first, second):
        assert msgs[-1].type == "done", msgs[-1]
    p0, p2 = baseline[-1].usage.prompt_tokens, second[-1].usage.prompt_tokens
    with LlamaCppClient(llama_server) as client:
        turn1 = client.count_tokens("My name is Zorblax.")
    assert p2 > p0 + turn1, (p0, p2, turn1)
    # exactly the whole conversation: the same prompt and answer as sending it directly
    direct = _direct_usage(llama_server, [user("My name is Zorblax."), assistant(answer1),
                                          user("What is my name?")], 24)
    assert direct.usage is not None and direct.usage.prompt_tokens == p2
    assert text_of(second) == (direct.content or "")
    # llama-server's prompt cache use, as done.timings carries it: the second turn's
    # prompt starts with the first turn's, read by the same server a moment before
    timings = second[-1].timings
    assert timings.cache_n is not None and timings.prompt_n is not None, timings
    assert timings.cache_n + timings.prompt_n == p2, (timings, p2)
    assert timings.cache_n > 0, timings


def test_real_llama_long_session_is_trimmed_not_rejected(
        mosquitto: MosquittoProcess, make_llama: Any, tmp_path: Path) -> None:
    small = make_llama(parallel=1, ctx=512)  # 512 tokens per slot
    max_tokens = 16
    topic_words = ["apples", "rivers", "engines", "clouds", "violins", "deserts", "bridges"]
    with running_bridge(mosquitto.host, mosquitto.port, [small.url], max_tokens_cap=max_tokens,
                        sessions_db=tmp_path / "s.db") as bridge, \
            bridge_client(mosquitto, "dev-long", protocol="5") as dev:
        results = []
        for i, word in enumerate(topic_words):
            question = f"Question {i}: tell me about {word}. " + f"The {word} are nice. " * 20
            results.append(ask(dev, {"session": "long", "prompt": question,
                                     "temperature": 0, "seed": SEED}))
        stored = bridge.sessions.store.history("dev-long", "long")
    for msgs in results:
        assert msgs[-1].type == "done", msgs[-1]
        assert msgs[-1].usage.prompt_tokens <= 512 - max_tokens
    assert len(stored) == len(topic_words)
    # the whole conversation would not fit: without trimming llama-server rejects it
    whole = [m for turn in stored for m in turn]
    with pytest.raises(BackendHTTPError) as info:
        _direct_usage(small.url, whole, max_tokens)
    assert info.value.error_type == "exceed_context_size_error"


def test_real_llama_clear_and_order(mosquitto: MosquittoProcess, llama_server: str,
                                    tmp_path: Path) -> None:
    rec = Recorder(mosquitto.host, mosquitto.port, topic_filter="llm/reply/dev-rq/#")
    sampling = {"temperature": 0, "seed": SEED, "max_tokens": 24}
    try:
        with running_bridge(mosquitto.host, mosquitto.port, [llama_server],
                            sessions_db=tmp_path / "s.db"), \
                bridge_client(mosquitto, "dev-rq", protocol="5") as dev:
            baseline = ask(dev, {"messages": [user("Say something.")], **sampling})
            # two requests back to back on one session, two free slots: still one at a time
            dev.send({"id": "q1", "session": "s", "prompt": "Count to five.", **sampling},
                     subscribe=False)
            dev.send({"id": "q2", "session": "s", "prompt": "Say something.", **sampling},
                     subscribe=False)
            q1 = rec.wait_terminal("llm/reply/dev-rq/q1", TIMEOUT)
            q2 = rec.wait_terminal("llm/reply/dev-rq/q2", TIMEOUT)
            cleared = ask(dev, {"session": "s", "clear": True})
            after = ask(dev, {"session": "s", "prompt": "Say something.", **sampling})
    finally:
        rec.close()
    for msgs in (q1, q2, after):
        check_reply_stream(msgs)
        assert msgs[-1].type == "done", msgs[-1]
    assert _terminal_index(rec, "llm/reply/dev-rq/q1") < _first_index(
        rec, "llm/reply/dev-rq/q2", "chunk")
    assert q2[-1].usage.prompt_tokens > baseline[-1].usage.prompt_tokens  # q1's turn came first
    assert cleared[-1].finish_reason == "cleared"
    # after clear the session is empty: the same prompt as without a session
    assert after[-1].usage.prompt_tokens == baseline[-1].usage.prompt_tokens
    assert text_of(after) == text_of(baseline)


def test_session_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="session_max_messages"):
        load_config(session_max_messages=1)
    cfg = load_config(sessions_per_client=3, session_ttl_s=0)
    assert SessionLimits.from_config(cfg).per_client == 3


def test_ask_command_takes_session_and_profile(mosquitto: MosquittoProcess, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from bridge import cli

    flags = ["--mqtt-host", mosquitto.host, "--mqtt-port", str(mosquitto.port),
             "--client", "dev-cli", "--session", "talk", "--profile", "short"]
    with FakeLlama() as fake, \
            running_bridge(mosquitto.host, mosquitto.port, [fake.url],
                           sessions_db=tmp_path / "s.db",
                           profiles={"short": {"system": "Be short."}}):
        assert cli.main(["ask", "one", *flags]) == 0
        assert cli.main(["ask", "two", *flags]) == 0
        bodies = fake.chat_bodies()
    assert "Hello from the fake." in capsys.readouterr().out
    assert bodies[1]["messages"] == [{"role": "system", "content": "Be short."}, user("one"),
                                     assistant("Hello from the fake."), user("two")]


def test_tokenize_on_the_real_server_and_a_malformed_answer(llama_server: str) -> None:
    from bridge.protocol.errors import BackendProtocolError
    from tests.support.fake_llama import Respond, ScriptedSSEServer

    with LlamaCppClient(llama_server) as client:
        tokens = client.tokenize("My name is Zorblax.")
        assert tokens and all(isinstance(t, int) for t in tokens)
        assert client.count_tokens("My name is Zorblax. " * 10) > len(tokens)
        assert client.tokenize("") == []
    with ScriptedSSEServer([Respond(200, {"tokens": "nope"})]) as server, \
            LlamaCppClient(server.url) as client, \
            pytest.raises(BackendProtocolError, match="tokens"):
        client.tokenize("x")
