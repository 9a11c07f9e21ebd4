"""The web page's HTTP server on its own: what it serves, how, and what it refuses.

Real sockets on loopback, raw request lines where a client library would tidy the
path up (``..``, percent-encoding), so the server sees exactly what an attacker sends.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.web.files import CONTENT_TYPES, config_for, resolve, static_root
from bridge.web.server import WebServer, WebServerError
from tests.support.local_broker import non_loopback_ipv4
from tests.support.raw_http import raw_request
from tests.support.waiting import LOOPBACK_TIMEOUT, poll_until

STATIC = Path(str(static_root()))


def raw_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Send ``METHOD path HTTP/1.0`` as given, byte for byte; the status, headers, body."""
    return raw_request(port, path, method)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A static folder with one file of each type, beside a file that must stay private."""
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("private\n")
    files = {"index.html": "<!doctype html><p>hi</p>", "a.js": "export {};", "b.mjs": "x",
             "c.css": "p{}", "d.json": "{}", "e.svg": "<svg/>", "f.png": "\x89PNG",
             "sub/g.js": "export {};", "h.unknown": "?", ".hidden.js": "x",
             "config.json": '{"mqtt_url": null}'}
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def server(site: Path) -> Iterator[WebServer]:
    with WebServer(port=0, root=site) as web:
        yield web


@pytest.mark.parametrize(("path", "kind"), [
    ("/", "text/html; charset=utf-8"), ("/index.html", "text/html; charset=utf-8"),
    ("/a.js", "text/javascript; charset=utf-8"), ("/b.mjs", "text/javascript; charset=utf-8"),
    ("/c.css", "text/css; charset=utf-8"), ("/d.json", "application/json"),
    ("/e.svg", "image/svg+xml"), ("/f.png", "image/png"),
    ("/sub/g.js", "text/javascript; charset=utf-8"),
    ("/a.js?v=2", "text/javascript; charset=utf-8"),
])
def test_files_are_served_with_their_content_type(server: WebServer, site: Path, path: str,
                                                  kind: str) -> None:
    status, headers, body = raw_get(server.port, path)
    assert (status, headers["content-type"]) == (200, kind)
    name = path.split("?")[0].lstrip("/") or "index.html"
    assert body == (site / name).read_bytes()
    assert headers["content-length"] == str(len(body))


def test_every_response_has_the_security_and_cache_headers(server: WebServer) -> None:
    for path in ("/", "/a.js", "/nothing.js", "/../secret.txt"):
        _, headers, _ = raw_get(server.port, path)
        assert headers["cache-control"] == "no-cache"
        assert headers["x-content-type-options"] == "nosniff"
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "connect-src 'self' ws: wss:" in policy
        assert "worker-src 'self' blob:" in policy  # MQTT.js's keep-alive timer
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert headers["server"] == "llamacpp-mqtt-bridge"  # no Python version


def test_the_shipped_pages_import_map_is_allowed_by_its_hash_only() -> None:
    with WebServer(port=0) as web:
        _, headers, body = raw_get(web.port, "/")
        _, js_headers, _ = raw_get(web.port, "/app.js")
    maps = re.findall(rb'<script type="importmap">(.*?)</script>', body, re.DOTALL)
    assert len(maps) == 1 and json.loads(maps[0]) == {
        "imports": {"mqtt": "./vendor/mqtt.esm.js"}}
    digest = base64.b64encode(hashlib.sha256(maps[0]).digest()).decode()
    script_src = re.search(r"script-src ([^;]*)", headers["content-security-policy"])
    assert script_src is not None
    assert script_src.group(1).split() == ["'self'", f"'sha256-{digest}'"]
    assert "sha256-" not in js_headers["content-security-policy"]


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/sub/../../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E%2Fsecret.txt",
    "/sub%2f..%2f..%2fsecret.txt", "/..%5csecret.txt", "/sub/..\\..\\secret.txt",
    "//secret.txt", "/./index.html", "/.hidden.js", "/a.js%00.html", "/index.html/",
    "/sub/", "/sub", "/h.unknown", "/nothing.js", "secret.txt", "http://x/../secret.txt",
])
def test_traversal_folders_hidden_and_unknown_files_are_not_found(server: WebServer,
                                                                  path: str) -> None:
    status, headers, body = raw_get(server.port, path)
    assert status == 404, (path, body)
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert b"private" not in body


def test_resolve_checks_the_path_before_the_disk(site: Path) -> None:
    assert resolve(site, "/sub/g.js") == site / "sub" / "g.js"
    assert resolve(site, "/") == site / "index.html"
    assert resolve(site, "/../secret.txt") is None
    assert resolve(site, "/sub") is None  # a folder: no listing


def test_head_has_the_headers_of_get_and_no_body(server: WebServer) -> None:
    status, get_headers, get_body = raw_get(server.port, "/a.js")
    head_status, head_headers, head_body = raw_get(server.port, "/a.js", "HEAD")
    assert (status, head_status) == (200, 200)
    assert head_body == b"" and get_body
    for name in ("content-type", "content-length", "cache-control",
                 "content-security-policy", "x-content-type-options"):
        assert head_headers[name] == get_headers[name]
    status, _, body = raw_get(server.port, "/nothing.js", "HEAD")
    assert (status, body) == (404, b"")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head(server: WebServer, method: str) -> None:
    status, headers, _ = raw_get(server.port, "/index.html", method)
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


def test_config_json_is_generated_or_the_shipped_file(server: WebServer) -> None:
    status, headers, body = raw_get(server.port, "/config.json")
    assert (status, json.loads(body)) == (200, {"mqtt_url": None})  # the file: none set yet
    server.page_config = {"mqtt_url": "ws://127.0.0.1:9001", "prefix": "llm",
                          "username": "web", "password": "pw"}
    status, headers, body = raw_get(server.port, "/config.json")
    assert (status, headers["content-type"]) == (200, "application/json")
    assert json.loads(body) == server.page_config  # a loopback browser gets it all


def test_the_password_is_for_loopback_browsers_only() -> None:
    config = {"mqtt_url": "ws://127.0.0.1:9001", "prefix": "llm", "username": "web",
              "password": "pw"}
    for peer in ("127.0.0.1", "127.5.0.1", "::1"):
        assert config_for(peer, config) == config
    for peer in ("192.168.1.20", "10.0.0.1", "fe80::1%eth0", "not an address"):
        assert config_for(peer, config) == {"mqtt_url": "ws://127.0.0.1:9001", "prefix": "llm"}


def test_every_shipped_file_has_a_served_type() -> None:
    """A file the page needs but the server would refuse shows up here, not in a browser."""
    names = [p for p in STATIC.rglob("*") if p.is_file()]
    assert {p.name for p in names} >= {"index.html", "app.js", "config.json", "mqtt.esm.js"}
    for path in names:
        assert any(path.name.endswith(ending) for ending in CONTENT_TYPES), path


def test_a_silent_connection_is_closed_after_the_timeout(site: Path) -> None:
    with WebServer(port=0, root=site, request_timeout=0.5) as web, \
            socket.create_connection(("127.0.0.1", web.port), timeout=LOOPBACK_TIMEOUT) as sock:
        assert sock.recv(1024) == b""  # closed by the server, not by our own timeout


def test_connections_beyond_the_limit_are_closed_at_once(site: Path) -> None:
    with WebServer(port=0, root=site, max_connections=2) as web:
        held = [socket.create_connection(("127.0.0.1", web.port), timeout=LOOPBACK_TIMEOUT)
                for _ in range(2)]
        try:
            # The two held connections are being served (silently), so a third is refused.
            with socket.create_connection(("127.0.0.1", web.port),
                                          timeout=LOOPBACK_TIMEOUT) as extra:
                extra.sendall(b"GET /a.js HTTP/1.0\r\n\r\n")
                assert extra.recv(1024) == b""
        finally:
            for sock in held:
                sock.close()
        # The held slots are free once their threads have seen the close.
        assert poll_until(lambda: _served(web.port), bool, LOOPBACK_TIMEOUT)


def _served(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=LOOPBACK_TIMEOUT)
    try:
        conn.request("HEAD", "/a.js")
        return conn.getresponse().status == 200
    except (ConnectionError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def test_stop_closes_open_connections_joins_threads_and_frees_the_port(site: Path) -> None:
    web = WebServer(port=0, root=site, request_timeout=600)
    web.start()
    port = web.port
    idle = socket.create_connection(("127.0.0.1", port), timeout=LOOPBACK_TIMEOUT)
    try:
        assert raw_get(port, "/a.js")[0] == 200
        web.stop()  # must not wait the 600 s of the idle connection
        assert not [t for t in threading.enumerate() if t.name == f"web-{port}"]
        assert idle.recv(1024) == b""
        with socket.socket() as probe:  # the port is free again
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
        web.stop()  # twice is fine
    finally:
        idle.close()


def test_a_taken_port_names_the_flag(site: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(WebServerError, match=rf"port {port} on 127.0.0.1 is already in "
                                                 r"use; pick a free one with --web-port"):
            WebServer(port=port, root=site).start()
    # A documentation address (RFC 5737) this machine does not have.
    foreign = next(a for a in ("198.51.100.7", "203.0.113.7", "192.0.2.7")
                   if a not in non_loopback_ipv4())
    with pytest.raises(WebServerError, match=r"not an address of this machine.*--web-host"):
        WebServer(foreign, 0, root=site).start()
