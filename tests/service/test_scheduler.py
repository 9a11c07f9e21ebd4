"""The fair queue and worker pool (bridge/service/scheduler.py), per-client limits and the dedupe
cache (bridge/service/dedupe.py).

Concurrency is observed with Events and Barriers that have timeouts; nothing sleeps to
wait for a condition. Time-dependent limits run on a fake clock.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator

import pytest

import bridge.service.dedupe as limits_mod
from bridge.service.dedupe import ClientLimits, DedupeCache
from bridge.service.scheduler import FairQueue, QueueFull, WorkerPool
from tests.support.clock import FakeClock

WAIT = 5.0  # seconds any Event/Barrier may take before the test fails


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(limits_mod, "time", fake)
    return fake


def recorder(log: list[str], name: str) -> Callable[[], None]:
    return lambda: log.append(name)


def order_of(q: FairQueue[str], log: list[str]) -> list[str]:
    """Run every queued job in the order ``get`` hands them out; return what they recorded."""
    while len(q):
        job = q.get(timeout=0)
        assert job is not None
        job()
    return log


# ============================================================================ FairQueue


def test_fifo_within_one_client() -> None:
    q: FairQueue[str] = FairQueue(10)
    log: list[str] = []
    for i in range(4):
        q.put("A", f"A{i}", recorder(log, f"A{i}"))
    assert order_of(q, log) == ["A0", "A1", "A2", "A3"]


def test_round_robin_across_clients() -> None:
    q: FairQueue[str] = FairQueue(10)
    log: list[str] = []
    for i in range(5):
        q.put("A", f"A{i}", recorder(log, f"A{i}"))
    q.put("B", "B0", recorder(log, "B0"))
    assert order_of(q, log) == ["A0", "B0", "A1", "A2", "A3", "A4"]


def test_round_robin_with_three_clients_and_late_arrivals() -> None:
    q: FairQueue[str] = FairQueue(20)
    log: list[str] = []
    for i in range(3):
        q.put("A", f"A{i}", recorder(log, f"A{i}"))
    for i in range(2):
        q.put("B", f"B{i}", recorder(log, f"B{i}"))
    first = q.get(timeout=0)
    assert first is not None
    first()  # A0; A goes to the back: B, A
    q.put("C", "C0", recorder(log, "C0"))  # joins behind A
    assert order_of(q, log) == ["A0", "B0", "A1", "C0", "B1", "A2"]


def test_capacity_raises_queue_full_and_frees_up() -> None:
    q: FairQueue[str] = FairQueue(3)
    for i in range(3):
        q.put(f"c{i}", f"k{i}", lambda: None)
    with pytest.raises(QueueFull):
        q.put("c9", "k9", lambda: None)
    with pytest.raises(QueueFull):
        q.put("c0", "again", lambda: None)
    assert len(q) == 3
    assert q.get(timeout=0) is not None
    assert q.put("c9", "k9", lambda: None) == 2


def test_capacity_zero_takes_nothing() -> None:
    q: FairQueue[str] = FairQueue(0)
    with pytest.raises(QueueFull):
        q.put("a", "k", lambda: None)


def test_put_returns_the_number_of_jobs_ahead_for_one_client() -> None:
    q: FairQueue[str] = FairQueue(10)
    assert [q.put("A", f"A{i}", lambda: None) for i in range(4)] == [0, 1, 2, 3]
    assert q.get(timeout=0) is not None
    assert q.put("A", "A4", lambda: None) == 3


def test_put_counts_jobs_ahead_in_round_robin_order() -> None:
    q: FairQueue[str] = FairQueue(10)
    for i in range(5):
        q.put("A", f"A{i}", lambda: None)
    assert q.put("B", "B0", lambda: None) == 1


def test_get_times_out_on_an_empty_queue() -> None:
    q: FairQueue[str] = FairQueue(1)
    assert q.get(timeout=0) is None


def test_get_blocks_until_a_job_arrives() -> None:
    q: FairQueue[str] = FairQueue(1)
    got: list[Callable[[], None] | None] = []
    done = threading.Event()

    def consumer() -> None:
        got.append(q.get(timeout=WAIT))
        done.set()

    t = threading.Thread(target=consumer)
    t.start()
    q.put("a", "k", lambda: None)
    assert done.wait(WAIT)
    t.join(WAIT)
    assert got and got[0] is not None


def test_remove_takes_a_waiting_job_out() -> None:
    q: FairQueue[str] = FairQueue(10)
    log: list[str] = []
    q.put("A", "A0", recorder(log, "A0"))
    q.put("A", "A1", recorder(log, "A1"))
    q.put("B", "B0", recorder(log, "B0"))
    assert q.remove("A", "A0") is True
    assert len(q) == 2
    assert q.remove("A", "A0") is False      # already gone
    assert q.remove("A", "nope") is False
    assert q.remove("Z", "A1") is False      # wrong client
    assert q.remove("B", "B0") is True       # B's last job: B leaves the rotation
    assert len(q) == 1
    assert order_of(q, log) == ["A1"]
    assert q.get(timeout=0) is None


def test_drain_returns_the_waiting_keys_and_closes() -> None:
    q: FairQueue[str] = FairQueue(10)
    q.put("A", "A0", lambda: None)
    q.put("A", "A1", lambda: None)
    q.put("B", "B0", lambda: None)
    assert sorted(q.drain()) == ["A0", "A1", "B0"]
    assert len(q) == 0
    assert q.get(timeout=0) is None
    with pytest.raises(QueueFull):
        q.put("A", "late", lambda: None)
    assert q.drain() == []


def test_drain_wakes_a_blocked_get() -> None:
    q: FairQueue[str] = FairQueue(10)
    waiting = threading.Event()
    returned = threading.Event()
    got: list[Callable[[], None] | None] = [lambda: None]

    def consumer() -> None:
        waiting.set()
        got[0] = q.get(timeout=60)  # far longer than the test may take
        returned.set()

    t = threading.Thread(target=consumer, daemon=True)
    t.start()
    assert waiting.wait(WAIT)
    q.drain()
    assert returned.wait(WAIT), "drain() did not wake the waiting get()"
    assert got[0] is None
    t.join(WAIT)


# ============================================================================ WorkerPool


@pytest.fixture
def pools() -> Iterator[list[WorkerPool]]:
    """Pools started by a test; stopped at the end even if the test fails."""
    started: list[WorkerPool] = []
    yield started
    for pool in started:
        pool.stop(timeout=WAIT)


def start_pool(pools: list[WorkerPool], q: FairQueue[str], size: int) -> WorkerPool:
    pool = WorkerPool(q, size)
    pool.start()
    pools.append(pool)
    return pool


def test_pool_runs_at_most_size_jobs_at_once(pools: list[WorkerPool]) -> None:
    q: FairQueue[str] = FairQueue(10)
    pool = start_pool(pools, q, 2)
    assert pool.size == 2
    together = threading.Barrier(2, timeout=WAIT)   # proves two do run at the same time
    gate = threading.Event()
    lock = threading.Lock()
    running = [0]
    most = [0]
    finished = threading.Semaphore(0)
    first_two = threading.Semaphore(0)

    def job(n: int) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        if n < 2:
            first_two.release()
            together.wait()
            assert gate.wait(WAIT)
        with lock:
            running[0] -= 1
        finished.release()

    for n in range(5):
        q.put(f"c{n}", f"k{n}", functools.partial(job, n))
    assert first_two.acquire(timeout=WAIT) and first_two.acquire(timeout=WAIT)
    # Both workers are held inside jobs 0 and 1: nothing else may have started.
    assert len(q) == 3
    assert pool.busy == 2
    with lock:
        assert running[0] == 2
    gate.set()
    for _ in range(5):
        assert finished.acquire(timeout=WAIT)
    assert most[0] == 2
    assert len(q) == 0


def test_pool_survives_a_job_that_raises(
    pools: list[WorkerPool], caplog: pytest.LogCaptureFixture
) -> None:
    q: FairQueue[str] = FairQueue(10)
    start_pool(pools, q, 1)
    after = threading.Event()

    def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="bridge.service.scheduler"):
        q.put("a", "bad", boom)
        q.put("a", "good", after.set)
        assert after.wait(WAIT), "the worker died with the failing job"
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


def test_pool_busy_returns_to_zero(pools: list[WorkerPool]) -> None:
    q: FairQueue[str] = FairQueue(10)
    pool = start_pool(pools, q, 1)
    inside, release, done = threading.Event(), threading.Event(), threading.Event()

    def job() -> None:
        inside.set()
        release.wait(WAIT)

    q.put("a", "k1", job)
    q.put("a", "k2", done.set)
    assert inside.wait(WAIT)
    assert pool.busy == 1
    release.set()
    assert done.wait(WAIT)
    pool.stop(timeout=WAIT)
    assert pool.busy == 0


def test_stop_joins_after_the_running_job_ends() -> None:
    q: FairQueue[str] = FairQueue(10)
    pool = WorkerPool(q, 3)
    pool.start()
    events: list[str] = []
    inside, gate, stop_called = threading.Event(), threading.Event(), threading.Event()

    def job() -> None:
        inside.set()
        gate.wait(WAIT)
        events.append("job finished")

    def stopper() -> None:
        stop_called.set()
        pool.stop(timeout=WAIT)
        events.append("stop returned")

    q.put("a", "k", job)
    assert inside.wait(WAIT)
    t = threading.Thread(target=stopper)
    t.start()
    assert stop_called.wait(WAIT)
    gate.set()
    t.join(3 * WAIT)
    assert events == ["job finished", "stop returned"]
    assert not any(th.is_alive() for th in pool._threads)


class CountingQueue(FairQueue[str]):
    """Counts ``get`` calls and says when there were suspiciously many."""

    def __init__(self, capacity: int, alarm_at: int) -> None:
        super().__init__(capacity)
        self.calls = 0
        self.alarm_at = alarm_at
        self.alarm = threading.Event()

    def get(self, timeout: float | None = None) -> Callable[[], None] | None:
        self.calls += 1
        if self.calls >= self.alarm_at:
            self.alarm.set()
        return super().get(timeout)


def test_idle_workers_do_not_spin_after_drain(pools: list[WorkerPool]) -> None:
    q = CountingQueue(10, alarm_at=200)
    start_pool(pools, q, 1)
    q.drain()
    # A worker that waits politely calls get() about twice a second; a spinning one hits
    # 200 calls within milliseconds (so this fails fast while the bug is there).
    assert not q.alarm.wait(1.0), f"{q.calls} get() calls: the worker is spinning"


def test_idle_workers_wait_without_polling(pools: list[WorkerPool]) -> None:
    # One get() per worker to start waiting, then nothing until a job or stop(): an idle
    # bridge with hundreds of workers must not wake them (they used to poll every 0.5 s).
    q = CountingQueue(10, alarm_at=5)
    pool = start_pool(pools, q, 4)
    assert not q.alarm.wait(1.5), f"{q.calls} get() calls by 4 idle workers: they poll"
    pool.stop(timeout=WAIT)
    assert not any(th.is_alive() for th in pool._threads), "stop() left idle workers waiting"


# ============================================================================ ClientLimits


def test_max_inflight_is_enforced_and_released(clock: FakeClock) -> None:
    lim = ClientLimits(max_inflight=2, per_minute=1000)
    assert lim.admit("a") == (True, "", 0)
    assert lim.admit("a")[0]
    ok, why, retry_ms = lim.admit("a")
    assert not ok
    assert "client_max_inflight" in why and "2" in why
    assert retry_ms > 0
    assert lim.admit("b")[0], "another client is not affected"
    lim.finished("a")
    assert lim.admit("a")[0]
    assert not lim.admit("a")[0]


def test_finished_never_goes_below_zero(clock: FakeClock) -> None:
    lim = ClientLimits(max_inflight=1, per_minute=1000)
    lim.finished("unknown")  # no error
    assert lim.admit("a")[0]
    lim.finished("a")
    lim.finished("a")
    assert lim.admit("a")[0]
    assert not lim.admit("a")[0]


def test_rate_limit_with_retry_hint(clock: FakeClock) -> None:
    lim = ClientLimits(max_inflight=100, per_minute=2)
    assert lim.admit("a")[0]
    assert lim.admit("a")[0]
    ok, why, retry_ms = lim.admit("a")
    assert not ok
    assert "client_rate_per_min" in why
    assert 0 < retry_ms <= 30_001  # one token comes back every 30 s
    assert lim.admit("b")[0], "the bucket is per client"
    clock.now += retry_ms / 1000
    assert lim.admit("a")[0], "admitted again once the hinted time has passed"
    assert not lim.admit("a")[0]


def test_rate_limit_refills_up_to_the_burst_only(clock: FakeClock) -> None:
    lim = ClientLimits(max_inflight=100, per_minute=2)
    clock.now += 3600  # an hour idle earns no more than the burst
    assert lim.admit("a")[0] and lim.admit("a")[0]
    assert not lim.admit("a")[0]


def test_rejected_requests_do_not_count(clock: FakeClock) -> None:
    lim = ClientLimits(max_inflight=1, per_minute=2)
    assert lim.admit("a")[0]
    for _ in range(10):
        assert not lim.admit("a")[0]  # refused on max_inflight: no token spent
    lim.finished("a")
    assert lim.admit("a")[0], "the second token is still there"


def test_tracked_clients_stay_bounded(clock: FakeClock) -> None:
    lim = ClientLimits(max_inflight=1, per_minute=10)
    assert lim.admit("hog")[0]  # in flight throughout: must not be forgotten
    for i in range(20_000):
        assert lim.admit(f"dev{i}")[0]
        lim.finished(f"dev{i}")
    assert len(lim._clients) <= limits_mod._MAX_CLIENTS + 1
    ok, why, _ = lim.admit("hog")
    assert not ok and "client_max_inflight" in why


# ============================================================================ DedupeCache

KEY = ("dev1", "r1")


def test_dedupe_new_then_seen(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=60)
    assert cache.check_and_add(KEY) is None
    seen = cache.check_and_add(KEY)
    assert seen is not None
    assert seen.finished is False and seen.record is None
    assert cache.check_and_add(("dev2", "r1")) is None, "ids are per client"


def test_dedupe_finish_keeps_the_record(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=60)
    cache.check_and_add(KEY)
    cache.finish(KEY, [b"start", b"chunk", b"done"])
    seen = cache.check_and_add(KEY)
    assert seen is not None and seen.finished
    assert seen.record == [b"start", b"chunk", b"done"]
    cache.finish(("x", "unknown"), [b"ignored"])  # no error, nothing added
    assert cache.check_and_add(("x", "unknown")) is None


def test_dedupe_expires_after_ttl(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=60)
    cache.check_and_add(KEY)
    clock.now += 60
    assert cache.check_and_add(KEY) is not None
    clock.now += 60.5
    assert cache.check_and_add(KEY) is None


def test_dedupe_ttl_zero_disables(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=0)
    for _ in range(3):
        assert cache.check_and_add(KEY) is None
    cache.finish(KEY, [b"x"])
    assert cache.check_and_add(KEY) is None


def test_dedupe_forget(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=60)
    cache.check_and_add(KEY)
    cache.forget(KEY)
    assert cache.check_and_add(KEY) is None
    cache.forget(("never", "seen"))


def test_dedupe_max_entries_bound(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=60, max_entries=3)
    keys = [("c", f"r{i}") for i in range(5)]
    for key in keys:
        assert cache.check_and_add(key) is None
    assert len(cache._seen) == 3
    assert cache.check_and_add(keys[4]) is not None   # the newest are remembered
    assert cache.check_and_add(keys[3]) is not None
    assert cache.check_and_add(keys[0]) is None       # the oldest was forgotten


def test_dedupe_max_entries_frees_bytes(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=60, max_entries=2, max_bytes=1000)
    for i in range(10):
        key = ("c", f"r{i}")
        cache.check_and_add(key)
        cache.finish(key, [b"x" * 400])
    assert cache._bytes == 800
    last = cache.check_and_add(("c", "r9"))
    assert last is not None and last.record == [b"x" * 400]


def test_dedupe_max_bytes_drops_oldest_records_but_keeps_ids(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=60, max_bytes=250)
    keys = [("c", f"r{i}") for i in range(3)]
    for key in keys:
        cache.check_and_add(key)
        cache.finish(key, [b"a" * 50, b"b" * 50])  # 100 bytes each
    oldest = cache.check_and_add(keys[0])
    assert oldest is not None, "the id is still known: the request never runs twice"
    assert oldest.finished and oldest.record is None
    for key in keys[1:]:
        seen = cache.check_and_add(key)
        assert seen is not None and seen.record == [b"a" * 50, b"b" * 50]
    assert cache._bytes <= 250


def test_dedupe_a_record_larger_than_the_budget_is_not_kept(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=60, max_bytes=100)
    cache.check_and_add(KEY)
    cache.finish(KEY, [b"x" * 101])
    seen = cache.check_and_add(KEY)
    assert seen is not None and seen.finished and seen.record is None
    assert cache._bytes == 0


def test_dedupe_reusing_an_expired_id_does_not_leak_the_byte_budget(clock: FakeClock) -> None:
    cache = DedupeCache(ttl_s=10, max_bytes=1000)
    for _ in range(3):
        assert cache.check_and_add(KEY) is None
        cache.finish(KEY, [b"x" * 600])
        clock.now += 11
    assert cache.check_and_add(KEY) is None
    cache.finish(KEY, [b"x" * 600])  # the only record held: 600 <= 1000
    seen = cache.check_and_add(KEY)
    assert seen is not None and seen.record == [b"x" * 600]
