"""MicroPython's ``usocket`` on CPython, as much of it as umqtt.simple and llm_bridge use.

MicroPython sockets are streams: ``read(n)`` on a blocking socket returns ``n`` bytes, or
fewer only at the end of the stream; on a non-blocking socket with nothing to read it
returns None (and what there is, if some came); with a timeout, a wait that runs out
raises ``OSError(ETIMEDOUT)`` -- even if part of ``n`` was read, which is then lost, as
on the lwIP ports. ``write(buf, n)`` writes the first ``n`` bytes, all of them.
"""

from __future__ import annotations

import errno
import socket as _socket
from typing import Any

AF_INET = _socket.AF_INET
SOCK_STREAM = _socket.SOCK_STREAM
IPPROTO_TCP = _socket.IPPROTO_TCP
TCP_NODELAY = _socket.TCP_NODELAY
SOL_SOCKET = _socket.SOL_SOCKET


def getaddrinfo(host: str, port: int, af: int = 0, type: int = 0, proto: int = 0,
                flags: int = 0) -> list[Any]:
    """CPython's getaddrinfo, for stream sockets unless told otherwise."""
    return _socket.getaddrinfo(host, port, af, type or SOCK_STREAM, proto, flags)


def _timed_out() -> OSError:
    return OSError(errno.ETIMEDOUT, "ETIMEDOUT")


class socket:  # MicroPython's name
    """A CPython socket with MicroPython's stream methods."""

    def __init__(self, af: int = AF_INET, type: int = SOCK_STREAM, proto: int = 0) -> None:
        self._sock = _socket.socket(af, type, proto)

    def connect(self, address: Any) -> None:
        try:
            self._sock.connect(address)
        except TimeoutError:
            raise _timed_out() from None

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self._sock.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int) -> int:
        return self._sock.getsockopt(level, option)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, n: int = -1) -> bytes | None:
        """Up to ``n`` bytes, as a MicroPython stream reads them (see the module)."""
        if n < 0:
            n = 1 << 20
        got = bytearray()
        nonblocking = self._sock.gettimeout() == 0
        while len(got) < n:
            try:
                piece = self._sock.recv(n - len(got))
            except BlockingIOError:
                if nonblocking:
                    return bytes(got) if got else None
                raise
            except TimeoutError:
                raise _timed_out() from None
            if not piece:  # end of the stream
                break
            got += piece
        return bytes(got)

    def write(self, data: bytes | bytearray | memoryview | str, n: int | None = None) -> int:
        view = memoryview(data.encode() if isinstance(data, str) else data)
        if n is not None:
            view = view[:n]
        try:
            self._sock.sendall(view)
        except TimeoutError:
            raise _timed_out() from None
        return len(view)

    def close(self) -> None:
        self._sock.close()
