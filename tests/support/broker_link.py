"""The shipped edge-to-core link (``mosquitto/edge-bridge.conf``), made fit for a test rig.

The file is read from the repository and changed only where a test rig must differ
from a deployment: the core broker's address, the CA that signed its certificate and
the link account's password (plus, for measurements, settings a test names
explicitly). Every other line -- topics, directions, QoS, session, keepalive,
notifications -- is the shipped one, so what the tests measure is what ships.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.processes import REPO

__all__ = ["EDGE_BRIDGE_CONF", "edge_bridge_conf", "link_account", "link_setting"]

EDGE_BRIDGE_CONF = REPO / "mosquitto" / "edge-bridge.conf"


def _settings(text: str) -> list[tuple[str, str]]:
    """(key, value) of every setting line, in order (comments and blank lines left out)."""
    out: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value.strip()))
    return out


def link_setting(key: str) -> str:
    """The value of a setting that the shipped file sets once (e.g. ``remote_username``).

    Raises:
        KeyError: the file does not set it exactly once.
    """
    values = [v for k, v in _settings(EDGE_BRIDGE_CONF.read_text(encoding="utf-8")) if k == key]
    if len(values) != 1:
        raise KeyError(f"{EDGE_BRIDGE_CONF} sets {key!r} {len(values)} times, not once")
    return values[0]


def link_account() -> str:
    """The link's account name on the core broker (``remote_username``)."""
    return link_setting("remote_username")


def edge_bridge_conf(core_host: str, core_port: int, ca_file: Path, password: str, *,
                     overrides: dict[str, str] | None = None) -> str:
    """The shipped link, pointed at a test core broker.

    Args:
        core_host, core_port: the core broker's TLS listener.
        ca_file: the CA that signed the core's certificate.
        password: the link account's password on the core.
        overrides: further settings to replace (key -> new value), each of which the
            shipped file must set exactly once -- for measurements of an alternative
            the file describes, e.g. ``{"bridge_protocol_version": "mqttv50"}``.

    Returns:
        The file's text with those values replaced, comments and all.

    Raises:
        KeyError: a replaced setting is not set exactly once in the shipped file.
    """
    new = {"address": f"{core_host}:{core_port}", "bridge_cafile": str(ca_file),
           "remote_password": password, **(overrides or {})}
    text = EDGE_BRIDGE_CONF.read_text(encoding="utf-8")
    for key in new:
        link_setting(key)  # exactly once, or KeyError
    lines = []
    for raw in text.splitlines():
        key, _, _ = raw.strip().partition(" ")
        if not raw.lstrip().startswith("#") and key in new:
            raw = f"{key} {new[key]}"
        lines.append(raw)
    return "\n".join(lines) + "\n"
