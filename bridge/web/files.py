"""What the web page's server serves, and how: file types, paths, headers, config.json.

The policy, apart from the serving (:mod:`bridge.web.server`), so that each rule can be
read and tested on its own: :func:`resolve` (which URL paths name which files),
:data:`CONTENT_TYPES`, :func:`content_security_policy`, :func:`config_for`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import unquote

__all__ = [
    "CONTENT_TYPES",
    "LOOPBACK_ONLY_KEYS",
    "config_for",
    "content_security_policy",
    "content_type",
    "resolve",
    "static_root",
]

#: What is served, by file name ending. ``.js`` as ``text/javascript``: browsers run ES
#: modules only with a JavaScript type (HTML's strict MIME check for module scripts).
CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}

#: Keys of ``config.json`` given only to a browser on this machine: the local broker's
#: WebSocket password is for this machine's user, like the broker itself.
LOOPBACK_ONLY_KEYS = frozenset({"username", "password"})

_IMPORT_MAP = re.compile(rb"<script\s+type=[\"']?importmap[\"']?\s*>(.*?)</script>",
                         re.IGNORECASE | re.DOTALL)


def static_root() -> Traversable:
    """The page's folder inside the installed package (``bridge/web/static``)."""
    return resources.files("bridge.web") / "static"


def content_security_policy(document: bytes | None = None) -> str:
    """The Content-Security-Policy header of a response.

    Scripts, styles, images and fetches from the page's own origin only, plus
    WebSocket connections to any host (``ws:`` ``wss:``): the broker is on another
    port, or another machine. The one inline script a page may have is its import
    map (browsers support no external one): each import map of ``document`` is
    allowed by its SHA-256, so the policy never needs ``'unsafe-inline'``. Workers
    may also come from ``blob:`` URLs: MQTT.js runs its keep-alive timer in a worker
    it makes from one, because browsers slow the timers of a hidden tab to one a
    minute and the broker would drop the connection; only a script already allowed
    to run can make such a URL.

    Args:
        document: the HTML being served (None for any other response).

    Returns:
        The header value.
    """
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"
        for body in _IMPORT_MAP.findall(document or b""))
    return ("default-src 'self'; "
            f"script-src 'self'{hashes}; "
            "connect-src 'self' ws: wss:; worker-src 'self' blob:; "
            "img-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


def resolve(root: Traversable, url_path: str) -> Traversable | None:
    """The file a URL path names under ``root``, or None if it names none or may not.

    Checked on the text, before anything on disk is touched: each ``/``-separated
    segment (after percent-decoding) must be a plain name -- not empty, not starting
    with ``.`` (no ``..``, no hidden files), no backslash, no NUL -- and the file must
    have a known type. ``/`` is ``/index.html``; any other folder is not found.

    Args:
        root: the static folder.
        url_path: the path of the request URL, e.g. ``/vendor/mqtt.esm.js``.

    Returns:
        The file, or None.
    """
    path = unquote(url_path)
    if path == "/":
        path = "/index.html"
    if not path.startswith("/"):
        return None
    segments = path[1:].split("/")
    if any(not s or s.startswith(".") or "\\" in s or "\0" in s for s in segments):
        return None
    if not any(segments[-1].endswith(ending) for ending in CONTENT_TYPES):
        return None
    target = root
    for segment in segments:
        target = target / segment
    return target if target.is_file() else None


def content_type(name: str) -> str:
    """The Content-Type of a file :func:`resolve` returned (its name has a known ending)."""
    return next(kind for ending, kind in CONTENT_TYPES.items() if name.endswith(ending))


def config_for(peer: str, page_config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` as served to the browser at ``peer``.

    Args:
        peer: the client's IP address.
        page_config: the whole configuration.

    Returns:
        ``page_config``, without :data:`LOOPBACK_ONLY_KEYS` unless ``peer`` is loopback.
    """
    try:
        loopback = ipaddress.ip_address(peer.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    return {key: value for key, value in page_config.items()
            if loopback or key not in LOOPBACK_ONLY_KEYS}
