"""The web playground's HTTP server: the static files of ``bridge/web/static`` and ``/config.json``.

Why the standard library and no web framework: the page talks to the broker, not to
this server (MQTT over WebSockets), so all it serves is a handful of static files
and one small generated JSON document, to one browser at a time, on loopback by
default. ``http.server`` does that in a thread beside the bridge's own threads; a
framework would add a dependency, an event loop and a larger attack surface for no
feature the page uses.

What it does and does not do:

* GET and HEAD only (405 otherwise); no directory listings; only files with a known
  Content-Type, so a stray file is a 404, never a download.
* Paths are checked lexically before any file is touched (:func:`bridge.web.files.resolve`):
  no ``..``, no hidden names, no empty segments, no backslashes or NULs. Symlinks inside
  the shipped folder are followed: they are part of the package.
* Every response says ``Cache-Control: no-cache`` (an upgraded package serves its new
  page at once), ``X-Content-Type-Options: nosniff`` and a Content-Security-Policy:
  'self' only, plus WebSockets to any broker for MQTT and MQTT.js's timer worker
  (:func:`bridge.web.files.content_security_policy`).
* Each connection has a socket timeout and at most ``max_connections`` are served at
  once; :meth:`WebServer.stop` closes the open ones and joins every thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import urlsplit

from bridge.web.files import (
    CONTENT_TYPES,
    config_for,
    content_security_policy,
    content_type,
    resolve,
    static_root,
)

__all__ = ["WebServer", "WebServerError", "static_root"]

_log = logging.getLogger(__name__)

class WebServerError(RuntimeError):
    """The web server could not start (the message says why and which flag to change)."""


class _Handler(BaseHTTPRequestHandler):
    """One connection: GET or HEAD of a static file or ``/config.json``."""

    server: _Server
    server_version = "llamacpp-mqtt-bridge"
    # HTTP/1.0: one request per connection, so no idle keep-alive connection holds a
    # thread (and stop() waiting on it); the page is a handful of files.
    protocol_version = "HTTP/1.0"

    def version_string(self) -> str:
        return self.server_version  # no Python version: nothing for a scanner to match

    def setup(self) -> None:
        # Every read and write of this connection: a silent client cannot hold a thread.
        self.request.settimeout(self.server.request_timeout)
        super().setup()

    def do_GET(self) -> None:
        self._serve(with_body=True)

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    def _not_allowed(self) -> None:
        self._send(405, "text/plain; charset=utf-8", b"405 only GET and HEAD\n",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _serve(self, with_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/config.json" and self.server.page_config is not None:
            config = config_for(self.client_address[0], self.server.page_config)
            body = (json.dumps(config, indent=1) + "\n").encode()
            self._send(200, CONTENT_TYPES[".json"], body, with_body=with_body)
            return
        target = resolve(self.server.root, path)
        if target is None:
            self.send_error(404)
            return
        try:
            body = target.read_bytes()
        except OSError:  # removed or unreadable since resolve() saw it
            self.send_error(404)
            return
        kind = content_type(target.name)
        policy = content_security_policy(body if target.name.endswith(".html") else None)
        self._send(200, kind, body, with_body=with_body, policy=policy)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Errors as short plain text with the same headers as every response.

        ``http.server`` calls it too (malformed request, line too long, unknown method).
        """
        reason = message or self.responses.get(code, ("error",))[0]
        self.close_connection = True
        self._send(code, "text/plain; charset=utf-8", f"{code} {reason}\n".encode(),
                   with_body=self.command != "HEAD")

    def _send(self, code: int, kind: str, body: bytes, *, with_body: bool = True,
              policy: str | None = None, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        headers = {
            "Content-Type": kind,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": policy or content_security_policy(),
            "Referrer-Policy": "no-referrer",
            **(extra or {}),
        }
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # A line per file is noise in the bridge's log; DEBUG shows them.
        _log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once, all closable."""

    daemon_threads = True
    block_on_close = True  # server_close() joins the connection threads

    def __init__(self, address: tuple[str, int], *, root: Traversable,
                 request_timeout: float, max_connections: int) -> None:
        self.root = root
        self.request_timeout = request_timeout
        self.page_config: Mapping[str, Any] | None = None
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own looks the address up in DNS (getfqdn) only to name itself,
        # which can stall start-up for seconds on a machine without working DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Full: close at once rather than queue; a browser retries, a flood gets nothing.
            self.shutdown_request(request)
            return
        with self._lock:
            self._open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: socket.socket) -> None:
        with self._lock:
            if request in self._open:
                self._open.discard(request)
                self._slots.release()

    def close_connections(self) -> None:
        """Shut every open connection down, so that its thread ends now."""
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):  # already closed by its thread
                sock.shutdown(socket.SHUT_RDWR)


class WebServer:
    """The web playground's server, in a thread of its own.

    Args:
        host: address to listen on (loopback by default: the page has no login).
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
        page_config: what ``/config.json`` answers (see :mod:`bridge.web.page`); None
            serves the shipped ``config.json`` file instead. Settable while running.
        root: the folder to serve (default: the package's ``static``).
        request_timeout: seconds a connection may stay silent before it is closed.
        max_connections: connections served at once; more are closed at once.
        flag: the command-line flag that sets ``port``, named in the error for a taken port.

    Usage::

        with WebServer(port=0, page_config={"mqtt_url": "ws://127.0.0.1:9001"}) as web:
            print(web.url)
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 page_config: Mapping[str, Any] | None = None,
                 root: Traversable | None = None, request_timeout: float = 10.0,
                 max_connections: int = 32, flag: str = "--web-port") -> None:
        self.host = host
        self._requested_port = port
        self._page_config = page_config
        self.root = root if root is not None else static_root()
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.flag = flag
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one picked, when started with port 0)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._requested_port

    @property
    def url(self) -> str:
        """The page's address, as a browser on this machine opens it."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    @property
    def page_config(self) -> Mapping[str, Any] | None:
        """What ``/config.json`` answers; None: the shipped file."""
        return self._page_config

    @page_config.setter
    def page_config(self, value: Mapping[str, Any] | None) -> None:
        self._page_config = value
        if self._server is not None:
            self._server.page_config = value

    def start(self) -> None:
        """Bind the port and serve in a background thread.

        Raises:
            WebServerError: the port is taken or the address is not this machine's
                (the message names the flag to change).
        """
        if self._server is not None:
            return
        try:
            server = _Server((self.host, self._requested_port), root=self.root,
                             request_timeout=self.request_timeout,
                             max_connections=self.max_connections)
        except OSError as exc:
            raise self._bind_error(exc) from exc
        server.page_config = self._page_config
        self._server = server
        # serve_forever() checks for stop() between polls: 0.1 s bounds how long stop()
        # waits, at the cost of ten idle wake-ups a second.
        self._thread = threading.Thread(target=server.serve_forever, args=(0.1,),
                                        name=f"web-{self.port}", daemon=True)
        self._thread.start()
        _log.debug("web page served on %s:%d", self.host, self.port)

    def _bind_error(self, exc: OSError) -> WebServerError:
        where = f"port {self._requested_port} on {self.host}"
        if exc.errno == errno.EADDRINUSE:
            return WebServerError(f"cannot serve the web page: {where} is already in use; "
                                  f"pick a free one with {self.flag}")
        if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
            return WebServerError(f"cannot serve the web page: {self.host} is not an address "
                                  f"of this machine (--web-host)")
        return WebServerError(f"cannot serve the web page on {where}: {exc}")

    def stop(self) -> None:
        """Stop serving, close open connections, join every thread. Safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()  # ends serve_forever(): no new connections
        server.close_connections()
        server.server_close()  # closes the socket and joins the connection threads
        if thread is not None:
            thread.join()

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"WebServer({self.url}, {'running' if self._server else 'stopped'})"
