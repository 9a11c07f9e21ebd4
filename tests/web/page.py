"""What the page tests do in the page: open it, fill the composer, read the answer panel."""

from __future__ import annotations

from typing import Any

from bridge.mqtt.brokers.local import EmbeddedMosquitto
from tests.support.browser import Browser
from tests.support.waiting import REPLY_TIMEOUT


def page_config(broker: EmbeddedMosquitto) -> dict[str, Any]:
    """The page's config.json for ``broker``'s WebSocket listener and account."""
    assert broker.ws_port is not None and broker.ws_account is not None
    username, password = broker.ws_account
    return {"mqtt_url": f"ws://127.0.0.1:{broker.ws_port}", "prefix": "llm",
            "heartbeat_s": 5.0, "protocol_version": 5,
            "username": username, "password": password}


def card(bridge_id: str) -> str:
    return f'li[data-bridge="{bridge_id}"]'


def open_page(browser: Browser, url: str, bridge_id: str) -> None:
    """Load the page at ``url``; wait until it is connected and shows ``bridge_id`` online."""
    browser.open(url)
    browser.wait(lambda _: browser.text("#connection") == "connected",
                 message="the page connected")
    browser.wait(lambda _: browser.find(f'{card(bridge_id)}[data-state="online"]'),
                 message=f"{bridge_id} online in the grid")
    browser.wait(lambda _: not browser.find("#send")[0].get_attribute("disabled"),
                 message="Send enabled")


def fill(browser: Browser, values: dict[str, str]) -> None:
    """Type into the composer's fields as a person would (cleared first)."""
    for css, value in values.items():
        field = browser.find(css)[0]
        field.clear()
        if value:
            field.send_keys(value)


def answer_text(browser: Browser) -> str:
    """The answer element's text exactly (whitespace too, which ``.text`` would trim)."""
    return str(browser.driver.execute_script(
        "return document.getElementById('answer').textContent"))


def log_types(browser: Browser) -> list[str]:
    return [row.get_attribute("data-type") or "" for row in browser.find("#log tbody tr")]


def wait_terminal(browser: Browser, state: str) -> None:
    browser.wait(lambda _: browser.find(f'#answer-status[data-state="{state}"]'),
                 timeout=REPLY_TIMEOUT, message=f"the answer status {state}")
