"""Incremental parser for server-sent events (SSE) as llama-server writes them.

Feed it raw bytes exactly as they come off the socket — split anywhere, including
inside a multi-byte UTF-8 character or between the ``\\r`` and ``\\n`` of a CRLF
pair — and it hands back complete items:

* :class:`SSEEvent` for every dispatched event (``data:`` lines joined by ``\\n``);
* :class:`SSEComment` for every comment line (``:`` …). llama-server's keep-alive
  pings are bare ``:`` comment frames; they are reported so that idle accounting
  can tell "the server is alive but produced nothing" from "silence".

Besides the WHATWG rules (``data:`` with or without a space after the colon,
multi-line data, LF/CRLF/CR line endings, ``event:``), it understands the
non-standard ``error: {...}`` line that llama-server builds from 2025 sent instead of
``data: {"error": ...}``: it becomes an ``SSEEvent`` whose ``event`` is ``"error"``.

UTF-8 is decoded per complete line, never per network chunk, so a character split
across reads is never mangled. Invalid UTF-8 is replaced with U+FFFD (as the SSE
standard prescribes) rather than failing the stream.

Everything buffered is bounded: a single event (its pending line plus the data
lines collected so far) larger than ``max_event_bytes`` raises
:class:`~bridge.protocol.errors.BackendProtocolError`. After an exception the parser
must not be fed again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.protocol.errors import BackendProtocolError

DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024
"""Largest single event accepted (8 MiB): far above any llama-server chunk."""

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = "\ufeff"


# Not frozen: one is made per token, and a frozen dataclass's __init__ costs twice as
# much (object.__setattr__ per field). Treat it as immutable all the same.
@dataclass(slots=True)
class SSEEvent:
    """One dispatched event.

    Attributes:
        data: the event's ``data`` lines joined with ``\\n`` (or the legacy ``error`` line).
        event: the event type: ``"message"`` unless an ``event:`` line set it;
            ``"error"`` for llama-server's legacy ``error: {...}`` line.
    """

    data: str
    event: str = "message"


# Not frozen: one is made per token, and a frozen dataclass's __init__ costs twice as
# much (object.__setattr__ per field). Treat it as immutable all the same.
@dataclass(slots=True)
class SSEComment:
    """A comment line (``:`` followed by ``text``); llama-server's keep-alive ping is ``:``."""

    text: str


SSEItem = SSEEvent | SSEComment


class SSEParser:
    """Incremental SSE parser: bytes in, complete events and comments out.

    Args:
        max_event_bytes: bound on the bytes buffered for one event (pending partial
            line plus collected data lines). Exceeding it raises
            :class:`BackendProtocolError`.
    """

    __slots__ = ("_buf", "_data", "_event", "_event_bytes", "_first_line", "_max",
                 "_pending_cr")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        self._max = max_event_bytes
        self._buf = bytearray()  # bytes of the current, not yet terminated line
        self._data: list[str] = []  # data lines of the event being collected
        self._event: str | None = None
        self._event_bytes = 0  # raw size of self._data, for the bound
        self._pending_cr = False  # last chunk ended in "\r": a leading "\n" next belongs to it
        self._first_line = True  # a UTF-8 BOM may open the stream

    @property
    def buffered_bytes(self) -> int:
        """Bytes currently held for the event in progress (for tests and metrics)."""
        return len(self._buf) + self._event_bytes

    def feed(self, chunk: bytes) -> list[SSEItem]:
        """Parse the next piece of the stream.

        Args:
            chunk: raw bytes, split anywhere.

        Returns:
            The items completed by this chunk, in stream order (often empty).

        Raises:
            BackendProtocolError: one event exceeds ``max_event_bytes``.
        """
        if not chunk:
            return []
        if self._pending_cr:
            # A CR ended the previous chunk; if this one starts with LF the pair is
            # one line ending, not an extra (event-dispatching) empty line.
            self._pending_cr = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        buf = self._buf
        out: list[SSEItem] = []
        if b"\r" not in chunk:
            self._lf_lines(chunk, out)
        else:
            # The pending bytes hold no line ending, so only the new part needs scanning:
            # a long line fed in tiny pieces stays linear, not quadratic.
            scan_from = len(buf)
            buf += chunk
            start = 0
            for match in _LINE_END.finditer(buf, scan_from):
                self._line(bytes(buf[start:match.start()]), out)
                start = match.end()
                if start == len(buf) and match.group() == b"\r":
                    self._pending_cr = True
            if start:
                del buf[:start]
        if len(buf) + self._event_bytes > self._max:
            raise BackendProtocolError(
                f"an SSE event from llama-server exceeds {self._max} bytes "
                f"({len(buf) + self._event_bytes} buffered without an event boundary): "
                "the stream is not llama-server's or is corrupt; check the backend URL"
            )
        return out

    def _lf_lines(self, chunk: bytes, out: list[SSEItem]) -> None:
        """:meth:`feed` for a chunk without CR (llama-server's): ``split`` instead of a regex.

        Lines are cut by one C-level ``split``, and ``data:`` lines -- all but a few of
        llama-server's -- are handled inline; every other line goes to :meth:`_line`.
        """
        buf = self._buf
        if chunk.find(b"\n") < 0:  # still inside one line (no CR either: checked)
            buf += chunk
            return
        if buf:
            buf += chunk
            lines = bytes(buf).split(b"\n")
            buf.clear()
        else:
            lines = chunk.split(b"\n")
        tail = lines.pop()
        first = 0
        if self._first_line:  # a BOM may open the stream: the slow path strips it
            self._line(lines[0], out)
            first = 1
        data = self._data
        for i in range(first, len(lines)):
            raw = lines[i]
            if raw[:5] == b"data:":
                value = raw[6:] if raw[5:6] == b" " else raw[5:]
                data.append(value.decode("utf-8", "replace"))
                self._event_bytes += len(raw) + 1
            elif not raw:
                if data:
                    out.append(SSEEvent("\n".join(data), self._event or "message"))
                    data.clear()
                self._event = None
                self._event_bytes = 0
            else:
                self._line(raw, out)
                data = self._data  # (rebound only if _line dispatched)
        if tail:
            buf += tail

    def finish(self) -> list[SSEItem]:
        """Flush at end of stream.

        Leniently treats EOF as the end of the last line and of the last event, so a
        server that closes right after ``data: [DONE]`` without the blank line still
        yields it. (A truncated JSON payload is then caught by the JSON decoder.)

        Returns:
            The items completed by the end of the stream.
        """
        out: list[SSEItem] = []
        if self._buf:
            self._line(bytes(self._buf), out)
            self._buf.clear()
        self._dispatch(out)
        self._pending_cr = False
        return out

    # ------------------------------------------------------------------ internals

    def _line(self, raw: bytes, out: list[SSEItem]) -> None:
        text = raw.decode("utf-8", "replace")
        if self._first_line:
            self._first_line = False
            if text.startswith(_BOM):
                text = text[1:]
        if not text:
            self._dispatch(out)
            return
        if text[0] == ":":
            out.append(SSEComment(text[1:]))
            return
        name, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._event_bytes += len(raw) + 1
        elif name == "event":
            self._event = value
        elif name == "error":
            # llama-server (2025 builds) wrote "error: {json}" for mid-stream errors.
            self._event = "error"
            self._data.append(value)
            self._event_bytes += len(raw) + 1
        # "id", "retry" and unknown fields carry nothing llama-server uses: ignored,
        # as the SSE standard says for unknown fields.

    def _dispatch(self, out: list[SSEItem]) -> None:
        if self._data:
            out.append(SSEEvent("\n".join(self._data), self._event or "message"))
        self._data = []
        self._event = None
        self._event_bytes = 0
