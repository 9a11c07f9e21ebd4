"""Server-side conversations (a request's ``session``; README, *Sessions and profiles*).

A request with ``"session": "NAME"`` does not carry the conversation: the bridge
keeps it in SQLite (:mod:`bridge.service.session_store`), keyed by ``(client,
session)``, so a device with 2 KiB of RAM can hold a long dialogue. Before a session
request runs, the stored turns are put between the request's system message(s) and
its new message(s); after a successful answer the new message(s) and the answer are
stored as one more turn.

**Fitting the context.** The history sent is trimmed, oldest turns first and whole,
so that the prompt leaves room for ``max_tokens`` of answer (at most half the
context) in the backend's per-slot context (``/props`` ``n_ctx``). Tokens are
counted with llama-server's ``/tokenize`` (cached); when a cheap upper bound (UTF-8
bytes) already fits, nothing is counted. System messages and the new messages are
always sent. Trimmed turns stay in the store (another backend may have a larger
context); the store has its own bounds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bridge.protocol.errors import BackendError
from bridge.protocol.messages import ChatMessage, json_text
from bridge.service.session_store import (
    AppendResult,
    ConversationStore,
    Message,
    SessionLimits,
    SessionStore,
    Turn,
)

if TYPE_CHECKING:
    from bridge.config.settings import DeploymentConfig
    from bridge.llama.client import LlamaCppClient
    from bridge.service.intake import Accepted

log = logging.getLogger("bridge.service.sessions")

PER_MESSAGE_TOKENS = 8
"""Tokens a chat template adds around one message (role header, end marker); 5 for
ChatML, Gemma and Llama 3, so 8 leaves a margin."""
PROMPT_TOKENS = 32
"""Tokens a chat template adds once (BOS, the assistant header, date preambles)."""


# --------------------------------------------------------------------------- fitting the context


def _message_text(message: Message) -> str:
    parts = [str(message.get("content") or "")]
    for key in ("tool_calls", "name", "tool_call_id"):
        if message.get(key) is not None:
            parts.append(json_text(message[key]))
    return "\n".join(parts)


def byte_bound(message: Message) -> int:
    """An upper bound of a message's tokens without asking the server.

    Byte-fallback tokenizers (SentencePiece, byte-level BPE) never make more tokens
    than UTF-8 bytes; 2 more cover a leading-space marker.
    """
    return len(_message_text(message).encode()) + 2 + PER_MESSAGE_TOKENS


def fit_history(fixed: Sequence[Message], turns: Sequence[Turn], budget: int,
                count: Callable[[str], int]) -> tuple[list[Turn], int]:
    """The newest turns that fit in ``budget`` tokens next to the ``fixed`` messages.

    Args:
        fixed: messages always sent (system, the new ones, tool definitions).
        turns: the stored history, oldest first.
        budget: tokens the prompt may use.
        count: tokens of a text (``/tokenize``).
    Returns:
        ``(turns kept, number of oldest turns dropped)``. Turns are dropped oldest
        first and whole; a turn is never skipped to keep an older one.
    """
    every = [*fixed, *(m for turn in turns for m in turn)]
    if PROMPT_TOKENS + sum(byte_bound(m) for m in every) <= budget:
        return list(turns), 0  # even the upper bound fits: no need to count

    def cost(message: Message) -> int:
        return count(_message_text(message)) + PER_MESSAGE_TOKENS

    used = PROMPT_TOKENS + sum(cost(m) for m in fixed)
    kept = 0
    for turn in reversed(turns):
        need = sum(cost(m) for m in turn)
        if used + need > budget:
            break
        used += need
        kept += 1
    return list(turns[len(turns) - kept:]), len(turns) - kept


class TokenCounter:
    """``/tokenize`` counts per backend, cached (history turns are counted once).

    When the server cannot tokenize, the byte bound is used instead, so counting
    never fails a request.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._cache: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._lock = threading.Lock()

    def count(self, llama: LlamaCppClient, text: str) -> int:
        key = (llama.base_url, hashlib.blake2b(text.encode(), digest_size=16).digest())
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        try:
            n = llama.count_tokens(text)
        except BackendError as exc:
            log.warning("could not count tokens on %s (%s): using the byte bound",
                        llama.base_url, exc)
            return len(text.encode()) + 2
        with self._lock:
            self._cache[key] = n
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return n


class ContextSizes:
    """Each backend's per-slot context (``/props`` ``n_ctx``), re-read every ``ttl_s``."""

    def __init__(self, ttl_s: float = 60.0) -> None:
        self._ttl = ttl_s
        self._known: dict[str, tuple[float, int | None]] = {}
        self._lock = threading.Lock()

    def n_ctx(self, llama: LlamaCppClient) -> int | None:
        now = time.monotonic()
        with self._lock:
            cached = self._known.get(llama.base_url)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        try:
            n_ctx = llama.props().n_ctx
        except BackendError as exc:
            log.warning("could not read n_ctx from %s/props (%s): the history is not "
                        "trimmed to the context this time", llama.base_url, exc)
            return cached[1] if cached else None
        with self._lock:
            self._known[llama.base_url] = (now, n_ctx)
        return n_ctx


# --------------------------------------------------------------------------- the bridge's view


def as_chat(acc: Accepted) -> Accepted:
    """A session request's ``prompt`` is shorthand for one user message (a session is a chat)."""
    req = acc.request
    if req.session is None or req.prompt is None:
        return acc
    chat = req.model_copy(update={"messages": [ChatMessage(role="user", content=req.prompt)],
                                  "prompt": None})
    return dataclasses.replace(acc, request=chat)


class Sessions:
    """What the bridge does with sessions: build the conversation, store a turn, clear.

    Args:
        store: the database.
    """

    def __init__(self, store: ConversationStore) -> None:
        self.store = store
        self.tokens = TokenCounter()
        self.contexts = ContextSizes()

    @classmethod
    def from_config(cls, cfg: DeploymentConfig) -> Sessions:
        return cls(SessionStore(cfg.sessions_db, SessionLimits.from_config(cfg)))

    def conversation(self, client: str, session: str, messages: Sequence[Message], *,
                     llama: LlamaCppClient, max_tokens: int,
                     tools: list[dict[str, Any]] | None = None) -> list[Message]:
        """System message(s), then the stored turns that fit the context, then the new ones.

        Args:
            client, session: the session's key.
            messages: the request's messages (its system messages and new turn).
            llama: the backend that will answer (its context size and tokenizer).
            max_tokens: the answer's token limit, kept free (at most half the context).
            tools: tool definitions sent with the request (they use context too).
        """
        system = [m for m in messages if m.get("role") == "system"]
        new = [m for m in messages if m.get("role") != "system"]
        turns = self.store.history(client, session)
        if turns:
            n_ctx = self.contexts.n_ctx(llama)
            if n_ctx:
                budget = n_ctx - min(max_tokens, n_ctx // 2)
                fixed = system + new
                if tools:
                    fixed.append({"role": "system", "content": json_text(tools)})
                turns, dropped = fit_history(fixed, turns, budget,
                                             lambda text: self.tokens.count(llama, text))
                if dropped:
                    log.info("session %s/%s: left out the %d oldest turn(s) to fit "
                             "n_ctx=%d with max_tokens=%d", client, session, dropped, n_ctx,
                             max_tokens)
        return [*system, *(m for turn in turns for m in turn), *new]

    def remember(self, client: str, session: str, messages: Sequence[Message],
                 answer: Message, *, backend: str | None = None) -> AppendResult:
        """Store the request's non-system messages and the answer as one turn, and the
        backend (URL) that answered, where its next turn is best sent."""
        turn = [m for m in messages if m.get("role") != "system"]
        return self.store.append(client, session, [*turn, answer], backend=backend)

    def last_backend(self, client: str, session: str) -> str | None:
        """The URL of the backend that answered the session's last turn, if known."""
        return self.store.last_backend(client, session)

    def clear(self, client: str, session: str) -> bool:
        return self.store.clear(client, session)

    def close(self) -> None:
        self.store.close()


__all__ = ["PER_MESSAGE_TOKENS", "PROMPT_TOKENS", "Sessions", "as_chat", "byte_bound",
           "fit_history"]
