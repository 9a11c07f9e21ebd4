"""Per-client limits and duplicate detection (docs/protocol.md, *Limits*).

Both are bounded: a flood of distinct client names or ids cannot grow memory
without limit (old, idle entries are evicted first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

_MAX_CLIENTS = 10_000


@dataclass
class _ClientState:
    inflight: int = 0
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)


class ClientLimits:
    """At most ``max_inflight`` requests per client queued or running, and a token-bucket rate.

    Args:
        max_inflight: requests per client at once.
        per_minute: requests per client per minute (burst up to the same number).
    """

    def __init__(self, max_inflight: int, per_minute: int) -> None:
        self.max_inflight = max_inflight
        self.rate = per_minute / 60.0
        self.burst = float(per_minute)
        self._clients: OrderedDict[str, _ClientState] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, client: str) -> tuple[bool, str, int]:
        """Count one more request for ``client`` if its limits allow.

        Returns:
            (admitted, reason if not, retry_after_ms hint).
        """
        now = time.monotonic()
        with self._lock:
            state = self._clients.get(client)
            if state is None:
                state = _ClientState(tokens=self.burst, refilled=now)
                self._clients[client] = state
                self._evict()
            self._clients.move_to_end(client)
            state.tokens = min(self.burst, state.tokens + (now - state.refilled) * self.rate)
            state.refilled = now
            if state.inflight >= self.max_inflight:
                return (False, f"client has {state.inflight} requests in flight; the limit is "
                        f"{self.max_inflight} (client_max_inflight): wait for one to finish", 1000)
            if state.tokens < 1.0:
                wait_ms = int((1.0 - state.tokens) / self.rate * 1000) + 1
                return (False, f"more than {int(self.burst)} requests per minute from this "
                        "client (client_rate_per_min): slow down", wait_ms)
            state.tokens -= 1.0
            state.inflight += 1
            return (True, "", 0)

    def finished(self, client: str) -> None:
        with self._lock:
            state = self._clients.get(client)
            if state is not None and state.inflight > 0:
                state.inflight -= 1

    def _evict(self) -> None:
        while len(self._clients) > _MAX_CLIENTS:
            oldest, state = next(iter(self._clients.items()))
            if state.inflight:
                self._clients.move_to_end(oldest)
                return
            del self._clients[oldest]


@dataclass
class _Seen:
    at: float
    record: list[bytes] | None  # None while running, or if the answer was too big to keep
    finished: bool = False


class DedupeCache:
    """Remembers ``(client, id)`` for ``ttl_s`` so a repeated request never runs twice.

    Args:
        ttl_s: how long an id is remembered (0 disables).
        max_entries: bound on remembered ids.
    """

    def __init__(self, ttl_s: float, max_entries: int = 4096,
                 max_bytes: int = 32 * 1024 * 1024) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._bytes = 0
        self._seen: OrderedDict[tuple[str, str], _Seen] = OrderedDict()
        self._lock = threading.Lock()

    def check_and_add(self, key: tuple[str, str]) -> _Seen | None:
        """Register a new request.

        Returns:
            None if ``key`` is new (now registered as running), else what is known of it.
        """
        if self.ttl_s <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None:
                if now - seen.at <= self.ttl_s:
                    return seen
                self._bytes -= _size(seen.record)  # expired: its record is replaced
            self._seen[key] = _Seen(at=now, record=None)
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_entries:
                _, old = self._seen.popitem(last=False)
                self._bytes -= _size(old.record)
            return None

    def finish(self, key: tuple[str, str], record: list[bytes] | None) -> None:
        """Mark ``key`` finished and keep its published payloads for replay."""
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                return
            seen.finished = True
            seen.record = record
            self._bytes += _size(record)
            # Over the byte budget: forget the oldest answers' payloads (ids stay known).
            for old in self._seen.values():
                if self._bytes <= self.max_bytes:
                    break
                self._bytes -= _size(old.record)
                old.record = None

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            old = self._seen.pop(key, None)
            if old is not None:
                self._bytes -= _size(old.record)


def _size(record: list[bytes] | None) -> int:
    return sum(len(p) for p in record) if record else 0
