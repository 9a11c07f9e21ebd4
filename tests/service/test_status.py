"""The retained status message: backends by name (never by URL), fresh after each change.

Every device may read ``llm/status/#`` (the shipped ACL allows it), so the status
names backends with a label from the config and never says where llama-server runs;
the log and the metrics endpoint keep the URL. The status is republished soon after
anything it shows changes, at most about once a second, besides every
``status_interval_s``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError

from bridge.config.settings import LlamaSettings, MqttSettings, load_config
from bridge.mqtt.device import BridgeClient
from bridge.service.ticker import STATUS_MIN_INTERVAL_S, Ticker
from tests.support.bridge_proc import running_bridge
from tests.support.fake_llama import FakeLlama
from tests.support.processes import EmbeddedBroker
from tests.support.recorder import Recorder, check_reply_stream

TIMEOUT = 60.0


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A URL where nothing answers: a bound port that does not listen refuses connections."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{holder.getsockname()[1]}"


def _statuses(rec: Recorder, topic: str, since: int = 0) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in rec.messages[since:] if m.topic == topic]


def _wait_status(rec: Recorder, topic: str, want: Any, timeout: float,
                 since: int = 0) -> dict[str, Any]:
    """The first status on ``topic`` (from the ``since``-th message on) that ``want``s."""
    assert rec.wait_for(lambda ms: any(want(json.loads(m.payload)) for m in ms[since:]
                                       if m.topic == topic), timeout), \
        f"no matching status within {timeout} s: {_statuses(rec, topic, since)[-3:]}"
    return next(s for s in _statuses(rec, topic, since) if want(s))


def _retained(broker: EmbeddedBroker, topic: str, want: Any, timeout: float) -> dict[str, Any]:
    """Read the retained message of ``topic`` with fresh subscribers until ``want`` holds
    (a bounded wait on the condition, not a sleep)."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rec = Recorder(broker.host, broker.port, topic_filter=topic)
        try:
            if rec.wait_for(lambda ms: bool(ms), min(1.0, max(0.1, deadline - time.monotonic()))):
                body = json.loads(rec.messages[0].payload)
                assert rec.messages[0].retain
                if want(body):
                    return body
        finally:
            rec.close()
    raise AssertionError(f"the retained status never matched within {timeout} s: {body}")


# --------------------------------------------------------------------------- backend names


def test_status_names_backends_and_never_shows_their_urls(
    amqtt: EmbeddedBroker, dead_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_LLAMA__NAMES", '["gpu-a", "cpu-b"]')
    topic = "llm/status/names"
    rec = Recorder(amqtt.host, amqtt.port, topic_filter="llm/status/#")
    try:
        with FakeLlama() as llama, \
                running_bridge(amqtt.host, amqtt.port, [llama.url, dead_url],
                               protocol="3.1.1", bridge_id="names") as bridge:
            online = _wait_status(rec, topic, lambda s: s["state"] == "online", 10)
            metrics = bridge.metrics.exposition().decode()
    finally:
        rec.close()
    backends = {b["name"]: b for b in online["backends"]}
    assert list(backends) == ["gpu-a", "cpu-b"]
    assert backends["gpu-a"]["healthy"] is True
    assert backends["cpu-b"]["healthy"] is False and backends["cpu-b"]["error"]
    assert all("url" not in b for b in online["backends"])
    for url in (llama.url, dead_url):
        where = urlsplit(url).netloc
        for message in rec.messages:  # online and offline, every one of them
            assert where.encode() not in message.payload, (where, message.payload[:300])
        # the operator's metrics keep the URL, and carry the name too
        assert f'backend="{url}"' in metrics
    assert 'name="gpu-a"' in metrics and 'name="cpu-b"' in metrics
    assert b"http" not in b"".join(m.payload for m in rec.messages)


def test_default_names_follow_the_urls() -> None:
    assert LlamaSettings(urls=["http://a:1", "http://b:2"]).backend_names(2) == \
        ["backend-1", "backend-2"]
    assert LlamaSettings().backend_names(1) == ["backend-1"]  # the embedded server
    assert LlamaSettings(names=["solo"]).backend_names(1) == ["solo"]


@pytest.mark.parametrize(("llama", "words"), [
    ({"urls": ["http://a:1", "http://b:2"], "names": ["one"]}, "one name per URL"),
    ({"urls": ["http://a:1"], "names": ["x", "y"]}, "one name per URL"),
    ({"urls": ["http://a:1", "http://b:2"], "names": ["x", "x"]}, "unique"),
    ({"urls": ["http://a:1"], "names": ["has space"]}, "must match"),
    ({"urls": ["http://a:1"], "names": ["http://a:1"]}, "must match"),
    ({"urls": ["http://a:1"], "names": [""]}, "must match"),
    ({"names": ["a", "b"]}, "one name per URL"),  # the embedded server is one backend
])
def test_bad_backend_names_are_refused_clearly(llama: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        load_config(llama=llama)


# --------------------------------------------------------------------------- freshness


def _done(status: dict[str, Any], count: int) -> bool:
    return (status.get("state") == "online" and status["stats"]["done"] == count
            and status["active"] == 0 and status["queued"] == 0
            and all(b["active"] == 0 for b in status["backends"]))


def test_status_is_fresh_right_after_a_request(amqtt: EmbeddedBroker) -> None:
    """Right after a request's ``done`` the retained status shows it finished (it used to
    wait for the next periodic publish: ``active 1, done 0`` for up to 30 s)."""
    topic = "llm/status/fresh"
    rec = Recorder(amqtt.host, amqtt.port, topic_filter=topic)
    settings = MqttSettings(host=amqtt.host, port=amqtt.port, protocol="3.1.1")
    try:
        with FakeLlama() as llama, \
                running_bridge(amqtt.host, amqtt.port, [llama.url], protocol="3.1.1",
                               bridge_id="fresh", status_interval_s=3600), \
                BridgeClient(settings, client="dev-fresh") as dev:
            _wait_status(rec, topic, lambda s: s["state"] == "online", 10)
            msgs = list(dev.ask({"prompt": "hi"}, idle_timeout=TIMEOUT))
            done_at = time.monotonic()
            check_reply_stream(msgs)
            assert msgs[-1].type == "done"
            # published within about a second of the change (the periodic one is an hour off)
            _wait_status(rec, topic, lambda s: _done(s, 1), 2.5)
            assert time.monotonic() - done_at < 2.5
            retained = _retained(amqtt, topic, lambda s: _done(s, 1), 2.5)
            assert retained["stats"]["accepted"] == 1
    finally:
        rec.close()


def test_many_quick_requests_make_few_status_messages(amqtt: EmbeddedBroker) -> None:
    """Each request changes the status four times (accepted, running, finished...): 24
    requests in a burst must not make 24 status messages, and the last change is not
    lost (published at the end of its second)."""
    topic = "llm/status/burst"
    count = 24
    rec = Recorder(amqtt.host, amqtt.port, topic_filter=topic)
    settings = MqttSettings(host=amqtt.host, port=amqtt.port, protocol="3.1.1")
    try:
        with FakeLlama(slots=4) as llama, \
                running_bridge(amqtt.host, amqtt.port, [llama.url], protocol="3.1.1",
                               bridge_id="burst", status_interval_s=3600,
                               client_max_inflight=count) as bridge, \
                BridgeClient(settings, client="dev-burst") as dev:
            _wait_status(rec, topic, lambda s: s["state"] == "online", 10)
            since = len(rec.messages)
            started = time.monotonic()
            dev.subscribe("llm/reply/dev-burst/+")
            ids = [dev.send({"prompt": f"hi {i}"}, subscribe=False) for i in range(count)]
            ended: set[str] = set()
            while len(ended) < count:
                got = dev.next_message(TIMEOUT)
                assert got is not None, f"only {len(ended)} of {count} requests ended"
                if not got[0].startswith("llm/reply/"):
                    continue  # amqtt also hands over retained messages of other topics
                body = json.loads(got[1])
                if body["type"] in ("done", "error"):
                    assert body["type"] == "done", body
                    ended.add(body["id"])
            assert ended == set(ids)
            last = _wait_status(rec, topic, lambda s: _done(s, count), 2.5, since)
            elapsed = time.monotonic() - started
            published = _statuses(rec, topic, since)
            assert bridge.stats["done"] == count
    finally:
        rec.close()
    assert last["stats"]["accepted"] == count
    # at most one per STATUS_MIN_INTERVAL_S (plus the first at once), far fewer than 4 * 24
    bound = elapsed / STATUS_MIN_INTERVAL_S + 2
    assert len(published) <= bound, (len(published), elapsed)
    assert len(published) < count


def test_ticker_coalesces_changes_and_never_loses_the_last() -> None:
    calls: list[float] = []
    published = threading.Condition()

    def publish() -> None:
        with published:
            calls.append(time.monotonic())
            published.notify_all()

    ticker = Ticker(lambda: [], 5.0, publish, 3600.0, min_interval_s=0.5)
    ticker.start()
    try:
        t0 = time.monotonic()
        ticker.status_changed()  # the first change goes out at once
        with published:
            assert published.wait_for(lambda: len(calls) == 1, 2)
        for _ in range(200):  # a burst within the interval: one more publish, at its end
            ticker.status_changed()
        with published:
            assert published.wait_for(lambda: len(calls) == 2, 2)
            assert not published.wait_for(lambda: len(calls) > 2, 0.8)
    finally:
        ticker.stop()
    assert calls[0] - t0 < 0.3
    assert calls[1] - calls[0] >= 0.5 - 0.01
