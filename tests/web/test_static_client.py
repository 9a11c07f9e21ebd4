"""The page serves the JavaScript client itself (clients/js), not a copy that could drift."""

from __future__ import annotations

from importlib.resources import files

from tests.support.processes import REPO

MODULES = (
    "llm-bridge.js",
    "call.js",
    "chat.js",
    "error.js",
    "exchange.js",
    "options.js",
    "packet.js",
    "session.js",
    "stream.js",
)


def test_the_page_ships_every_module_of_the_client_unchanged() -> None:
    static = files("bridge.web") / "static" / "js"
    client = REPO / "clients" / "js"
    shipped = {p.name for p in client.glob("*.js")}
    assert shipped == set(MODULES), "a new client module must be linked into static/js too"
    for name in MODULES:
        assert (static / name).read_bytes() == (client / name).read_bytes(), name
