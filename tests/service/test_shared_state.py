"""Claims, session turns and leases of several bridges, on a real ``redis-server``.

Two :class:`SharedState` objects with their own connection pools stand for two bridges.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bridge.protocol.errors import SessionStoreError
from bridge.service.redis_store import open_redis, redact
from bridge.service.shared import (
    MAX_KEPT_ANSWER_MESSAGES,
    RETRY_S,
    ClaimState,
    SharedState,
)
from tests.support.redis_server import RedisProcess
from tests.support.waiting import poll_until

LEASE_S = 1.0


def _bridge(server: RedisProcess, name: str, lease_s: float = LEASE_S) -> SharedState:
    return SharedState(open_redis(server.url), prefix="t", bridge_id=name, lease_s=lease_s,
                       answer_ttl_s=60, where=redact(server.url))


@pytest.fixture
def pair(redis_server: RedisProcess) -> Iterator[tuple[SharedState, SharedState]]:
    a, b = _bridge(redis_server, "a"), _bridge(redis_server, "b")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_a_request_is_claimed_once_then_answered_from_the_record(
        pair: tuple[SharedState, SharedState]) -> None:
    a, b = pair
    assert a.claim("dev", "r1").state is ClaimState.mine
    running = b.claim("dev", "r1")
    assert running.state is ClaimState.running and running.holder == a.owner
    assert a.held == 1
    a.finished("dev", "r1", [b'{"type":"start"}', b'{"type":"done"}'])
    assert a.held == 0
    done = b.claim("dev", "r1")
    assert done.state is ClaimState.finished
    assert done.record == [b'{"type":"start"}', b'{"type":"done"}']
    assert b.claim("dev", "r2").state is ClaimState.mine  # ids are per (client, id)
    assert b.claim("other", "r1").state is ClaimState.mine


def test_a_released_claim_runs_again_elsewhere_and_a_large_answer_is_not_kept(
        pair: tuple[SharedState, SharedState]) -> None:
    a, b = pair
    assert a.claim("dev", "r1").state is ClaimState.mine
    a.release("dev", "r1")  # ended in a retryable error before any text
    assert b.claim("dev", "r1").state is ClaimState.mine
    b.finished("dev", "r1", [b"x"] * (MAX_KEPT_ANSWER_MESSAGES + 1))
    found = a.claim("dev", "r1")
    assert found.state is ClaimState.finished and found.record is None


def test_an_answer_whose_terminal_was_refused_is_forgotten_a_running_claim_is_not(
        pair: tuple[SharedState, SharedState]) -> None:
    a, b = pair
    assert a.claim("dev", "r1").state is ClaimState.mine
    b.forget("dev", "r1")  # only an answered request is forgotten
    assert b.claim("dev", "r1").state is ClaimState.running
    a.finished("dev", "r1", [b'{"type":"reply"}'])
    a.forget("dev", "r1")  # the broker refused that reply: a resend must run
    assert b.claim("dev", "r1").state is ClaimState.mine


def test_a_crashed_bridges_claim_and_turn_end_with_the_lease_a_live_ones_do_not(
        pair: tuple[SharedState, SharedState]) -> None:
    a, b = pair
    a.start()  # a renews its leases; b stands for a bridge that died (never renews)
    assert a.claim("dev", "live").state is ClaimState.mine
    assert a.take_turn("dev", "chat-live", "live") is None
    assert b.claim("dev", "dead").state is ClaimState.mine
    assert b.take_turn("dev", "chat-dead", "dead") is None
    started = time.monotonic()
    # the dead bridge's claim and turn are free once its lease ends
    assert poll_until(lambda: a.claim("dev", "dead").state, lambda s: s is ClaimState.mine,
                      10 * LEASE_S, interval=0.05) is ClaimState.mine
    assert poll_until(lambda: a.take_turn("dev", "chat-dead", "next"), lambda h: h is None,
                      10 * LEASE_S, interval=0.05) is None
    # the live bridge renewed its own through the same time, and more
    assert poll_until(time.monotonic, lambda now: now - started > 2 * LEASE_S, 10) \
        - started > 2 * LEASE_S
    assert b.claim("dev", "live").state is ClaimState.running
    assert b.take_turn("dev", "chat-live", "other") == f"{a.owner}:live"


def test_a_session_turn_is_held_until_given_back(pair: tuple[SharedState, SharedState]) -> None:
    a, b = pair
    assert a.take_turn("dev", "chat", "t1") is None
    assert b.take_turn("dev", "chat", "t2") == f"{a.owner}:t1"
    assert b.take_turn("dev", "other-chat", "t3") is None  # other sessions are not held up
    a.give_turn("dev", "chat")
    assert b.take_turn("dev", "chat", "t2") is None
    a.give_turn("dev", "chat")  # not a's any more: nothing happens to b's turn
    assert a.take_turn("dev", "chat", "t4") == f"{b.owner}:t2"


def test_redis_away_fails_fast_with_the_cause_then_service_resumes(
        redis_server: RedisProcess) -> None:
    a = _bridge(redis_server, "a")
    try:
        assert a.check()
        redis_server.stop()
        with pytest.raises(SessionStoreError) as first:
            a.claim("dev", "r1")
        message = first.value.message
        assert first.value.retryable
        assert redact(redis_server.url) in message and "unreachable" in message, message
        assert first.value.public_message.startswith("session store unavailable")
        assert redis_server.password not in message
        assert not a.available
        began = time.monotonic()
        with pytest.raises(SessionStoreError):  # within RETRY_S: no new connection attempt
            a.take_turn("dev", "chat", "r1")
        assert time.monotonic() - began < RETRY_S
        a.finished("dev", "r0", [])  # never raises: logged, the lease ends by itself
        redis_server.start()
        state = poll_until(lambda: _try_claim(a, "r1"), lambda s: s is not None, 15,
                           interval=0.1)
        assert state is ClaimState.mine  # reconnected by itself, same object
        assert a.available
    finally:
        a.stop()


def _try_claim(shared: SharedState, request_id: str) -> ClaimState | None:
    try:
        return shared.claim("dev", request_id).state
    except SessionStoreError:
        return None


def test_a_wrong_password_is_named(redis_server: RedisProcess) -> None:
    url = redis_server.url.replace(redis_server.password, "wrong")
    shared = SharedState(open_redis(url), prefix="t", bridge_id="a", lease_s=LEASE_S,
                         answer_ttl_s=60, where=redact(url))
    try:
        assert not shared.check()
        with pytest.raises(SessionStoreError) as exc:
            shared.claim("dev", "r1")
        assert "wrong" not in exc.value.message
        assert "authentication failed" in exc.value.message, exc.value.message
    finally:
        shared.stop()
