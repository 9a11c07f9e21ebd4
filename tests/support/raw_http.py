"""One HTTP request over a bare socket, sent byte for byte as given.

The web tests need requests no HTTP client library would send (``..`` in the path, odd
methods) and the response exactly as the server wrote it.
"""

from __future__ import annotations

import socket

from tests.support.waiting import LOOPBACK_TIMEOUT


def raw_request(port: int, path: str, method: str = "GET", *,
                version: str = "HTTP/1.0") -> tuple[int, dict[str, str], bytes]:
    """Send ``METHOD path VERSION`` to 127.0.0.1:``port`` and read to the end.

    Returns:
        the status, the headers (names lower-cased) and the body.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=LOOPBACK_TIMEOUT) as sock:
        sock.sendall(f"{method} {path} {version}\r\nHost: 127.0.0.1\r\nConnection: close"
                     "\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body
