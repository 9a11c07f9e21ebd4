"""``Transfer-Encoding: chunked`` decoded by the bridge itself, for streamed answers."""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable
from typing import Any

from bridge.protocol.errors import BackendProtocolError

_WHOLE_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,8})\r\n")  # a chunk's plain size line


class Dechunker:
    """``Transfer-Encoding: chunked`` decoded here, from the connection's buffered reader.

    llama-server writes every event as its own HTTP chunk, and ``http.client``'s
    ``read1`` returns at most one chunk per call: the stream would cost a trip through
    urllib3 and http.client, a timeout update and a parser call *per token*. Reading
    the socket's buffer directly returns every event that has arrived in one call.

    Used only when the response is chunked, not content-encoded and not read yet
    (:meth:`attach`); otherwise the stream reads through urllib3. The
    connection is then never handed back to the pool in an unknown state: http.client
    does not see the body end, so closing the response closes the connection.
    """

    __slots__ = ("_crlf", "_done", "_fp", "_head", "_left", "_trailer")

    _MAX_LINE = 4096  # a chunk-size line (with extensions) or trailer line

    def __init__(self, fp: Any) -> None:
        self._fp = fp
        self._left = 0  # bytes of chunk data still to come
        self._crlf = False  # the CRLF after a chunk's data is due
        self._trailer = False  # after the last (0-size) chunk: trailer lines until ""
        self._done = False
        self._head = b""  # an incomplete size line or CRLF from the previous read

    @classmethod
    def attach(cls, raw: Any) -> Callable[[int], bytes] | None:
        """The ``read`` of a dechunker over ``raw`` (a urllib3 response), or None."""
        return cls(raw._fp.fp).read if cls.applies(raw) else None

    @staticmethod
    def applies(raw: Any) -> bool:
        """Whether ``raw`` (a urllib3 response) is chunked, unencoded and not read yet."""
        fp = getattr(raw, "_fp", None)  # the http.client.HTTPResponse
        return (isinstance(fp, http.client.HTTPResponse) and bool(fp.chunked)
                and fp.chunk_left is None and fp.fp is not None
                and len(getattr(raw, "_decoded_buffer", b"")) == 0
                and raw.headers.get("Content-Encoding", "identity").strip().lower()
                in ("", "identity"))

    def read(self, size: int) -> bytes:
        """Body bytes: whatever has arrived (waiting for some), b"" at the end of the body."""
        while not self._done:
            data = self._fp.read1(size)
            if not data:  # EOF before the last chunk: the body was cut off
                self._done = True
                raise http.client.IncompleteRead(self._head)
            out = self.decode(data)
            if out:
                return out
        return b""

    @property
    def done(self) -> bool:
        """True once the last chunk and its trailer were decoded: the body is complete."""
        return self._done

    def decode(self, data: bytes) -> bytes:
        """The body bytes in ``data``, the next bytes read from the connection.

        Raises:
            BackendProtocolError: the chunk framing is malformed.
        """
        if self._head:
            data = self._head + data
            self._head = b""
        out: list[bytes] = []
        pos, n = 0, len(data)
        match = _WHOLE_CHUNK.match
        while pos < n:
            if not (self._left or self._crlf or self._trailer):
                # Fast path: whole chunks with a plain size line, as llama-server writes
                # them (one event each), cut with one C-level match per chunk. The first
                # thing it does not recognise -- a partial chunk, an extension, the last
                # chunk, bad framing -- is one step of the general code below, after
                # which this resumes (a read of 16 KiB ends and the next begins mid-chunk).
                while (m := match(data, pos)) is not None:
                    start = m.end()
                    end = start + int(m.group(1), 16)
                    if end == start or data[end:end + 2] != b"\r\n":
                        break
                    out.append(data[start:end])
                    pos = end + 2
                if pos >= n:
                    break
            if self._left:
                take = min(self._left, n - pos)
                out.append(data[pos:pos + take] if take < n else data)
                pos += take
                self._left -= take
                self._crlf = self._left == 0
            elif self._crlf:
                if data[pos] == 0x0D:  # CR (a bare LF is tolerated)
                    if pos + 1 == n:
                        self._head = data[pos:]
                        break
                    pos += 1
                if data[pos] != 0x0A:
                    raise self._bad(data[pos:pos + 20])
                pos += 1
                self._crlf = False
            else:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._head = data[pos:]
                    if len(self._head) > self._MAX_LINE:
                        raise self._bad(self._head[:20])
                    break
                line = data[pos:nl].rstrip(b"\r")
                pos = nl + 1
                if self._trailer:
                    if not line:
                        self._done = True
                        break
                    continue
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise self._bad(line[:20]) from None
                if size < 0:
                    raise self._bad(line[:20])
                self._left = size
                self._trailer = size == 0
        return b"".join(out)

    @staticmethod
    def _bad(near: bytes) -> BackendProtocolError:
        return BackendProtocolError(
            f"llama-server sent a malformed HTTP chunk (near {near!r}); the connection or a "
            "proxy in between corrupts the stream")
