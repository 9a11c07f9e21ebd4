"""Turn a stream of text deltas into size-bounded ``chunk`` reply payloads.

See docs/protocol.md, *Reply messages*.

This is the bridge's hot path: one :meth:`Chunker.feed` per generated token. The
common case (a short delta that fits the buffer) costs one C-level JSON escape of
the delta, a length and an append; the buffer is escaped and encoded once per
published chunk, and the grapheme scanner (``regex`` ``\\X``) runs only when a chunk
must be cut somewhere the cheap ASCII test cannot vouch for.

Payloads are spelled by hand (``{"type":"chunk","id":…,"seq":…,"text":…}``) instead
of through pydantic; the tests check them against :class:`bridge.protocol.messages.ChunkMsg`.
"""

from __future__ import annotations

import math
import re
import time
from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate
from json.encoder import encode_basestring
from typing import Literal

import regex

from bridge.protocol.topics import MAX_ID_CHARS

MIN_CHUNK_BYTES = 128
"""Smallest ``chunk_bytes`` a request or the configuration may ask for. A request's
``max_packet`` may make its chunks smaller (bridge.protocol.fit.smallest_payload)."""

_MAX_SEQ_DIGITS = 10
MAX_SEQ = 10**_MAX_SEQ_DIGITS - 1
"""The largest ``seq`` the sizes of chunks (and of a request's smallest messages) allow for."""
_MAX_ESCAPED_CHAR = 6  # the widest escaped code point: a control char as \u00XX
_MAX_CTX_CHARS = 64  # cap on the carried grapheme context (a never-ending run of marks)

# C-accelerated json.dumps(s, ensure_ascii=False) for one str: '"' + escaped + '"'.
_esc: Callable[[str], str] = encode_basestring
_GRAPHEME = regex.compile(r"\X")
_SURROGATE = re.compile("[\ud800-\udfff]")


def escaped_len(text: str) -> int:
    """Byte length of ``text`` as a JSON string body (UTF-8, ``ensure_ascii=False``, no quotes).

    ``"`` and ``\\`` count 2 bytes, ``\\n`` 2, other control chars 6 (``\\u0001``),
    everything else its UTF-8 length (a lone surrogate counts as the 3 bytes of the
    U+FFFD that :meth:`Chunker.feed` replaces it with).

    Args:
        text: any string.
    Returns:
        the number of bytes ``text`` adds between the quotes of a JSON payload.
    """
    e = _esc(text)
    if e.isascii():
        return len(e) - 2
    return len(e.encode("utf-8", "surrogatepass")) - 2


def _ascii_break(left: str, right: str) -> bool:
    """True if there is certainly a grapheme boundary between chars ``left`` and ``right``.

    Between two ASCII chars UAX #29 always breaks except inside CR LF; anything
    else needs the real segmenter.
    """
    return left < "\x80" and right < "\x80" and not (left == "\r" and right == "\n")


def _tail_cluster(ctx: str, text: str) -> str:
    """The last grapheme cluster of ``ctx + text`` (the context later text is segmented in).

    Segmentation after a true boundary does not depend on earlier text, so the last
    (possibly unfinished) cluster is all the context the next piece needs.
    """
    if text[-1] < "\x80":
        # An ASCII char ends every cluster that could matter: only Extend/ZWJ/SpacingMark
        # (or LF after CR) can join it, and they join it whatever precedes it.
        return text[-1]
    last: str = _GRAPHEME.findall(ctx + text)[-1]
    return last[-_MAX_CTX_CHARS:]


def _cut(text: str, start: int, budget: int, ctx: str) -> tuple[int, bool]:
    """Where to end a chunk that starts at ``text[start]`` and cannot take all of the rest.

    Args:
        text: the text being chunked; ``text[start:]`` does not fit ``budget``.
        start: index of the chunk's first char.
        budget: bytes available for the escaped chunk text.
        ctx: grapheme context preceding ``text[start]`` ("" if ``start`` is a known boundary).
    Returns:
        ``(end, clean)``: the chunk is ``text[start:end]``; ``clean`` is True if ``end``
        is a grapheme boundary, False if a single grapheme larger than the budget had
        to be cut between code points.
    Raises:
        ValueError: not even one code point fits ``budget``.
    """
    end = min(len(text), start + budget)  # every code point escapes to >= 1 byte
    if escaped_len(text[start:end]) <= budget:
        k = end
    else:
        # Largest k with escaped_len(text[start:k]) <= budget; monotone, so bisect.
        # Each code point escapes to <= 6 bytes, so budget // 6 of them always fit.
        lo, hi = start + budget // _MAX_ESCAPED_CHAR, end
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if escaped_len(text[start:mid]) <= budget:
                lo = mid
            else:
                hi = mid
        k = lo
    if k <= start:
        raise ValueError(f"a chunk budget of {budget} bytes cannot hold one character")
    if _ascii_break(text[k - 1], text[k]):
        return k, True
    # Boundaries of ctx + text[start:k+1] below its end are those of the full text:
    # UAX #29 decides each boundary from the text before it and one char after it.
    window = ctx + text[start:k + 1]
    bounds = list(accumulate(map(len, _GRAPHEME.findall(window))))
    i = bisect_right(bounds, len(ctx) + k - start) - 1
    if i >= 0 and bounds[i] > len(ctx):
        return start + bounds[i] - len(ctx), True
    return k, False


def split_to_fit(text: str, budget_bytes: int) -> tuple[str, str]:
    """Split ``text`` into the longest head whose escaped size fits, and the rest.

    The head ends at a grapheme-cluster boundary unless its first grapheme alone is
    larger than ``budget_bytes``, in which case that grapheme is cut between code points.

    Args:
        text: the text to split (taken to start at a grapheme boundary).
        budget_bytes: bytes available for the escaped head (see :func:`escaped_len`).
    Returns:
        ``(head, tail)`` with ``head + tail == text``; ``tail`` is "" if all of it fits.
    Raises:
        ValueError: not even one code point of ``text`` fits ``budget_bytes``.
    """
    if len(text) <= budget_bytes and escaped_len(text) <= budget_bytes:
        return text, ""
    end, _ = _cut(text, 0, budget_bytes, "")
    return text[:end], text[end:]


def smallest_chunk_bytes(request_id: str, field: Literal["text", "reasoning"] = "text") -> int:
    """The smallest ``chunk_bytes`` a :class:`Chunker` for this request id takes: the envelope,
    a ``seq`` up to :data:`MAX_SEQ` and one character escaped at its widest."""
    envelope = '{"type":"chunk","id":' + _esc(request_id) + ',"seq":,"' + field + '":""}'
    return len(envelope.encode()) + _MAX_SEQ_DIGITS + _MAX_ESCAPED_CHAR


class SeqCounter:
    """The ``seq`` of one request's reply messages, shared by every message type.

    Args:
        start: the seq the first message gets (0 for a new request).
    """

    __slots__ = ("_next",)

    def __init__(self, start: int = 0) -> None:
        if start < 0:
            raise ValueError(f"seq starts at 0 or more, not {start}")
        self._next = start

    @property
    def next(self) -> int:
        """The seq the next message will get."""
        return self._next

    def take(self) -> int:
        """Claim a seq for a message being built now.

        Returns:
            the seq to put in the message (the counter moves on by one).
        """
        n = self._next
        self._next = n + 1
        return n


class Chunker:
    """Coalesce one request's text deltas into ``chunk`` payloads of at most ``chunk_bytes``.

    The first delta is published at once (time to first token); later ones are
    buffered until the next would not fit, or until ``flush_s`` after the first
    buffered one (call :meth:`poll` at :meth:`due`). ``flush_s == 0`` publishes every
    delta at once. Chunk texts concatenate to exactly the fed text (lone surrogates,
    which UTF-8 cannot carry, become U+FFFD). Cuts fall on code-point boundaries and,
    whenever the chunker chooses where to cut, on grapheme-cluster boundaries.

    A buffer that fills up exactly is held until the next delta or the deadline: the
    next delta may continue its last grapheme (a combining mark, a ZWJ sequence).

    Args:
        request_id: the request's id (1 to :data:`~bridge.protocol.topics.MAX_ID_CHARS` chars).
        seq: the request's seq counter; a seq is taken when each payload is built.
        chunk_bytes: the bound on every payload's size, envelope and escaping included.
        flush_s: longest time text waits in the buffer; 0 for one chunk per delta.
        field: ``text`` for answer text, ``reasoning`` for reasoning text.
        clock: monotonic time in seconds (injectable for tests).
    Raises:
        ValueError: ``chunk_bytes`` too small for the envelope and one escaped character
            (below :data:`MIN_CHUNK_BYTES` only when a device's ``max_packet`` asks for it),
            bad id, negative or NaN ``flush_s``, unknown ``field``.
    """

    __slots__ = ("_base", "_clock", "_ctx", "_deadline", "_esc_len", "_flush_s", "_head",
                 "_mid", "_parts", "_seq", "_started")

    def __init__(self, request_id: str, seq: SeqCounter, *, chunk_bytes: int, flush_s: float,
                 field: Literal["text", "reasoning"] = "text",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if field not in ("text", "reasoning"):
            raise ValueError(f"field must be 'text' or 'reasoning', not {field!r}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
            raise ValueError(f"chunk_bytes must be an int, not {chunk_bytes!r}")
        if not 1 <= len(request_id) <= MAX_ID_CHARS:
            raise ValueError(f"request id must be 1-{MAX_ID_CHARS} chars, got {len(request_id)}")
        if math.isnan(flush_s) or flush_s < 0:
            raise ValueError(f"flush_s must be >= 0, not {flush_s}")
        if chunk_bytes < smallest_chunk_bytes(request_id, field):
            raise ValueError(f"chunk_bytes={chunk_bytes} leaves no room for text after the "
                             f"envelope of request {request_id!r}")
        self._head = '{"type":"chunk","id":' + _esc(request_id) + ',"seq":'
        self._mid = ',"' + field + '":'
        # Bytes left for the escaped text once the envelope minus the seq digits is paid.
        self._base = chunk_bytes - len((self._head + self._mid + '""}').encode())
        self._seq = seq
        self._flush_s = float(flush_s)
        self._clock = clock
        self._parts: list[str] = []  # buffered deltas, joined once per chunk
        self._esc_len = 0  # escaped byte length of the buffer
        self._deadline = math.inf  # meaningful only while the buffer is not empty
        self._ctx = ""  # grapheme context preceding the buffer ("" = known boundary)
        self._started = False

    @property
    def pending(self) -> bool:
        """True while text is buffered."""
        return bool(self._parts)

    def due(self) -> float | None:
        """The ``clock()`` time by which the buffered text must be published.

        Returns:
            the deadline, or None if nothing is buffered.
        """
        return self._deadline if self._parts else None

    def feed(self, text: str) -> list[bytes]:
        """Take one delta.

        Args:
            text: the delta (empty ones are ignored).
        Returns:
            the payloads to publish now, in seq order (often none).
        """
        if not text:
            return []
        e = _esc(text)
        if e.isascii():
            n = len(e) - 2
        else:
            try:
                n = len(e.encode()) - 2
            except UnicodeEncodeError:  # lone surrogates (e.g. from "\ud800" in SSE JSON)
                text = _SURROGATE.sub("\ufffd", text)
                e = _esc(text)
                n = escaped_len(text)
        if not self._started or self._flush_s == 0.0:
            self._started = True  # first token goes out at once; per-token mode never buffers
            seq = self._seq._next
            if n <= self._base - len(str(seq)):  # the usual delta: one payload, built here
                self._seq._next = seq + 1
                self._ctx = _tail_cluster(self._ctx, text)
                return [f"{self._head}{seq}{self._mid}{e}}}".encode()]
            return self._drain(text, keep_tail=False, clean_end=False)
        parts = self._parts
        now = self._clock()
        if parts and now >= self._deadline:
            # Overdue (nobody polled): publish it together with the new delta.
            parts.append(text)
            return self.flush()
        # The seq's digit count is part of the envelope; _next is read directly (same
        # module) because a property call per token is measurable on this path.
        if self._esc_len + n <= self._base - len(str(self._seq._next)):
            if not parts:
                self._deadline = now + self._flush_s
            parts.append(text)
            self._esc_len += n
            return []
        return self._overflow(text, now)

    def flush(self) -> list[bytes]:
        """Publish everything buffered (end of stream, or before another message type).

        Returns:
            the payloads, in seq order (none if nothing was buffered).
        """
        if not self._parts:
            return []
        text = "".join(self._parts)
        self._parts.clear()
        self._esc_len = 0
        return self._drain(text, keep_tail=False, clean_end=False)

    def poll(self) -> list[bytes]:
        """Publish the buffer if its deadline (:meth:`due`) has passed.

        Returns:
            the payloads, or [] if nothing is due.
        """
        if self._parts and self._clock() >= self._deadline:
            return self.flush()
        return []

    # ----------------------------------------------------------------- internals

    def _overflow(self, text: str, now: float) -> list[bytes]:
        """The buffer cannot take ``text``: publish the buffer and start over with ``text``."""
        out: list[bytes] = []
        rest = text
        if self._parts:
            buf = "".join(self._parts)
            self._parts.clear()
            self._esc_len = 0
            cut = self._grapheme_end(buf, text[0])
            if cut == len(buf):
                out = self._drain(buf, keep_tail=False, clean_end=True)
            else:
                # The delta continues the buffer's last grapheme: keep that grapheme
                # together with the delta instead of cutting it.
                if cut:
                    out = self._drain(buf[:cut], keep_tail=False, clean_end=True)
                rest = buf[cut:] + text
        out += self._drain(rest, keep_tail=True, clean_end=False)
        if self._parts and len(self._parts[0]) <= len(text):
            # The buffer is new text only; kept older text keeps its older deadline.
            self._deadline = now + self._flush_s
        return out

    def _grapheme_end(self, buf: str, nxt: str) -> int:
        """Index of the last grapheme boundary in ``buf`` given that char ``nxt`` follows it."""
        if _ascii_break(buf[-1], nxt):
            return len(buf)
        ctx = self._ctx
        bounds = list(accumulate(map(len, _GRAPHEME.findall(ctx + buf + nxt))))
        i = bisect_right(bounds, len(ctx) + len(buf)) - 1
        return max(bounds[i] - len(ctx), 0) if i >= 0 else 0

    def _drain(self, text: str, *, keep_tail: bool, clean_end: bool) -> list[bytes]:
        """Build payloads for ``text``, cutting it wherever the bound requires.

        Args:
            text: text starting right after ``self._ctx``.
            keep_tail: keep the last piece, if it fits, in the buffer instead of publishing it.
            clean_end: the end of ``text`` is known to be a grapheme boundary.
        Returns:
            the payloads built.
        """
        out: list[bytes] = []
        seq = self._seq
        ctx = self._ctx
        start = 0
        while True:
            n = seq._next  # taken below, as soon as the payload is built (seq._next = n + 1)
            budget = self._base - len(str(n))  # the seq's digits count toward the bound
            rest = text[start:] if start else text
            if len(rest) <= budget:
                rest_len = escaped_len(rest)
                if rest_len <= budget:
                    if keep_tail:
                        self._parts.append(rest)
                        self._esc_len = rest_len
                        self._ctx = ctx
                    else:
                        seq._next = n + 1
                        out.append(f"{self._head}{n}{self._mid}{_esc(rest)}}}".encode())
                        self._ctx = "" if clean_end else _tail_cluster(ctx, rest)
                    return out
            end, clean = _cut(text, start, budget, ctx)
            piece = text[start:end]
            seq._next = n + 1
            out.append(f"{self._head}{n}{self._mid}{_esc(piece)}}}".encode())
            ctx = "" if clean else _tail_cluster(ctx, piece)
            start = end
