"""What several bridges agree on through Redis/Valkey (``sessions_url``): who runs a
request, whose turn a session is, and the answers kept for resends.

- **Requests.** Before a request gets its ``start``, its bridge *claims* ``(client, id)``
  with a lease: a key that expires ``session_lease_s`` after its last renewal. A resend
  that reaches another bridge while the lease lives is not run again (the answer is on
  its way); once the request is answered the key says so for ``dedupe_ttl_s``, with the
  published messages (up to the reply channel's 512 KiB), which a resend gets again
  from whichever bridge it reaches. A
  request that ends in an error before any text releases its claim, so a retry runs.
- **Session turns.** A session's turn runs only while its bridge holds the session's
  lease, taken when a worker starts the turn and given back after its terminal message:
  the next turn, on any bridge, waits for it and then reads the history it stored.
- **Crashes.** A bridge renews its leases every third of ``session_lease_s``; a crashed
  bridge's leases end at most ``session_lease_s`` after it died, and its requests and
  sessions are free again.
- **Redis away.** Every call has a socket timeout; after a failure the next
  :data:`RETRY_S` seconds fail at once (no request waits on a dead socket), then redis-py
  reconnects on the next call. Requests that need Redis (sessions) end with a retryable
  error naming the cause; the others run, checked for duplicates by this bridge only.

Keys, under ``{prefix}:``: ``req:{client}:{id}`` (``run:{owner}`` or ``done``),
``answer:{client}:{id}`` (a list of the published payloads) and
``turn:{client}:{session}`` (the owner of the running turn).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis

from bridge.protocol.errors import SessionStoreError
from bridge.service.redis_store import redis_failure

log = logging.getLogger("bridge.service.shared")

RETRY_S = 1.0
"""After Redis failed, calls fail at once for this long instead of each waiting for it."""
MAX_KEPT_ANSWER_MESSAGES = 4000
"""An answer of more messages is not kept for resends (its id is): the script's unpack()
takes at most about 8000 values. The reply channel bounds its bytes (512 KiB)."""

_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {'mine'}
end
if v == ARGV[1] then return {'mine'} end
if v == 'done' then
  local answer = redis.call('LRANGE', KEYS[2], 0, -1)
  table.insert(answer, 1, 'done')
  return answer
end
return {'running', v}
"""
_FINISH = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if #ARGV > 2 then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, 3))
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_FORGET = """
if redis.call('GET', KEYS[1]) == 'done' then return redis.call('DEL', KEYS[1], KEYS[2]) end
return 0
"""
_RENEW = """
local renewed = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    renewed = renewed + 1
  end
end
return renewed
"""


class ClaimState(Enum):
    mine = "mine"
    running = "running"
    finished = "finished"


@dataclass(frozen=True, slots=True)
class Claim:
    """What :meth:`SharedState.claim` found.

    Attributes:
        state: ``mine`` (run it), ``running`` (another bridge runs it) or ``finished``.
        holder: for ``running``, the bridge that holds it.
        record: for ``finished``, the published payloads, if kept.
    """

    state: ClaimState
    holder: str | None = None
    record: list[bytes] | None = None


class SharedState:
    """Claims, session turns and leases of several bridges, in Redis.

    Args:
        client: the Redis connection pool (shared with the session store).
        prefix: the key prefix (the topic prefix: deployments sharing a Redis stay apart).
        bridge_id: this bridge's id (in lease values, for the log).
        lease_s: ``session_lease_s``.
        answer_ttl_s: how long an answered request's id and answer are kept
            (``dedupe_ttl_s``).
        where: the Redis URL without its password, for messages.
    """

    def __init__(self, client: redis.Redis, *, prefix: str, bridge_id: str, lease_s: float,
                 answer_ttl_s: float, where: str) -> None:
        self._redis = client
        self._prefix = prefix
        # Unique per process: a restarted bridge must not take its dead self's leases.
        self.owner = f"{bridge_id}/{uuid.uuid4().hex[:12]}"
        self.lease_ms = int(lease_s * 1000)
        self.answer_ttl_ms = max(1, int(answer_ttl_s * 1000))
        self.where = where
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._forget = client.register_script(_FORGET)
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, str] = {}  # key -> value, renewed until given back
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down: SessionStoreError | None = None  # the last failure, while not recovered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="bridge-leases",
                                        daemon=True)

    # ------------------------------------------------------------------ health

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one Redis call; every failure becomes :class:`SessionStoreError`."""
        now = time.monotonic()
        down = self._down
        if now < self._down_until and down is not None:  # a new object: no growing traceback
            raise SessionStoreError(down.message, public=down.public_message)
        try:
            result = fn(*args, **kwargs)
        except redis.RedisError as exc:
            was_up = self._down is None
            self._down = redis_failure(exc, self._redis, where=self.where,
                                       namespace=self._prefix)
            self._down_until = time.monotonic() + RETRY_S
            if was_up:
                log.error("%s (%s); the bridge retries by itself", self._down.message, what)
            raise self._down from exc
        if self._down is not None:
            self._down = None
            log.warning("session store %s reachable again", self.where)
            self._down_until = 0.0
        return result

    def check(self) -> bool:
        """Ping Redis once (at start): True if it answered; a failure is logged."""
        try:
            self._call("ping", self._redis.ping)
        except SessionStoreError:
            return False
        log.info("session store %s reachable: sessions, duplicates and leases are shared "
                 "with the other bridges", self.where)
        return True

    @property
    def available(self) -> bool:
        """False after a failure until a call succeeds again."""
        return self._down is None

    # ------------------------------------------------------------------ requests

    def _keys(self, client: str, request_id: str) -> tuple[str, str]:
        return (f"{self._prefix}:req:{client}:{request_id}",
                f"{self._prefix}:answer:{client}:{request_id}")

    def claim(self, client: str, request_id: str) -> Claim:
        """Claim ``(client, id)`` for this bridge, or say who has it.

        Raises:
            SessionStoreError: Redis cannot be used (retryable).
        """
        req, answer = self._keys(client, request_id)
        value = f"run:{self.owner}"
        found = self._call("claim", self._claim, keys=[req, answer],
                           args=[value, self.lease_ms])
        assert isinstance(found, list) and found
        head = _text(found[0])
        if head == "mine":
            self._hold(req, value)
            return Claim(ClaimState.mine)
        if head == "done":
            return Claim(ClaimState.finished, record=[bytes(p) for p in found[1:]] or None)
        holder = _text(found[1]).removeprefix("run:") if len(found) > 1 else None
        return Claim(ClaimState.running, holder=holder)

    def finished(self, client: str, request_id: str, record: list[bytes] | None) -> None:
        """Mark a claimed request answered, keeping ``record`` (the published payloads;
        None: too large to keep) for resends."""
        req, answer = self._keys(client, request_id)
        value = self._unhold(req) or f"run:{self.owner}"
        kept = record if record and len(record) <= MAX_KEPT_ANSWER_MESSAGES else []
        try:
            done = self._call("finish", self._finish, keys=[req, answer],
                              args=[value, self.answer_ttl_ms, *kept])
        except SessionStoreError as exc:
            log.warning("request %s/%s: not marked answered in the shared store (a resend "
                        "to another bridge runs it again once its lease ends): %s",
                        client, request_id, exc)
            return
        if not done:
            log.warning("request %s/%s: its lease had ended and another bridge claimed it",
                        client, request_id)

    def release(self, client: str, request_id: str) -> None:
        """Give a claim back (the request was not answered: a resend must run)."""
        req, _ = self._keys(client, request_id)
        self._give_back(req, f"request {client}/{request_id}")

    def forget(self, client: str, request_id: str) -> None:
        """Forget an answered request after all (the broker refused its terminal message):
        a resend runs again instead of replaying an answer the device never got."""
        req, answer = self._keys(client, request_id)
        try:
            self._call("forget", self._forget, keys=[req, answer])
        except SessionStoreError as exc:
            log.warning("request %s/%s: still marked answered in the shared store (a resend "
                        "replays it): %s", client, request_id, exc)

    # ------------------------------------------------------------------ session turns

    def take_turn(self, client: str, session: str, request_id: str) -> str | None:
        """Take the session's turn if free.

        Returns:
            None if taken, else the holder (``bridge-id/…:request id``).
        Raises:
            SessionStoreError: Redis cannot be used.
        """
        key = f"{self._prefix}:turn:{client}:{session}"
        value = f"{self.owner}:{request_id}"
        taken = self._call("take turn", self._redis.set, key, value, nx=True, px=self.lease_ms)
        if taken:
            self._hold(key, value)
            return None
        holder = self._call("read turn", self._redis.get, key)
        return _text(holder) if holder is not None else ""

    def give_turn(self, client: str, session: str) -> None:
        """Give the session's turn back (after the turn's terminal message)."""
        key = f"{self._prefix}:turn:{client}:{session}"
        self._give_back(key, f"session {client}/{session}")

    # ------------------------------------------------------------------ leases

    def _hold(self, key: str, value: str) -> None:
        with self._lock:
            self._held[key] = value

    def _unhold(self, key: str) -> str | None:
        with self._lock:
            return self._held.pop(key, None)

    def _give_back(self, key: str, what: str) -> None:
        value = self._unhold(key)
        if value is None:
            return
        try:
            self._call("release", self._release, keys=[key], args=[value])
        except SessionStoreError as exc:
            log.warning("%s: lease not given back (it ends by itself in %.0f s): %s",
                        what, self.lease_ms / 1000, exc)

    @property
    def held(self) -> int:
        """Leases this bridge holds now."""
        with self._lock:
            return len(self._held)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (leases still held end by themselves) and close the pool."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _renew_loop(self) -> None:
        interval = self.lease_ms / 3000
        while not self._stop.wait(interval):
            with self._lock:
                held = list(self._held.items())
            if not held:
                continue
            try:
                renewed = self._call("renew", self._renew, keys=[k for k, _ in held],
                                     args=[self.lease_ms, *(v for _, v in held)])
            except SessionStoreError:
                continue  # logged once by _call; retried next round
            if isinstance(renewed, int) and renewed < len(held):
                log.warning("%d of %d leases had ended before renewal (Redis was away "
                            "longer than session_lease_s?)", len(held) - renewed, len(held))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["MAX_KEPT_ANSWER_MESSAGES", "RETRY_S", "Claim",
           "ClaimState", "SharedState"]
