"""The page's answer panel says what the bridge's heartbeats say: for how long the backend
has had the prompt (with a moving bar), and, mid-answer, that the backend is slow while
the bridge is alive. A scripted llama-server holds its stream before the first token and
after it; the test lets it go on once the page shows each state.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bridge.mqtt.brokers.local import EmbeddedMosquitto
from bridge.web.server import WebServer
from tests.support.bridge_proc import running_bridge
from tests.support.browser import Browser
from tests.support.fake_llama import FakeLlama, Script, held_chat_stream
from tests.support.local_broker import require_mosquitto
from tests.support.waiting import REPLY_TIMEOUT
from tests.web.page import answer_text, fill, open_page, page_config, wait_terminal

pytestmark = pytest.mark.mosquitto

BRIDGE_ID = "page-beats"
HELD_S = 60.0  # how long a hold lasts if the page never shows what the test waits for


@pytest.fixture(scope="module")
def page() -> Iterator[tuple[EmbeddedMosquitto, str]]:
    """Mosquitto (TCP for the bridge, WebSockets for the page) and the page's URL."""
    with EmbeddedMosquitto(require_mosquitto(), port=0, ws_port=0) as broker:
        config = page_config(broker)
        with WebServer(page_config=config) as web:
            yield broker, web.url


def test_the_answer_panel_follows_the_heartbeats(
        browser: Browser, page: tuple[EmbeddedMosquitto, str]) -> None:
    broker, url = page
    first_token, next_token = threading.Event(), threading.Event()

    def script_for(path: str, body: dict[str, Any]) -> Script:
        return held_chat_stream(first_token, next_token, max_seconds=HELD_S)

    def status() -> str:
        return browser.text("#answer-status")

    with FakeLlama(script_for) as fake, \
            running_bridge("127.0.0.1", broker.port, [fake.url], protocol="5",
                           bridge_id=BRIDGE_ID, heartbeat_s=0.3):
        open_page(browser, url, BRIDGE_ID)
        fill(browser, {"#input": "Say hello.", "#max-tokens": "8", "#max-packet": "",
                       "#session": ""})
        browser.find("#send")[0].click()
        browser.wait(lambda _: status().startswith("processing the prompt for "),
                     timeout=REPLY_TIMEOUT, message="the prompt's heartbeat in the status")
        # an indeterminate bar (position -1): llama-server does not say how far it is
        assert browser.find("#prompt-progress")[0].is_displayed()
        assert browser.driver.execute_script(
            "return document.getElementById('prompt-progress').position") == -1
        first_token.set()
        browser.wait(lambda _: status() == "generating: the backend is slow, the bridge is alive",
                     timeout=REPLY_TIMEOUT, message="the mid-answer heartbeat in the status")
        assert answer_text(browser) == "Hello"
        assert not browser.find("#prompt-progress")[0].is_displayed()
        next_token.set()
        wait_terminal(browser, "done")
    assert answer_text(browser) == "Hello there."
    details = [row.text for row in browser.find('#log tbody tr[data-type="progress"]')]
    assert any("prompt, " in d for d in details), details
    assert any("heartbeat" in d for d in details), details
    browser.assert_no_console_errors()
