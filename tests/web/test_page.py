"""The web playground in a real browser, against the real bridge, Mosquitto (with a
WebSocket listener for the page, TCP for the bridge and a raw subscriber) and llama.cpp.

The page streams an answer (seen growing, equal to what a raw ``llm/reply/#`` subscriber
reassembles, the log sized against ``max_packet``), stops one (``cancelled``), retries,
shows a bad request's error, and follows a bridge from online to offline. Each test
ends with a clean browser console. The answer test writes the README's screenshots.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from bridge.mqtt.brokers.local import EmbeddedMosquitto
from bridge.web.server import WebServer
from tests.support.bridge_proc import running_bridge
from tests.support.browser import PHONE, Browser
from tests.support.local_broker import require_mosquitto
from tests.support.processes import REPO
from tests.support.waiting import LOOPBACK_TIMEOUT, REPLY_TIMEOUT, poll_until
from tests.web.page import (
    answer_text,
    card,
    fill,
    log_types,
    open_page,
    page_config,
    wait_terminal,
)

pytestmark = [pytest.mark.llama, pytest.mark.mosquitto]

BRIDGE_ID = "page-bridge"
IMG = REPO / "docs" / "img"
STORY = "Write a long story about a robot who learns to paint."
SKY = "Why is the sky blue? Explain it to a child."
PNG = b"\x89PNG\r\n\x1a\n"


class ReplySniffer:
    """A raw paho subscriber on ``llm/reply/#`` over TCP: what the wire carried."""

    def __init__(self, port: int) -> None:
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.got = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                                  client_id="page-test-sniffer")
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda client, *_: client.subscribe("llm/reply/#", qos=1)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert subscribed.wait(LOOPBACK_TIMEOUT), "the sniffer's SUBACK did not come"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.got:
            self.messages.setdefault(msg.topic, []).append(json.loads(msg.payload))
            self.got.notify_all()

    def answer(self, topic: str) -> tuple[str, list[dict[str, Any]]]:
        """The text of the chunks on ``topic`` in seq order (copies dropped), once its
        terminal message came; and the messages by seq."""
        def ended() -> bool:
            return any(m["type"] in ("done", "reply", "error")
                       for m in self.messages.get(topic, []))
        with self.got:
            assert self.got.wait_for(ended, REPLY_TIMEOUT), f"no terminal message on {topic}"
            by_seq = {m["seq"]: m for m in self.messages[topic]}
        ordered = [by_seq[seq] for seq in sorted(by_seq)]
        assert [m["seq"] for m in ordered] == list(range(len(ordered))), "seq gap on the wire"
        return "".join(m.get("text", "") for m in ordered if m["type"] == "chunk"), ordered

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Stack:
    """The broker, the page's server and a raw subscriber, shared by the module."""

    broker: EmbeddedMosquitto
    web: WebServer
    sniffer: ReplySniffer
    llama_url: str


@pytest.fixture(scope="module")
def stack(llama_server: str) -> Iterator[Stack]:
    """Mosquitto (TCP + WebSockets with the page's account) and the page served with a
    config.json naming that listener: the page stays connected when a bridge stops."""
    with EmbeddedMosquitto(require_mosquitto(), port=0, ws_port=0) as broker:
        config = page_config(broker)
        sniffer = ReplySniffer(broker.port)
        try:
            with WebServer(page_config=config) as web:
                yield Stack(broker, web, sniffer, llama_server)
        finally:
            sniffer.close()


@pytest.fixture(scope="module")
def bridge(stack: Stack) -> Iterator[str]:
    """A bridge for the answer tests (a cap high enough for an answer to be stopped)."""
    with running_bridge("127.0.0.1", stack.broker.port, [stack.llama_url], protocol="5",
                        bridge_id=BRIDGE_ID, max_tokens_cap=400):
        yield BRIDGE_ID


def test_the_answer_streams_and_equals_the_wire(browser: Browser, stack: Stack,
                                                bridge: str) -> None:
    open_page(browser, stack.web.url, bridge)
    backend = browser.text(f"{card(bridge)} .backends tbody tr")
    assert "healthy" in backend, backend
    fill(browser, {"#input": SKY, "#max-tokens": "40", "#temperature": "0",
                   "#max-packet": "200", "#session": "tour"})
    browser.find("#input")[0].send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard sends

    seen: list[str] = []

    def probe() -> bool:
        text, done = browser.driver.execute_script(
            "return [document.getElementById('answer').textContent,"
            " document.querySelector('#log tbody tr[data-type=done]') !== null]")
        if not done and text and (not seen or seen[-1] != text):
            seen.append(str(text))
        return bool(done)

    assert poll_until(probe, bool, REPLY_TIMEOUT, interval=0.01), "no done in the log"
    final = answer_text(browser)
    assert len(seen) >= 3, f"the answer grew only {len(seen)} times before done: {seen}"
    assert all(b.startswith(a) and b != a for a, b in itertools.pairwise(seen)), seen
    assert final.startswith(seen[-1])

    request_id = browser.text("#request-id")
    client = stack.broker.ws_account[0] if stack.broker.ws_account else ""
    wire_text, wire = stack.sniffer.answer(f"llm/reply/{client}/{request_id}")
    assert final == wire_text and final.strip(), (final, wire_text)
    wait_terminal(browser, "done")
    assert browser.text("#answer-status").startswith("done (")

    # The log: one row per message, in seq order, each within max_packet, no flags.
    rows = browser.find("#log tbody tr")
    assert [r.get_attribute("data-seq") for r in rows] == [str(m["seq"]) for m in wire]
    assert log_types(browser) == [m["type"] for m in wire]
    assert log_types(browser).count("chunk") >= 3
    for row in rows:
        assert row.get_attribute("data-flags") == ""
        size = row.find_element(By.CSS_SELECTOR, ".size").text
        packet, bound = (int(n) for n in size.removesuffix(" B").split(" / "))
        assert packet <= bound == 200, size
    assert browser.text("#rate") not in ("", "–")
    assert "total_ms" in browser.text("#timings") or "completion_tokens" in browser.text("#timings")

    # The session view: this page's one turn on "tour", with the answer.
    turns = browser.find("#turns li")
    browser.wait(lambda _: turns[0].get_attribute("data-state") == "done",
                 message="the turn done")
    assert len(turns) == 1 and final.strip()[:20] in turns[0].text

    IMG.mkdir(parents=True, exist_ok=True)
    assert browser.screenshot(IMG / "playground-desktop.png").read_bytes().startswith(PNG)
    browser.size(PHONE)
    browser.driver.execute_script(
        "document.getElementById('answer-panel').scrollIntoView()")
    assert browser.screenshot(IMG / "playground-phone.png").read_bytes().startswith(PNG)
    # One column at phone width: the answer panel spans the page.
    width = browser.driver.execute_script(
        "return document.getElementById('answer-panel').getBoundingClientRect().width")
    assert width > PHONE[0] * 0.85, width
    overflow = browser.driver.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone"
    browser.assert_no_console_errors()


def test_stop_ends_in_cancelled_and_retry_asks_again(browser: Browser, stack: Stack,
                                                     bridge: str) -> None:
    open_page(browser, stack.web.url, bridge)
    fill(browser, {"#input": STORY, "#max-tokens": "400", "#temperature": "0",
                   "#max-packet": "", "#session": ""})
    ids: list[str] = []
    for start in ("#send", "#retry"):
        browser.find(start)[0].click()
        browser.wait(lambda _: answer_text(browser) != "", timeout=REPLY_TIMEOUT,
                     message="the first text")
        ids.append(browser.text("#request-id"))
        browser.find("#stop")[0].click()
        wait_terminal(browser, "cancelled")
        assert browser.text("#answer-status") == "done (cancelled)"  # the bridge's own
        done = browser.find('#log tbody tr[data-type="done"]')
        assert len(done) == 1 and "cancelled" in done[0].text
        _, wire = stack.sniffer.answer(f"llm/reply/web/{ids[-1]}")
        assert wire[-1]["finish_reason"] == "cancelled"
        browser.wait(lambda _: browser.find("#retry")[0].is_enabled(), message="Retry enabled")
    assert ids[0] != ids[1]  # Retry: the same request, a new id
    browser.assert_no_console_errors()


def test_a_bad_request_shows_its_error(browser: Browser, stack: Stack, bridge: str) -> None:
    open_page(browser, stack.web.url, bridge)
    fill(browser, {"#input": "hi", "#max-tokens": "8", "#temperature": "99",
                   "#max-packet": "", "#session": ""})
    browser.find("#send")[0].click()
    wait_terminal(browser, "error")
    assert browser.text("#error-code") == "bad_request"
    message = browser.text("#error-message")
    assert "temperature" in message, message
    assert browser.text("#error-retryable") == "not retryable"
    assert log_types(browser) == ["error"]
    assert "bad_request" in browser.text('#log tbody tr[data-type="error"]')

    # A mistake in the form is said the same way and nothing is sent.
    browser.find("#mode option[value=messages]")[0].click()
    fill(browser, {"#input": "[{not json"})
    browser.find("#send")[0].click()
    browser.wait(lambda _: browser.text("#error-code") == "invalid_input",
                 message="the form's error")
    assert "not JSON" in browser.text("#error-message")
    assert log_types(browser) == []
    browser.assert_no_console_errors()


def test_the_grid_follows_a_bridge_online_then_offline(browser: Browser, stack: Stack) -> None:
    bridge_id = "page-leaving"
    with running_bridge("127.0.0.1", stack.broker.port, [stack.llama_url], protocol="5",
                        bridge_id=bridge_id):
        open_page(browser, stack.web.url, bridge_id)
        item = card(bridge_id)
        assert browser.text(f"{item} .bridge-state") == "online"
        assert "active 0" in browser.text(f"{item} .load")
        assert "healthy" in browser.text(f"{item} .backends")
    browser.wait(lambda _: browser.find(f'{item}[data-state="offline"]'),
                 message=f"{bridge_id} offline in the grid")
    assert browser.text(f"{item} .bridge-state") == "offline"
    assert browser.text("#connection") == "connected"  # the page itself stayed connected
    browser.assert_no_console_errors()
