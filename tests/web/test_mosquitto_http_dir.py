"""Serving the page from Mosquitto itself (``http_dir`` on a websockets listener), tried
for real: what the README says about it is what this test sees.

Mosquitto 2.0.11 (Debian 12) serves the files, but with no ``Content-Type``; a browser
runs no JavaScript module without one, so the page stays dead. The listener admits no
MQTT client (``allow_anonymous false``, no accounts): 2.0.11 binds it on every interface
whatever its address, and only the page's public files are on it.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.mqtt.brokers.mosquitto import MosquittoChild
from bridge.web.files import static_root
from tests.support.browser import Browser
from tests.support.local_broker import require_mosquitto
from tests.support.processes import free_port
from tests.support.raw_http import raw_request
from tests.support.waiting import LOOPBACK_TIMEOUT

STATIC = Path(str(static_root()))


def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """``GET path`` as given (no client-side tidying of ``..``): status, headers, body."""
    return raw_request(port, path, version="HTTP/1.1")


@pytest.fixture
def mosquitto_http(tmp_path: Path) -> Iterator[int]:
    """Mosquitto with a websockets listener whose ``http_dir`` is the page's folder."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join([
        # Stay the user we are: as root Mosquitto would switch to `mosquitto`, which may
        # not reach the checkout.
        f"user {getpass.getuser()}",
        "persistence false",
        "log_dest stderr",
        "allow_anonymous false",
        # 2.0.11 exits ("Unable to start any listening sockets") without a TCP listener.
        f"listener {free_port()} 127.0.0.1",
        "protocol mqtt",
        f"listener {port} 127.0.0.1",
        "protocol websockets",
        f"http_dir {STATIC}",
    ]) + "\n")
    child = MosquittoChild(require_mosquitto(), conf, host="127.0.0.1", ports=[port],
                           cwd=tmp_path, output_file=tmp_path / "mosquitto.log")
    child.start(LOOPBACK_TIMEOUT)
    try:
        yield port
    finally:
        child.stop(LOOPBACK_TIMEOUT)


def test_mosquitto_serves_the_files_without_a_content_type(mosquitto_http: int) -> None:
    for name in ("index.html", "app.js", "vendor/mqtt.esm.js"):
        status, headers, body = http_get(mosquitto_http, f"/{name}")
        assert status == 200, name
        assert body == (STATIC / name).read_bytes(), name
        assert "content-type" not in headers, headers  # what breaks the page, below
    status, _, body = http_get(mosquitto_http, "/../../pyproject.toml")
    assert status != 200 and b"[project]" not in body  # it refuses to leave http_dir


def test_a_browser_runs_no_module_served_so(mosquitto_http: int, browser: Browser) -> None:
    browser.open(f"http://127.0.0.1:{mosquitto_http}/index.html")
    refused = browser.wait(
        lambda _: [m for m in browser.severe() if "app.js" in m and "MIME type" in m],
        message="the module refused for its MIME type")
    assert "Strict MIME type checking is enforced for module scripts" in refused[0]
    assert browser.text("#connection") == "connecting"  # app.js never ran
    browser.clear_console()  # the shared browser's next test starts clean
