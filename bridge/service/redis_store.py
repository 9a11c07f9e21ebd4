"""Conversations in Redis or Valkey, shared by every bridge: :class:`RedisSessionStore`.

The semantics are those of :mod:`bridge.service.session_store` (turns stored and
evicted whole; per-session, per-client and total bounds; least-recently-used
eviction; idle sessions deleted), and they hold across bridges: an append and the
evictions it makes are one Lua script, so appends from several bridges never
interleave. Time is Redis's own (``TIME`` in the scripts), so bridges whose clocks
disagree still agree on which session is the oldest.

Keys (``NS`` is the bridge's topic ``prefix``; client and session names never
contain ``:``)::

    NS:session:CLIENT:SESSION:meta   hash: messages, bytes, backend
    NS:session:CLIENT:SESSION:turns  list, oldest first: "COUNT:JSON" per turn
    NS:session:lru                   sorted set of "CLIENT:SESSION", score = last append (µs)
    NS:session:lru:CLIENT            the same, for one client

Idle sessions go through Redis key expiry: every append sets ``PEXPIRE
session_ttl_s`` on the session's keys and on both sorted sets (a sorted set expires
only when its newest member has, so a client that never comes back leaves nothing).
Before counting, members whose keys expired are dropped from the sorted sets (by
score). Keys that go otherwise (a ``DEL``, or maxmemory eviction: give Redis
``maxmemory-policy noeviction``) are not listed, but their members count until they
are the least recently used, and are then dropped without counting as an eviction
(checking every member would cost 1.5 ms of Redis time per new session at 1000).

Every bridge on one Redis should have the same session limits: an append enforces
those of the bridge that makes it. Not for Redis Cluster: the append script evicts
sessions whose keys it cannot declare in advance.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis import exceptions as rx
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from bridge.protocol.errors import SessionStoreError
from bridge.protocol.messages import json_text
from bridge.service.session_store import (
    AppendResult,
    Message,
    SessionLimits,
    Turn,
    log,
    logged_append,
)

T = TypeVar("T")

HEALTH_CHECK_S = 10
"""A pooled connection idle this long is PINGed before use (a dead one is replaced)."""

_APPEND = """
local meta, turns, all, mine = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local base, member, item = ARGV[1], ARGV[2], ARGV[3]
local count, size = tonumber(ARGV[4]), tonumber(ARGV[5])
local has_backend, backend = ARGV[6], ARGV[7]
local max_messages, max_bytes = tonumber(ARGV[8]), tonumber(ARGV[9])
local per_client, max_sessions = tonumber(ARGV[10]), tonumber(ARGV[11])
local ttl_ms = tonumber(ARGV[12])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function forget(m)
  local existed = redis.call('DEL', base .. m .. ':meta', base .. m .. ':turns') > 0
  redis.call('ZREM', all, m)
  redis.call('ZREM', base .. 'lru:' .. string.match(m, '^[^:]*'), m)
  return existed
end

local evicted = {}
if redis.call('EXISTS', meta) == 0 then
  redis.call('DEL', turns)
  if ttl_ms > 0 then
    local cutoff = '(' .. string.format('%.0f', now - ttl_ms * 1000)
    redis.call('ZREMRANGEBYSCORE', all, '-inf', cutoff)
    redis.call('ZREMRANGEBYSCORE', mine, '-inf', cutoff)
  end
  local scopes = {{mine, per_client, 'sessions_per_client'}, {all, max_sessions, 'sessions_max'}}
  for _, scope in ipairs(scopes) do
    local n = redis.call('ZCARD', scope[1])
    while n >= scope[2] do
      local oldest = redis.call('ZRANGE', scope[1], 0, 0)[1]
      if not oldest then break end
      if forget(oldest) then
        evicted[#evicted + 1] = oldest
        evicted[#evicted + 1] = scope[3]
      end
      n = n - 1
    end
  end
end

redis.call('RPUSH', turns, item)
local messages = redis.call('HINCRBY', meta, 'messages', count)
local bytes = redis.call('HINCRBY', meta, 'bytes', size)
if has_backend == '1' then redis.call('HSET', meta, 'backend', backend) end
local score = string.format('%.0f', now)
redis.call('ZADD', all, score, member)
redis.call('ZADD', mine, score, member)

local dropped, kept = 0, 1
while messages > max_messages or bytes > max_bytes do
  local oldest = redis.call('LPOP', turns)
  if not oldest then break end
  local n, start = string.match(oldest, '^(%d+):()')
  messages = redis.call('HINCRBY', meta, 'messages', -tonumber(n))
  bytes = redis.call('HINCRBY', meta, 'bytes', -(#oldest - start + 1))
  dropped = dropped + 1
  if redis.call('LLEN', turns) == 0 then kept = 0 end
end

for _, key in ipairs({meta, turns, all, mine}) do
  if ttl_ms > 0 then redis.call('PEXPIRE', key, ttl_ms) else redis.call('PERSIST', key) end
end
return {dropped, kept, evicted}
"""

_SESSIONS = """
local min = '-inf'
local ttl_ms = tonumber(ARGV[2])
if ttl_ms > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  min = '(' .. string.format('%.0f', now - ttl_ms * 1000)
end
local live = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], min, '+inf')) do
  if redis.call('EXISTS', ARGV[1] .. m .. ':meta') == 1 then live[#live + 1] = m end
end
return live
"""

_CLEAR = """
local existed = redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return existed
"""


# --------------------------------------------------------------------------- connecting


def open_redis(url: str, *, timeout_s: float = 2.0) -> redis.Redis:
    """A client and its connection pool for ``sessions_url``; it connects on first use.

    Args:
        url: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, or ``rediss://`` for TLS.
            TLS options go in the query string: ``?ssl_ca_certs=/etc/redis/ca.crt``
            (a private CA's certificate), ``ssl_certfile``/``ssl_keyfile`` (a client
            certificate), ``ssl_cert_reqs=none`` (no verification: tests only).
            Query parameters win over the arguments here.
        timeout_s: every connect and every reply must come within this.

    A connection error (refused, reset: Redis restarted) is retried once, 0.1 s later,
    on a new connection; a timeout is not retried, since the command (an append) may
    have run. So a call fails in about 0.1 s when Redis is down (connection refused)
    and in ``timeout_s`` (at most about twice that) when it does not answer, and the
    client reconnects by itself once Redis is back. A connection idle for
    ``HEALTH_CHECK_S`` is PINGed before use; TCP keepalive is on, and redis-py sets
    TCP_NODELAY on every TCP connection itself (``Connection._connect``, redis-py 8.1).

    Raises:
        ValueError: the URL cannot be parsed.
    """
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1,
                  supported_errors=(rx.ConnectionError,))
    return redis.Redis.from_url(url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s,
                                health_check_interval=HEALTH_CHECK_S, retry=retry,
                                socket_keepalive=True)


_QUERY_PASSWORD = re.compile(r"(?i)((?:^|&)password=)[^&]*")
_USERINFO = re.compile(r"(://[^:@/]*:)[^/]*@")


def redact(url: str) -> str:
    """``url`` with its password (user info or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _QUERY_PASSWORD.sub(r"\1***", _USERINFO.sub(r"\1***@", url))
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else netloc
    query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# --------------------------------------------------------------------------- the store


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_failure(exc: rx.RedisError, client: redis.Redis, *, where: str,
                  namespace: str) -> SessionStoreError:
    """A Redis failure as :class:`SessionStoreError`: what happened and what to change for
    the log (``where`` is the URL without its password), the kind of failure for devices.

    Args:
        exc: what redis-py raised.
        client: the client it came from (its password is masked in the message).
        where: the redacted URL.
        namespace: the key prefix (the ACL hint names it).
    """
    cause = str(exc) or type(exc).__name__
    kwargs = client.connection_pool.connection_kwargs
    password = kwargs.get("password")
    if password:
        cause = cause.replace(str(password), "***")
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError) \
            or cause.startswith(("NOAUTH", "WRONGPASS")):
        what, fix = "authentication failed", \
            "check the user name and password in sessions_url"
    elif isinstance(exc, rx.NoPermissionError):
        what, fix = "denied a command (ACL)", \
            f"give the user of sessions_url ~{namespace}:* +@read +@write +@scripting +time"
    elif isinstance(exc, rx.BusyLoadingError):
        what, fix = "is loading its data", "wait until it has loaded"
    elif isinstance(exc, rx.ConnectionError) and ("SSL" in cause or "certificate" in cause):
        what, fix = "TLS handshake failed", \
            "check the certificates (ssl_ca_certs=CA file in sessions_url) and the port"
    elif isinstance(exc, rx.ConnectionError):
        what, fix = "unreachable", "check sessions_url and that Redis is running"
    elif isinstance(exc, rx.TimeoutError):
        what = f"did not answer within {kwargs.get('socket_timeout')} s"
        fix = "check that Redis is running and not overloaded"
    elif isinstance(exc, rx.OutOfMemoryError):
        what, fix = "is out of memory", \
            "raise its maxmemory, or lower sessions_max or session_max_bytes"
    elif isinstance(exc, rx.ReadOnlyError):
        what, fix = "is a read-only replica", "point sessions_url at the primary"
    elif isinstance(exc, rx.ResponseError):
        what, fix = "refused a command", "it must be Redis 6.2+ or Valkey 7+"
    else:
        what, fix = "failed", "check sessions_url and the Redis log"
    return SessionStoreError(f"session store {where} {what}: {cause}; {fix}",
                             public=f"session store unavailable ({what}); try again later")


class RedisSessionStore:
    """Conversations in Redis/Valkey, keyed by ``(client, session)``, shared by bridges.

    Args:
        client: from :func:`open_redis`; the store owns it (:meth:`close` closes it).
        limits: per-session, per-client and total bounds.
        namespace: the first part of every key (the bridge's topic ``prefix``).
        where: the Redis URL without its password (:func:`redact`), for messages.
    """

    def __init__(self, client: redis.Redis, limits: SessionLimits | None = None, *,
                 namespace: str = "llm", where: str = "redis") -> None:
        self.limits = limits or SessionLimits()
        self.where = where
        self._client = client
        self._namespace = namespace
        self._base = f"{namespace}:session:"
        self._append = client.register_script(_APPEND)
        self._sessions = client.register_script(_SESSIONS)
        self._clear = client.register_script(_CLEAR)
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ plumbing

    def _keys(self, client: str, session: str) -> list[str]:
        """meta, turns, the overall sorted set, the client's sorted set."""
        if ":" in client or ":" in session:
            raise ValueError(f"client and session names cannot contain ':': {client!r}, "
                             f"{session!r}")
        key = f"{self._base}{client}:{session}"
        return [f"{key}:meta", f"{key}:turns", f"{self._base}lru", f"{self._base}lru:{client}"]

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.limits.ttl_s * 1000)) if self.limits.ttl_s > 0 else 0

    def _run(self, call: Callable[[], T]) -> T:
        """``call()``, with any Redis failure turned into a :class:`SessionStoreError`."""
        if self._closed:
            raise SessionStoreError("the session store is closed (the bridge is stopping)")
        try:
            return call()
        except rx.RedisError as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: rx.RedisError) -> SessionStoreError:
        return redis_failure(exc, self._client, where=self.where, namespace=self._namespace)

    def close(self) -> None:
        """Close the connection pool (idempotent); later calls raise SessionStoreError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()
        self._client.connection_pool.disconnect()

    # ------------------------------------------------------------------ reading

    def history(self, client: str, session: str) -> list[Turn]:
        """The stored turns of a session, oldest first (empty if it does not exist)."""
        turns_key = self._keys(client, session)[1]
        items: list[bytes | str] = self._run(lambda: self._client.lrange(turns_key, 0, -1))
        try:
            return [json.loads(_text(item).split(":", 1)[1]) for item in items]
        except (ValueError, IndexError) as exc:
            raise SessionStoreError(f"session store {self.where}: {turns_key} is not a "
                                    f"list of turns ({exc}); was it written by another "
                                    "program? clear the session") from exc

    def last_backend(self, client: str, session: str) -> str | None:
        """The backend (its URL) that answered the session's last stored turn, if known."""
        meta = self._keys(client, session)[0]
        value: bytes | str | None = self._run(lambda: self._client.hget(meta, "backend"))
        return (_text(value) or None) if value is not None else None

    def sessions(self, client: str | None = None) -> list[tuple[str, str]]:
        """``(client, session)`` of every stored session (of one client), oldest use first."""
        key = f"{self._base}lru" if client is None else self._keys(client, "-")[3]
        members: list[bytes | str] = self._run(
            lambda: self._sessions(keys=[key], args=[self._base, self._ttl_ms]))
        pairs = (_text(m).split(":", 1) for m in members)
        return [(c, s) for c, s in pairs]

    # ------------------------------------------------------------------ writing

    def append(self, client: str, session: str, turn: Sequence[Message], *,
               backend: str | None = None) -> AppendResult:
        """Store one turn (the request's new messages and the answer) at the end.

        ``backend`` (the URL of the llama-server that answered) is kept with the
        session; None keeps the one stored before.

        Creating a session may evict the least recently used one of the client
        (``per_client``) or of all (``max_sessions``); a session past
        ``max_messages``/``max_bytes`` loses its oldest turns. A single turn larger
        than the bounds is not kept.
        """
        keys = self._keys(client, session)
        body = json_text(list(turn))
        size, count = len(body.encode()), len(turn)
        lim = self.limits
        args: list[str | int] = [self._base, f"{client}:{session}", f"{count}:{body}", count, size,
                "0" if backend is None else "1", backend or "", lim.max_messages,
                lim.max_bytes, lim.per_client, lim.max_sessions, self._ttl_ms]
        reply: list[Any] = self._run(lambda: self._append(keys=keys, args=args))
        dropped, kept, victims = int(reply[0]), bool(reply[1]), reply[2]
        for i in range(0, len(victims), 2):
            c, s = _text(victims[i]).split(":", 1)
            log.info("session %s/%s evicted (least recently used): %s reached", c, s,
                     _text(victims[i + 1]))
        evicted = len(victims) // 2
        return logged_append(client, session, AppendResult(
            turns_dropped=dropped, sessions_evicted=evicted, turn_kept=kept), count, size)

    def clear(self, client: str, session: str) -> bool:
        """Forget a session. Returns True if it existed."""
        keys = self._keys(client, session)
        existed: int = self._run(lambda: self._clear(keys=keys, args=[f"{client}:{session}"]))
        return int(existed) > 0


__all__ = ["HEALTH_CHECK_S", "RedisSessionStore", "open_redis", "redact", "redis_failure"]
