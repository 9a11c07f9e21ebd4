"""The SQLite file of server-side conversations, keyed by ``(client, session)``.

- **Turns.** One turn is what one request added: its non-system messages and the
  assistant's answer. Turns are stored and evicted whole, so a history never
  starts with an orphaned answer.
- **Bounds.** Per session at most ``session_max_messages`` messages and
  ``session_max_bytes`` bytes (the oldest turns are dropped when a new turn goes
  past either); per client at most ``sessions_per_client`` sessions and in all at
  most ``sessions_max`` (creating one more evicts the least recently used);
  sessions idle for ``session_ttl_s`` are deleted.
- **Threads.** One connection, used under a lock by the worker threads; WAL
  journal and a busy timeout so another process reading the file never fails a
  request. The file is opened on first use, so a bridge whose devices use no
  sessions never creates it.

What is sent from the store, and when a turn is added: :mod:`bridge.service.sessions`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bridge.protocol.errors import SessionStoreError
from bridge.protocol.messages import json_text

if TYPE_CHECKING:
    from bridge.config.settings import DeploymentConfig

# One logger for everything about sessions (bridge.service.sessions logs to it too).
log = logging.getLogger("bridge.service.sessions")

Message = dict[str, Any]
Turn = list[Message]

BUSY_TIMEOUT_MS = 5000
SCHEMA_VERSION = 2  # 2: sessions.backend (the backend that answered the last turn)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Bounds of the store (see the module docstring); from :class:`DeploymentConfig`."""

    max_messages: int = 200
    max_bytes: int = 128 * 1024
    per_client: int = 16
    max_sessions: int = 1000
    ttl_s: float = 30 * 86400.0

    @classmethod
    def from_config(cls, cfg: DeploymentConfig) -> SessionLimits:
        return cls(max_messages=cfg.session_max_messages, max_bytes=cfg.session_max_bytes,
                   per_client=cfg.sessions_per_client, max_sessions=cfg.sessions_max,
                   ttl_s=cfg.session_ttl_s)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What :meth:`SessionStore.append` had to do to stay within the bounds."""

    turns_dropped: int = 0
    sessions_evicted: int = 0
    turn_kept: bool = True


class ConversationStore(Protocol):
    """Where conversations live: :class:`SessionStore` (one SQLite file, one bridge) or
    :class:`bridge.service.redis_store.RedisSessionStore` (Redis/Valkey, every bridge).

    Both keep the semantics of the module docstring; their methods raise
    :class:`SessionStoreError` (retryable) when the store cannot be used.
    """

    limits: SessionLimits

    def history(self, client: str, session: str) -> list[Turn]: ...

    def last_backend(self, client: str, session: str) -> str | None: ...

    def sessions(self, client: str | None = None) -> list[tuple[str, str]]: ...

    def append(self, client: str, session: str, turn: Sequence[Message], *,
               backend: str | None = None) -> AppendResult: ...

    def clear(self, client: str, session: str) -> bool: ...

    def close(self) -> None: ...


def logged_append(client: str, session: str, result: AppendResult, messages: int,
                  size: int) -> AppendResult:
    """Log what an append did to stay within the bounds (either store); returns ``result``."""
    if result.turns_dropped or result.sessions_evicted:
        log.info("session %s/%s: dropped %d oldest turn(s), evicted %d other session(s) "
                 "to stay within the session limits", client, session, result.turns_dropped,
                 result.sessions_evicted)
    if not result.turn_kept:
        log.warning("session %s/%s: a turn of %d messages / %d bytes exceeds "
                    "session_max_messages/session_max_bytes and was not kept",
                    client, session, messages, size)
    return result


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    client   TEXT NOT NULL,
    session  TEXT NOT NULL,
    updated  REAL NOT NULL,
    messages INTEGER NOT NULL DEFAULT 0,
    bytes    INTEGER NOT NULL DEFAULT 0,
    backend  TEXT,
    PRIMARY KEY (client, session)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_age ON sessions (updated);
CREATE TABLE IF NOT EXISTS turns (
    client   TEXT NOT NULL,
    session  TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    body     TEXT NOT NULL,
    messages INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    PRIMARY KEY (client, session, seq)
) WITHOUT ROWID;
"""


class SessionStore:
    """The SQLite file of conversations, keyed by ``(client, session)``.

    Args:
        path: the database file (created with its directory on first use).
        limits: per-session, per-client and total bounds.
        clock: wall-clock time (tests pass a fake one).
    """

    def __init__(self, path: Path | str, limits: SessionLimits | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.limits = limits or SessionLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    # ------------------------------------------------------------------ connection

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("session store %s: journal mode is %s, not WAL", self.path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across crashes
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this bridge's ({SCHEMA_VERSION})")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
            if "backend" not in columns:  # a version 1 file
                conn.execute("ALTER TABLE sessions ADD COLUMN backend TEXT")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        log.info("session store %s opened", self.path)
        return conn

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; ``write`` wraps the body in one transaction."""
        with self._lock:
            if self._closed:
                raise SessionStoreError("the session store is closed (the bridge is stopping)")
            try:
                if self._conn is None:
                    self._conn = self._open()
                conn = self._conn
                if not write:
                    yield conn
                    return
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                raise SessionStoreError(
                    f"session store {self.path} failed: {exc}; check the sessions_db "
                    "path, its permissions and free disk space") from exc

    def close(self) -> None:
        """Close the database (idempotent); later calls raise :class:`SessionStoreError`."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ reading

    def history(self, client: str, session: str) -> list[Turn]:
        """The stored turns of a session, oldest first (empty if it does not exist)."""
        with self._db() as db:
            row = db.execute("SELECT updated FROM sessions WHERE client = ? AND session = ?",
                             (client, session)).fetchone()
            if row is None or self._expired(row[0]):
                return []
            rows = db.execute("SELECT body FROM turns WHERE client = ? AND session = ? "
                              "ORDER BY seq", (client, session)).fetchall()
        return [json.loads(body) for (body,) in rows]

    def last_backend(self, client: str, session: str) -> str | None:
        """The backend (its URL) that answered the session's last stored turn, if known."""
        with self._db() as db:
            row = db.execute("SELECT updated, backend FROM sessions WHERE client = ? AND "
                             "session = ?", (client, session)).fetchone()
        if row is None or self._expired(row[0]):
            return None
        return str(row[1]) if row[1] else None

    def sessions(self, client: str | None = None) -> list[tuple[str, str]]:
        """``(client, session)`` of every stored session (of one client), oldest use first."""
        # Expired sessions stay in the file until the next append sweeps them.
        since = self._clock() - self.limits.ttl_s if self.limits.ttl_s > 0 else float("-inf")
        with self._db() as db:
            if client is None:
                rows = db.execute("SELECT client, session FROM sessions WHERE updated >= ? "
                                  "ORDER BY updated", (since,))
            else:
                rows = db.execute("SELECT client, session FROM sessions WHERE client = ? "
                                  "AND updated >= ? ORDER BY updated", (client, since))
            return [(c, s) for c, s in rows.fetchall()]

    def _expired(self, updated: float) -> bool:
        return self.limits.ttl_s > 0 and updated < self._clock() - self.limits.ttl_s

    # ------------------------------------------------------------------ writing

    def append(self, client: str, session: str, turn: Sequence[Message], *,
               backend: str | None = None) -> AppendResult:
        """Store one turn (the request's new messages and the answer) at the end.

        ``backend`` (the URL of the llama-server that answered) is kept with the
        session: its next turn is sent there while it can take it (its prompt cache).

        Creating a session may evict the least recently used one of the client
        (``per_client``) or of all (``max_sessions``); a session past
        ``max_messages``/``max_bytes`` loses its oldest turns. A single turn larger
        than the bounds is not kept.
        """
        body = json_text(list(turn))
        size, count = len(body.encode()), len(turn)
        now = self._clock()
        evicted = dropped = 0
        kept = True
        with self._db(write=True) as db:
            exists = db.execute("SELECT updated FROM sessions WHERE client = ? AND session = ?",
                                (client, session)).fetchone()
            if exists is not None and self._expired(exists[0]):
                self._delete(db, client, session)
                exists = None
            if exists is None:
                evicted = self._make_room(db, client, now)
                db.execute("INSERT INTO sessions (client, session, updated) VALUES (?, ?, ?)",
                           (client, session, now))
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM turns "
                             "WHERE client = ? AND session = ?", (client, session)).fetchone()[0]
            db.execute("INSERT INTO turns (client, session, seq, body, messages, bytes) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (client, session, seq, body, count, size))
            db.execute("UPDATE sessions SET updated = ?, messages = messages + ?, "
                       "bytes = bytes + ?, backend = COALESCE(?, backend) "
                       "WHERE client = ? AND session = ?",
                       (now, count, size, backend, client, session))
            while True:
                messages, total = db.execute(
                    "SELECT messages, bytes FROM sessions WHERE client = ? AND session = ?",
                    (client, session)).fetchone()
                if messages <= self.limits.max_messages and total <= self.limits.max_bytes:
                    break
                oldest = db.execute("SELECT seq, messages, bytes FROM turns WHERE client = ? "
                                    "AND session = ? ORDER BY seq LIMIT 1",
                                    (client, session)).fetchone()
                if oldest is None:
                    break
                kept = kept and oldest[0] != seq
                db.execute("DELETE FROM turns WHERE client = ? AND session = ? AND seq = ?",
                           (client, session, oldest[0]))
                db.execute("UPDATE sessions SET messages = messages - ?, bytes = bytes - ? "
                           "WHERE client = ? AND session = ?",
                           (oldest[1], oldest[2], client, session))
                dropped += 1
        return logged_append(client, session, AppendResult(
            turns_dropped=dropped, sessions_evicted=evicted, turn_kept=kept), count, size)

    def _make_room(self, db: sqlite3.Connection, client: str, now: float) -> int:
        """Before creating a session: drop expired ones, then the LRU ones over the limits."""
        evicted = 0
        if self.limits.ttl_s > 0:
            for c, s in db.execute("SELECT client, session FROM sessions WHERE updated < ?",
                                   (now - self.limits.ttl_s,)).fetchall():
                self._delete(db, c, s)
        for where, args, limit in (("WHERE client = ?", (client,), self.limits.per_client),
                                   ("", (), self.limits.max_sessions)):
            (n,) = db.execute(f"SELECT COUNT(*) FROM sessions {where}", args).fetchone()
            if n >= limit:
                victims = db.execute(f"SELECT client, session FROM sessions {where} "
                                     "ORDER BY updated LIMIT ?", (*args, n - limit + 1))
                for c, s in victims.fetchall():
                    log.info("session %s/%s evicted (least recently used): %s", c, s,
                             "sessions_per_client reached" if where else "sessions_max reached")
                    self._delete(db, c, s)
                    evicted += 1
        return evicted

    @staticmethod
    def _delete(db: sqlite3.Connection, client: str, session: str) -> None:
        db.execute("DELETE FROM turns WHERE client = ? AND session = ?", (client, session))
        db.execute("DELETE FROM sessions WHERE client = ? AND session = ?", (client, session))

    def clear(self, client: str, session: str) -> bool:
        """Forget a session. Returns True if it existed (and had not expired)."""
        with self._db(write=True) as db:
            row = db.execute("SELECT updated FROM sessions WHERE client = ? AND session = ?",
                             (client, session)).fetchone()
            self._delete(db, client, session)
        return row is not None and not self._expired(row[0])


__all__ = ["AppendResult", "ConversationStore", "Message", "SessionLimits", "SessionStore",
           "SessionStoreError", "Turn", "logged_append"]
