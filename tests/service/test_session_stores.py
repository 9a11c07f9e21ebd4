"""The two session stores held to one semantics, and what only the Redis store has.

- The same tests run against :class:`SessionStore` (SQLite in ``tmp_path``) and
  :class:`RedisSessionStore` (a real ``redis-server``, a fresh namespace per test):
  keys, bounds, eviction order, a turn too large, ``clear``, ``last_backend``, idle
  expiry (real time: a 1 s TTL) and the order of ``sessions()``.
- Redis only: two stores on two connection pools (two bridges) appending from threads
  at once keep every bound and lose no turn; Redis stopped gives typed errors naming
  the cause and never the password, and the same store works again once Redis is
  back; passwords; key expiry; ``rediss://`` against a real TLS ``redis-server``.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from bridge.protocol.errors import SessionStoreError
from bridge.protocol.messages import ErrorCode
from bridge.service.redis_store import RedisSessionStore, open_redis, redact
from bridge.service.session_store import (
    AppendResult,
    ConversationStore,
    SessionLimits,
    SessionStore,
)
from tests.support.processes import LOCALHOST, free_port
from tests.support.prompts import assistant, user
from tests.support.redis_server import RedisProcess, require_redis
from tests.support.waiting import LOOPBACK_TIMEOUT, poll_until

CERTS = Path(__file__).resolve().parent.parent / "certs"
LOGGER = "bridge.service.sessions"

MakeStore = Callable[..., ConversationStore]


def qa(text: str) -> list[dict[str, Any]]:
    """One ordinary turn: a question and its answer."""
    return [user(text), assistant(f"re: {text}")]


def fresh_namespace() -> str:
    return f"t{secrets.token_hex(4)}"


def redis_store(server: RedisProcess, limits: SessionLimits | None = None,
                namespace: str = "llm") -> RedisSessionStore:
    return RedisSessionStore(open_redis(server.url), limits, namespace=namespace,
                             where=redact(server.url))


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    """``make_store(limits=None)``: a store of the parametrized kind, closed afterwards."""
    server: RedisProcess | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
    namespace = fresh_namespace()
    made: list[ConversationStore] = []

    def make(limits: SessionLimits | None = None) -> ConversationStore:
        store: ConversationStore
        if server is None:
            store = SessionStore(tmp_path / "sessions.db", limits)
        else:
            store = redis_store(server, limits, namespace)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


# ============================================================================ both stores


def test_roundtrip_keyed_by_client_and_session(make_store: MakeStore) -> None:
    store = make_store()
    assert store.history("dev", "s1") == []
    store.append("dev", "s1", qa("hi"))
    store.append("dev", "s1", [user("ünïcödé ✓ \"quoted\" :colon:"), assistant("ok")])
    store.append("other", "s1", qa("mine"))
    assert store.history("dev", "s1") == [qa("hi"),
                                          [user("ünïcödé ✓ \"quoted\" :colon:"), assistant("ok")]]
    assert store.history("other", "s1") == [qa("mine")]
    assert store.history("dev", "s2") == []
    assert store.history("other", "s2") == []


def test_max_messages_drops_whole_oldest_turns(make_store: MakeStore) -> None:
    store = make_store(SessionLimits(max_messages=5))
    first = store.append("dev", "s", qa("q0"))
    three = [user("q1"), {"role": "tool", "content": "42", "tool_call_id": "c1"},
             assistant("a1")]
    second = store.append("dev", "s", three)
    assert first == second == AppendResult()
    third = store.append("dev", "s", qa("q2"))  # 2 + 3 + 2 > 5: the first turn goes
    assert third == AppendResult(turns_dropped=1)
    assert store.history("dev", "s") == [three, qa("q2")]
    fourth = store.append("dev", "s", qa("q3"))  # 3 + 2 + 2 > 5: the 3-message turn goes
    assert fourth.turns_dropped == 1
    assert store.history("dev", "s") == [qa("q2"), qa("q3")]


def test_max_bytes_drops_oldest_and_a_turn_too_large_is_not_kept(
        make_store: MakeStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = make_store(SessionLimits(max_bytes=1024))
    store.append("dev", "s", [user("x" * 300), assistant("a")])
    store.append("dev", "s", [user("é" * 150), assistant("b")])  # 300 bytes in UTF-8
    result = store.append("dev", "s", [user("z" * 300), assistant("c")])
    assert result == AppendResult(turns_dropped=1)
    assert [t[1]["content"] for t in store.history("dev", "s")] == ["b", "c"]
    assert "dropped 1 oldest turn(s), evicted 0 other session(s)" in caplog.text

    huge = store.append("dev", "s", [user("w" * 2000), assistant("d")])
    assert huge == AppendResult(turns_dropped=3, turn_kept=False)
    assert store.history("dev", "s") == []
    assert "exceeds session_max_messages/session_max_bytes and was not kept" in caplog.text
    # the session itself remains (empty) until cleared, as a row does in SQLite
    assert store.sessions("dev") == [("dev", "s")]
    store.append("dev", "s", qa("small again"))
    assert store.history("dev", "s") == [qa("small again")]
    assert store.clear("dev", "s") is True


def test_per_client_limit_evicts_that_clients_least_recently_used(
        make_store: MakeStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = make_store(SessionLimits(per_client=2))
    store.append("dev", "a", qa("a"))
    store.append("other", "x", qa("x"))  # the oldest of all, but another client's
    store.append("dev", "b", qa("b"))
    store.append("dev", "a", qa("a again"))  # "b" is now dev's least recently used
    result = store.append("dev", "c", qa("c"))
    assert result == AppendResult(sessions_evicted=1)
    assert store.sessions("dev") == [("dev", "a"), ("dev", "c")]
    assert store.history("dev", "b") == []
    assert store.history("other", "x") == [qa("x")]
    assert "session dev/b evicted (least recently used): sessions_per_client reached" \
        in caplog.text
    # appending to an existing session evicts nothing
    assert store.append("dev", "a", qa("a3")).sessions_evicted == 0
    assert store.sessions("dev") == [("dev", "c"), ("dev", "a")]


def test_overall_limit_evicts_the_least_recently_used_of_all(
        make_store: MakeStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = make_store(SessionLimits(per_client=2, max_sessions=3))
    for client in ("dev0", "dev1", "dev2"):
        store.append(client, "s", qa(client))
    store.append("dev0", "s", qa("dev0 again"))  # dev1 is now the oldest
    result = store.append("dev3", "s", qa("dev3"))
    assert result.sessions_evicted == 1
    assert store.sessions() == [("dev2", "s"), ("dev0", "s"), ("dev3", "s")]
    assert "session dev1/s evicted (least recently used): sessions_max reached" in caplog.text

    # the client's own limit first: dev3's oldest goes, then there is room overall
    store.append("dev3", "t", qa("t"))  # evicts dev2/s (overall)
    result = store.append("dev3", "u", qa("u"))  # dev3 has 2: evicts dev3/s
    assert result.sessions_evicted == 1
    assert store.sessions() == [("dev0", "s"), ("dev3", "t"), ("dev3", "u")]
    assert store.sessions("dev3") == [("dev3", "t"), ("dev3", "u")]
    assert store.history("dev3", "s") == [] and store.history("dev2", "s") == []


def test_sessions_oldest_use_first(make_store: MakeStore) -> None:
    store = make_store()
    assert store.sessions() == [] and store.sessions("dev") == []
    for client, session in [("dev", "a"), ("other", "a"), ("dev", "b"), ("dev", "c")]:
        store.append(client, session, qa(session))
    store.append("dev", "a", qa("touch"))
    assert store.sessions() == [("other", "a"), ("dev", "b"), ("dev", "c"), ("dev", "a")]
    assert store.sessions("dev") == [("dev", "b"), ("dev", "c"), ("dev", "a")]
    assert store.sessions("other") == [("other", "a")]
    assert store.sessions("nobody") == []


def test_clear(make_store: MakeStore) -> None:
    store = make_store()
    store.append("dev", "s", qa("a"))
    store.append("dev", "t", qa("b"))
    assert store.clear("dev", "s") is True
    assert store.history("dev", "s") == []
    assert store.sessions() == [("dev", "t")]
    assert store.clear("dev", "s") is False
    assert store.clear("nobody", "s") is False
    store.append("dev", "s", qa("again"))  # starts afresh
    assert store.history("dev", "s") == [qa("again")]


def test_last_backend(make_store: MakeStore) -> None:
    store = make_store()
    assert store.last_backend("dev", "s") is None
    store.append("dev", "s", qa("a"))
    assert store.last_backend("dev", "s") is None  # never given
    store.append("dev", "s", qa("b"), backend="http://127.0.0.1:8081")
    assert store.last_backend("dev", "s") == "http://127.0.0.1:8081"
    store.append("dev", "s", qa("c"))  # None keeps the previous one
    assert store.last_backend("dev", "s") == "http://127.0.0.1:8081"
    store.append("dev", "s", qa("d"), backend="http://127.0.0.1:8082")
    assert store.last_backend("dev", "s") == "http://127.0.0.1:8082"
    assert store.last_backend("dev", "other") is None
    assert store.last_backend("other", "s") is None
    store.clear("dev", "s")
    assert store.last_backend("dev", "s") is None


def test_idle_sessions_expire(make_store: MakeStore) -> None:
    store = make_store(SessionLimits(ttl_s=1, per_client=1))
    store.append("dev", "old", qa("old"), backend="http://127.0.0.1:8081")
    assert store.history("dev", "old") == [qa("old")]
    gone = poll_until(lambda: store.history("dev", "old"), lambda h: h == [], LOOPBACK_TIMEOUT,
                      interval=0.1)
    assert gone == []
    assert store.last_backend("dev", "old") is None
    # nor is it listed, or cleared, before anything sweeps it
    assert ("dev", "old") not in store.sessions()
    assert ("dev", "old") not in store.sessions("dev")
    assert store.clear("dev", "old") is False
    store.append("dev", "old", qa("old"))
    gone = poll_until(lambda: store.history("dev", "old"), lambda h: h == [], LOOPBACK_TIMEOUT,
                      interval=0.1)
    # an expired session does not count against the limits: nothing is evicted
    assert store.append("dev", "new", qa("new")).sessions_evicted == 0
    assert ("dev", "old") not in store.sessions()
    assert ("dev", "old") not in store.sessions("dev")
    # written again, it starts afresh (the expired turn never comes back)
    store.append("dev", "old", qa("fresh"))
    assert store.history("dev", "old") in ([], [qa("fresh")])


# ============================================================================ Redis: two bridges


def _run_threads(work: Callable[[int], None], n: int) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait(LOOPBACK_TIMEOUT)
            work(i)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors


THREADS, APPENDS = 4, 50


def test_two_bridges_append_to_one_session_at_once(redis_server: RedisProcess) -> None:
    ns = fresh_namespace()
    roomy = SessionLimits(max_messages=10_000, max_bytes=10_000_000)
    whole = [redis_store(redis_server, roomy, namespace=ns) for _ in range(2)]
    small = SessionLimits(max_messages=20)
    bounded = [redis_store(redis_server, small, namespace=ns) for _ in range(2)]
    results: list[AppendResult] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        for j in range(APPENDS):
            whole[i % 2].append("dev", "whole", qa(f"{i}-{j}"))
            result = bounded[i % 2].append("dev", "bounded", qa(f"{i}-{j}"))
            with lock:
                results.append(result)

    try:
        _run_threads(work, THREADS)
        every = [t[0]["content"] for t in whole[0].history("dev", "whole")]
        assert sorted(every) == sorted(f"{i}-{j}" for i in range(THREADS)
                                       for j in range(APPENDS))  # no turn lost or doubled
        for i in range(THREADS):  # each writer's turns in the order it wrote them
            assert [c for c in every if c.startswith(f"{i}-")] == \
                [f"{i}-{j}" for j in range(APPENDS)]

        kept = bounded[1].history("dev", "bounded")
        assert len(kept) == 10  # 20 messages
        assert all(r.turn_kept and r.sessions_evicted == 0 for r in results)
        assert sum(r.turns_dropped for r in results) == THREADS * APPENDS - 10
        for i in range(THREADS):
            mine = [int(c.split("-")[1]) for t in kept
                    if (c := t[0]["content"]).startswith(f"{i}-")]
            assert mine == sorted(set(mine))
        check = redis_server.client()
        try:
            meta = check.hgetall(f"{ns}:session:dev:bounded:meta")
            assert int(meta[b"messages"]) == 20
            items = cast(list[bytes], check.lrange(f"{ns}:session:dev:bounded:turns", 0, -1))
            assert len(items) == 10
            assert int(meta[b"bytes"]) == sum(len(item.split(b":", 1)[1]) for item in items)
        finally:
            check.close()
    finally:
        for store in (*whole, *bounded):
            store.close()


def test_two_bridges_create_sessions_at_once_within_the_limits(
        redis_server: RedisProcess) -> None:
    ns = fresh_namespace()
    limits = SessionLimits(per_client=30, max_sessions=40)
    stores = [redis_store(redis_server, limits, namespace=ns) for _ in range(2)]
    evicted = [0] * THREADS

    def work(i: int) -> None:
        for j in range(APPENDS):
            result = stores[i % 2].append(f"dev{i % 2}", f"t{i}-{j}", qa(f"{i}-{j}"))
            assert result.turn_kept and result.turns_dropped == 0
            evicted[i] += result.sessions_evicted

    try:
        _run_threads(work, THREADS)
        alive = stores[0].sessions()
        assert len(alive) == 40
        assert sum(evicted) == THREADS * APPENDS - 40  # each eviction counted once
        for client in ("dev0", "dev1"):
            assert len(stores[1].sessions(client)) <= 30
        for i in range(THREADS):
            # least recently used first: what is left of a writer is its newest sessions
            js = sorted(int(s.split("-")[1]) for c, s in alive if s.startswith(f"t{i}-"))
            assert js == list(range(APPENDS - len(js), APPENDS))
        for client, session in alive:
            assert stores[1].history(client, session) == [qa(session[1:])]
    finally:
        for store in stores:
            store.close()


# ============================================================================ Redis: keys, expiry


def redis_ms(client: redis.Redis) -> int:
    """Redis's clock, in milliseconds."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_keys_live_under_the_namespace_and_expire(redis_server: RedisProcess) -> None:
    ns = fresh_namespace()
    check = redis_server.client()
    store = redis_store(redis_server, SessionLimits(ttl_s=3600), namespace=ns)
    forever = redis_store(redis_server, SessionLimits(ttl_s=0), namespace=ns + "x")
    try:
        store.append("dev", "s", qa("a"), backend="http://b")
        keys = sorted(k.decode() for k in cast(list[bytes], check.keys("*")))
        assert keys == [f"{ns}:session:dev:s:meta", f"{ns}:session:dev:s:turns",
                        f"{ns}:session:lru", f"{ns}:session:lru:dev"]
        before = {k: check.pexpiretime(k) for k in keys}
        assert all(0 < check.pttl(k) <= 3600_000 for k in keys)
        appended_ms = max(before.values()) - 3600_000
        poll_until(lambda: redis_ms(check), lambda now: now > appended_ms + 1, LOOPBACK_TIMEOUT,
                   interval=0.01)
        store.append("dev", "s", qa("b"))
        assert all(check.pexpiretime(k) > before[k] for k in keys)  # refreshed

        forever.append("dev", "s", qa("a"))
        assert all(check.pttl(k) == -1 for k in check.keys(f"{ns}x:*"))
    finally:
        store.close()
        forever.close()
        check.close()


def test_close_is_idempotent_and_releases_the_connections(redis_server: RedisProcess) -> None:
    check = redis_server.client()
    store = redis_store(redis_server)
    try:
        store.append("dev", "s", qa("a"))
        assert poll_until(lambda: len(check.client_list()), lambda n: n == 2,
                          LOOPBACK_TIMEOUT, interval=0.05) == 2  # the store's and this one
        store.close()
        store.close()
        assert poll_until(lambda: len(check.client_list()), lambda n: n == 1,
                          LOOPBACK_TIMEOUT, interval=0.05) == 1
        for call in (lambda: store.history("dev", "s"), lambda: store.append("dev", "s", qa("b")),
                     lambda: store.sessions(), lambda: store.clear("dev", "s"),
                     lambda: store.last_backend("dev", "s")):
            with pytest.raises(SessionStoreError, match="closed"):
                call()
    finally:
        check.close()


def test_keys_deleted_behind_its_back_are_not_listed_nor_evicted(
        redis_server: RedisProcess, caplog: pytest.LogCaptureFixture) -> None:
    """Keys gone without the store (an operator's DEL, maxmemory eviction) leave members in
    the sorted sets: not listed, and dropped without counting as an eviction."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    ns = fresh_namespace()
    store = redis_store(redis_server, SessionLimits(per_client=2), namespace=ns)
    check = redis_server.client()
    try:
        store.append("dev", "a", qa("a"))
        store.append("dev", "b", qa("b"))
        check.delete(f"{ns}:session:dev:a:meta", f"{ns}:session:dev:a:turns")
        assert store.sessions() == [("dev", "b")]
        assert store.sessions("dev") == [("dev", "b")]
        assert store.append("dev", "c", qa("c")).sessions_evicted == 0
        assert "evicted" not in caplog.text
        assert store.sessions("dev") == [("dev", "b"), ("dev", "c")]
        assert store.clear("dev", "a") is False
    finally:
        store.close()
        check.close()


def test_names_with_colons_are_refused(redis_server: RedisProcess) -> None:
    """Names never contain ':' (the bridge checks them); the keys rely on it."""
    store = redis_store(redis_server)
    try:
        with pytest.raises(ValueError, match="cannot contain ':'"):
            store.append("dev", "a:b", qa("x"))
        with pytest.raises(ValueError, match="cannot contain ':'"):
            store.history("dev:x", "a")
    finally:
        store.close()


# ============================================================================ Redis: failures


def _every_method(store: RedisSessionStore) -> list[Callable[[], object]]:
    return [lambda: store.history("dev", "s"), lambda: store.last_backend("dev", "s"),
            lambda: store.sessions(), lambda: store.sessions("dev"),
            lambda: store.append("dev", "s", qa("while down")),
            lambda: store.clear("dev", "other")]


def test_redis_stopped_gives_typed_errors_and_the_same_store_works_again(
        redis_server: RedisProcess) -> None:
    store = redis_store(redis_server)
    where = redact(redis_server.url)
    try:
        store.append("dev", "s", qa("before"), backend="http://b")
        redis_server.stop()
        for call in _every_method(store):
            with pytest.raises(SessionStoreError) as caught:
                call()
            err = caught.value
            assert err.retryable and err.code == ErrorCode.internal
            assert err.message.startswith(f"session store {where} unreachable: ")
            assert "Connection refused" in err.message
            assert "check sessions_url and that Redis is running" in err.message
            assert redis_server.password not in err.message
            assert "127.0.0.1" not in err.public_message
            assert isinstance(err.__cause__, redis.ConnectionError)

        redis_server.start()  # same port, data back from the append-only file
        assert store.history("dev", "s") == [qa("before")]
        assert store.last_backend("dev", "s") == "http://b"
        store.append("dev", "s", qa("after"))  # the script is loaded again by itself
        assert store.history("dev", "s") == [qa("before"), qa("after")]
        assert store.sessions() == [("dev", "s")]
    finally:
        store.close()


def test_a_restart_under_pooled_connections_is_not_noticed(redis_server: RedisProcess) -> None:
    store = redis_store(redis_server)
    try:
        store.append("dev", "s", qa("before"))
        redis_server.restart()  # the pooled connection is now dead
        assert store.append("dev", "s", qa("after")) == AppendResult()
        assert store.history("dev", "s") == [qa("before"), qa("after")]
    finally:
        store.close()


def test_a_hung_redis_times_out_and_the_store_recovers(redis_server: RedisProcess) -> None:
    check = redis_server.client()
    store = RedisSessionStore(open_redis(redis_server.url, timeout_s=0.5),
                              where=redact(redis_server.url))
    pid = int(check.info("server")["process_id"])
    try:
        store.append("dev", "s", qa("before"))
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(SessionStoreError, match=r"did not answer within 0\.5 s") as caught:
                store.history("dev", "s")
            assert isinstance(caught.value.__cause__, redis.TimeoutError)
            assert "check that Redis is running and not overloaded" in caught.value.message
            assert redis_server.password not in caught.value.message
        finally:
            os.kill(pid, signal.SIGCONT)
        assert store.history("dev", "s") == [qa("before")]
        store.append("dev", "s", qa("after"))
        assert store.history("dev", "s")[-1] == qa("after")
    finally:
        store.close()
        check.close()


@pytest.mark.parametrize("credentials", ["wrong", "none"])
def test_wrong_or_missing_password_names_authentication(redis_server: RedisProcess,
                                                        credentials: str) -> None:
    wrong = "not-the-" + redis_server.password
    url = (f"redis://:{wrong}@{redis_server.host}:{redis_server.port}/0" if credentials == "wrong"
           else f"redis://{redis_server.host}:{redis_server.port}/0")
    store = RedisSessionStore(open_redis(url), where=redact(url))
    try:
        for call in _every_method(store):
            with pytest.raises(SessionStoreError, match="authentication failed") as caught:
                call()
            message = caught.value.message
            assert "check the user name and password in sessions_url" in message
            assert wrong not in message and redact(url) in message
    finally:
        store.close()


# ============================================================================ URLs and TLS


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://app:p%40ss@redis.example:6380/2?ssl_ca_certs=/etc/ca.crt",
     "rediss://app:***@redis.example:6380/2?ssl_ca_certs=/etc/ca.crt"),
    ("redis://:a@b@host/0", "redis://:***@host/0"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://user@127.0.0.1/0", "redis://user@127.0.0.1/0"),
    ("redis://host/0?db=1&password=s3cret", "redis://host/0?db=1&password=***"),
    ("redis://:s3cret@[::1/0", "redis://:***@[::1/0"),  # unparseable, still redacted
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_open_redis_settings_and_rediss_without_connecting() -> None:
    ca = str(CERTS / "ca.crt")
    client = open_redis(f"rediss://:pw@127.0.0.1:1/3?ssl_ca_certs={ca}", timeout_s=1.5)
    try:
        pool = client.connection_pool
        assert pool.connection_class is redis.SSLConnection
        kwargs = pool.connection_kwargs
        assert kwargs["ssl_ca_certs"] == ca and kwargs["password"] == "pw"
        assert kwargs["db"] == 3 and kwargs["port"] == 1
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 1.5
        assert kwargs["socket_keepalive"] is True and kwargs["health_check_interval"] > 0
        assert kwargs["retry"].get_retries() == 1
    finally:
        client.close()
    plain = open_redis("redis://127.0.0.1:1/0")
    try:
        assert plain.connection_pool.connection_class is redis.Connection
    finally:
        plain.close()


@contextmanager
def tls_redis(workdir: Path) -> Iterator[tuple[int, str]]:
    """A ``redis-server`` speaking only TLS (tests/certs) on 127.0.0.1: (port, password)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, password = free_port(), secrets.token_hex(8)
    conf = workdir / "redis.conf"
    conf.write_text("\n".join([
        f"bind {LOCALHOST}", "port 0", f"tls-port {port}", f"requirepass {password}",
        f"tls-cert-file {CERTS / 'server.crt'}", f"tls-key-file {CERTS / 'server.key'}",
        f"tls-ca-cert-file {CERTS / 'ca.crt'}", "tls-auth-clients no", f"dir {workdir}",
        'save ""', "appendonly no", f"logfile {workdir / 'redis.log'}", ""]))
    proc = subprocess.Popen([require_redis(), str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, password
    finally:
        proc.terminate()
        try:
            proc.wait(LOOPBACK_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(LOOPBACK_TIMEOUT)


def test_rediss_with_a_private_ca(tmp_path: Path) -> None:
    with tls_redis(tmp_path / "tls") as (port, password):
        url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={CERTS / 'ca.crt'}"
        store = RedisSessionStore(open_redis(url), where=redact(url))
        untrusted_url = f"rediss://:{password}@127.0.0.1:{port}/0"  # the system's CAs
        untrusted = RedisSessionStore(open_redis(untrusted_url), where=redact(untrusted_url))
        try:
            def up() -> bool:
                try:
                    store.sessions()
                    return True
                except SessionStoreError:
                    return False

            assert poll_until(up, bool, LOOPBACK_TIMEOUT, interval=0.05)
            store.append("dev", "s", qa("over TLS"))
            assert store.history("dev", "s") == [qa("over TLS")]
            with pytest.raises(SessionStoreError,
                               match=r"TLS handshake failed: .*certificate") as caught:
                untrusted.history("dev", "s")
            assert password not in caught.value.message
        finally:
            store.close()
            untrusted.close()
