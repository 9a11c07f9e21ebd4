"""Two brokers: devices at the edge, bridges at the core (mosquitto/README.md, *Two brokers*).

Two real Mosquittos, each with the shipped ``mosquitto.conf`` and ``acl`` (passwords,
TLS): devices log in only to the EDGE one; two real bridges in one shared group log in
only to the CORE one; the edge reaches the core through the SHIPPED link
``mosquitto/edge-bridge.conf`` (over TLS, with the ``link@edge-1`` account), with only its
address, CA file and password changed. One real llama.cpp server answers.

* every request from several devices is answered exactly once, and both bridges work;
* a cancel sent at the edge reaches the bridge that runs the request;
* the bridges' retained status is readable at the edge, and a change replaces it there;
* MQTT 5 properties do not cross the shipped (MQTT 3.1.1) link -- and do cross the
  mqttv50 alternative, which in exchange loses the replies published while the link is
  down (the reason the file ships 3.1.1);
* the link dropped: a request sent while the core is down is answered once after, and
  the replies published while the edge is down reach the device once it is back.

Link up is waited for through the bridges' retained status arriving at the edge (it
crosses the link), never with a sleep. Measurements are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.protocol.messages import TERMINAL_TYPES
from bridge.service.bridge import Bridge
from tests.support.bridge_proc import running_bridge
from tests.support.broker_link import edge_bridge_conf, link_account, link_setting
from tests.support.device import Device
from tests.support.exactly_once import assert_exactly_once, replies_on
from tests.support.local_broker import require_mosquitto
from tests.support.processes import MosquittoProcess, free_port
from tests.support.waiting import REPLY_TIMEOUT

pytestmark = [pytest.mark.llama, pytest.mark.mosquitto]

GROUP = "bridges"
DEVICES = [f"dev-{i}" for i in range(5)]
# Edge accounts: devices, status panels, and the devices of the property and drop checks.
EDGE_USERS = {name: f"pw-{name}" for name in [*DEVICES, "panel-1", "panel-2", "panel-3",
                                                   "dev-p", "dev-d"]}
LINK_PASSWORD = "pw-link-edge-1"
BRIDGE_IDS = {"bridge@1": "bridge-1", "bridge@2": "bridge-2"}  # account -> its ACL status topic
# Core accounts: the bridges, the link, and observers that see at the core what the
# devices dev-p and dev-d are sent (device accounts may read their own replies).
CORE_USERS = {"bridge@1": "pw-bridge-1", "bridge@2": "pw-bridge-2",
              link_account(): LINK_PASSWORD, "dev-p": "pw-core-dev-p", "dev-d": "pw-core-dev-d"}


@dataclass
class Rig:
    """Core broker with two bridges, edge broker linked to it."""

    core: MosquittoProcess
    edge: MosquittoProcess
    bridges: list[Bridge]
    stack: contextlib.ExitStack

    def device(self, name: str, **kwargs: Any) -> Device:
        """A device at the edge, logged in as itself (persistent session, subscribed to
        its replies unless told otherwise); closed with the rig."""
        dev = Device(self.edge.host, self.edge.plain_port, name, protocol="5", username=name,
                     password=EDGE_USERS[name], **kwargs)
        return self.stack.enter_context(dev)

    def observer(self, name: str) -> Device:
        """``name``'s replies as the CORE broker routes them (subscribed to them)."""
        dev = Device.bare(self.core.host, self.core.plain_port, name, protocol="5",
                          username=name, password=CORE_USERS[name], replies=True)
        return self.stack.enter_context(dev)

    def owner(self, client: str, request_id: str) -> Bridge | None:
        return next((b for b in self.bridges if (client, request_id) in b.jobs), None)


def _statuses(dev: Device) -> dict[str, dict[str, Any]]:
    """The last status each bridge published, as ``dev`` (subscribed to llm/status/+) saw it."""
    with dev.cond:
        return {t.removeprefix("llm/status/"): json.loads(p[-1])
                for t, p in dev.by_topic.items() if t.startswith("llm/status/")}


def _online(dev: Device) -> bool:
    states = _statuses(dev)
    return all(states.get(b, {}).get("state") == "online" for b in BRIDGE_IDS.values())


@contextlib.contextmanager
def two_brokers(tmp_path: Path, llama_url: str,
                overrides: dict[str, str] | None = None) -> Iterator[Rig]:
    """Core broker + two bridges, then the edge broker with the shipped link; returns once
    both bridges' status has crossed the link. ``overrides``: link settings to change."""
    require_mosquitto()
    with contextlib.ExitStack() as stack:
        # Fixed ports: the drop tests restart brokers, and the link must find the core again.
        core = stack.enter_context(MosquittoProcess(tmp_path / "core", "secure",
                                                    port=free_port(), users=CORE_USERS))
        bridges = [stack.enter_context(running_bridge(
            core.host, core.plain_port, [llama_url], protocol="5", bridge_id=bridge_id,
            shared_group=GROUP, max_tokens_cap=400,
            mqtt={"username": account, "password": CORE_USERS[account]}))
            for account, bridge_id in BRIDGE_IDS.items()]
        conf = edge_bridge_conf(core.host, core.port, core.ca_file, LINK_PASSWORD,
                                overrides=overrides)
        edge = MosquittoProcess(tmp_path / "edge", "secure", port=free_port(),
                                users=EDGE_USERS, extra_conf=conf)
        started = time.monotonic()
        stack.enter_context(edge)
        rig = Rig(core, edge, bridges, stack)
        panel = rig.device("panel-1", replies=False)
        panel.subscribe("llm/status/+")
        assert panel.wait(_online, 30), (_statuses(panel), edge.log_tail(), core.log_tail())
        print(f"\nlink up: both bridges' status at the edge {time.monotonic() - started:.3f} s "
              f"after the edge broker started")
        yield rig


def _wait_ended(dev: Device, topics: set[str], timeout: float = REPLY_TIMEOUT) -> None:
    assert dev.wait(lambda d: topics <= d.terminal_topics, timeout), \
        f"{dev.name}: no terminal message on {sorted(topics - dev.terminal_topics)}"


def test_devices_at_the_edge_are_answered_once_by_bridges_at_the_core(
        tmp_path: Path, llama_server: str) -> None:
    with two_brokers(tmp_path, llama_server) as rig:
        b1, b2 = rig.bridges
        # The bridges' status is retained at the edge: a panel that subscribes now gets it.
        late = rig.stack.enter_context(Device.bare(
            rig.edge.host, rig.edge.plain_port, "panel-2", protocol="5", username="panel-2",
            password=EDGE_USERS["panel-2"]))
        late.subscribe("llm/status/+")
        for bridge_id in BRIDGE_IDS.values():
            msg, _ = late.wait_for(f"llm/status/{bridge_id}")
            assert msg.retain and json.loads(msg.payload)["state"] == "online", msg.payload

        # 20 requests from 5 devices: each answered exactly once, by one of the bridges.
        devices = {name: rig.device(name) for name in DEVICES}
        sent = time.monotonic()
        for j in range(4):
            for dev in devices.values():
                dev.request({"id": f"r{j}", "prompt": "Hi", "max_tokens": 4, "temperature": 0})
        for dev in devices.values():
            _wait_ended(dev, {dev.topic(f"r{j}") for j in range(4)})
        elapsed = time.monotonic() - sent
        for dev in devices.values():
            assert set(dev.topics()) == {dev.topic(f"r{j}") for j in range(4)}, dev.topics()
            for j in range(4):
                replies = replies_on(dev, dev.topic(f"r{j}"))
                assert_exactly_once(replies)
                assert replies[-1].type == "done", replies[-1]
        accepted = [b.stats["accepted"] for b in rig.bridges]
        assert sum(accepted) == 20 and min(accepted) > 0, accepted
        print(f"20 requests through the link: answered in {elapsed:.1f} s, "
              f"accepted per bridge {accepted}")

        # A cancel published at the edge reaches the bridge running the request (cancels
        # are not shared: both bridges get it, the owner acts). Until both own one.
        dev = devices["dev-0"]
        long_ids: list[str] = []
        for n in range(8):
            long_ids.append(f"long-{n}")
            dev.request({"id": long_ids[-1], "prompt": "Count: one, two,", "max_tokens": 400})
            assert dev.wait(lambda d: dev.topic(long_ids[-1]) in d.by_topic, 30)
            if {id(rig.owner(dev.name, i)) for i in long_ids} == {id(b1), id(b2)}:
                break
        assert {id(rig.owner(dev.name, i)) for i in long_ids} == {id(b1), id(b2)}
        for request_id in long_ids:
            dev.cancel(request_id)
        _wait_ended(dev, {dev.topic(i) for i in long_ids})
        for request_id in long_ids:
            replies = replies_on(dev, dev.topic(request_id))
            assert_exactly_once(replies)
            assert (replies[-1].type, replies[-1].finish_reason) == ("done", "cancelled")

        # A status change at the core replaces the edge's retained copy (try_private).
        b2.stop()
        assert late.wait(lambda d: _statuses(d)["bridge-2"]["state"] == "offline", 30)
        fresh = rig.stack.enter_context(Device.bare(
            rig.edge.host, rig.edge.plain_port, "panel-3", protocol="5", username="panel-3",
            password=EDGE_USERS["panel-3"]))
        fresh.subscribe("llm/status/+")
        msg, _ = fresh.wait_for("llm/status/bridge-2")
        status = json.loads(msg.payload)
        assert msg.retain and (status["state"], status["reason"]) == ("offline", "shutdown")


def _ask_with_properties(dev: Device, request_id: str) -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = f"llm/reply/{dev.name}/inbox"
    props.CorrelationData = b"corr-" + request_id.encode()
    dev.request({"id": request_id, "prompt": "Hi", "max_tokens": 4}, props=props)


def _correlation(dev: Device, topic: str) -> list[bytes | None]:
    """Correlation Data of each message on ``topic`` up to a terminal one (inbox)."""
    found: list[bytes | None] = []
    while True:
        msg, _ = dev.wait_for(topic, REPLY_TIMEOUT)
        found.append(getattr(msg.properties, "CorrelationData", None))
        if json.loads(msg.payload)["type"] in TERMINAL_TYPES:
            return found


def test_shipped_link_does_not_carry_mqtt5_properties(tmp_path: Path, llama_server: str
                                                      ) -> None:
    """The shipped link speaks MQTT 3.1.1: a device's Response Topic and Correlation Data
    stay at the edge, so the bridge answers on the default reply topic, uncorrelated."""
    assert link_setting("bridge_protocol_version") == "mqttv311"
    with two_brokers(tmp_path, llama_server) as rig:
        dev = rig.device("dev-p", inbox=True)
        _ask_with_properties(dev, "props")
        assert set(_correlation(dev, dev.topic("props"))) == {None}
        assert set(dev.topics()) == {dev.topic("props")}
        assert_exactly_once(replies_on(dev, dev.topic("props")))


def _edge_down_mid_answer(rig: Rig, dev: Device, request_id: str) -> tuple[int, Device]:
    """Ask for a long answer, stop the edge broker once it streams, wait until the core has
    routed its terminal message (seen by a core-side observer), start the edge again.

    Returns:
        The messages ``dev`` had received before the stop, and the observer.
    """
    observer = rig.observer(dev.name)
    topic = dev.topic(request_id)
    dev.request({"id": request_id, "prompt": "Count: one, two,", "max_tokens": 120})
    assert dev.wait(lambda d: any(b'"chunk"' in p for p in d.by_topic.get(topic, ())), 60)
    rig.edge.stop()
    with dev.cond:
        before = len(dev.by_topic.get(topic, ()))
    assert topic not in dev.terminal_topics, "the answer ended before the edge went down"
    assert observer.wait(lambda o: topic in o.terminal_topics, REPLY_TIMEOUT)
    rig.edge.start()
    return before, observer


def test_mqttv50_link_carries_properties_but_loses_replies_while_down(
        tmp_path: Path, llama_server: str) -> None:
    """The alternative the shipped file describes and rejects, measured: over mqttv50 the
    properties cross both ways, but the core does not keep the link's session, so what
    the bridges publish while the edge is down never reaches the device."""
    with two_brokers(tmp_path, llama_server,
                     overrides={"bridge_protocol_version": "mqttv50"}) as rig:
        dev = rig.device("dev-p", inbox=True)
        _ask_with_properties(dev, "props")
        inbox = f"llm/reply/{dev.name}/inbox"
        assert set(_correlation(dev, inbox)) == {b"corr-props"}
        assert set(dev.topics()) == {inbox}  # nothing on the default topic
        assert_exactly_once(replies_on(dev, inbox))

        lost = dev.topic("lost")
        before, observer = _edge_down_mid_answer(rig, dev, "lost")
        # A later request's answer comes through; the earlier answer's end never does
        # (the core would have sent it first, from the link's queue, had it kept one).
        dev.barrier()
        dev.request({"id": "after", "prompt": "Hi", "max_tokens": 4})
        _wait_ended(dev, {dev.topic("after")})
        assert lost not in dev.terminal_topics
        got, sent = len(replies_on(dev, lost)), len(replies_on(observer, lost))
        assert got < sent, (got, sent)
        print(f"mqttv50 link: the bridge sent {sent} messages of the answer, the device got "
              f"{got} ({before} before the edge went down), never its end")


def test_link_drop_queues_requests_at_the_edge_and_replies_at_the_core(
        tmp_path: Path, llama_server: str) -> None:
    with two_brokers(tmp_path, llama_server) as rig:
        dev = rig.device("dev-d")
        # Core down: the link and both bridges lose it; a device's request is queued at
        # the edge and answered exactly once when the core is back.
        rig.core.stop()
        dev.request({"id": "gap", "prompt": "Hi", "max_tokens": 4})
        rig.core.start()
        back = time.monotonic()
        assert dev.wait(lambda d: dev.topic("gap") in d.by_topic, 60), rig.edge.log_tail()
        first = time.monotonic() - back
        _wait_ended(dev, {dev.topic("gap")})
        assert_exactly_once(replies_on(dev, dev.topic("gap")))
        print(f"core restarted: the request sent meanwhile got its first message "
              f"{first:.2f} s after the core was back")

        # Edge down mid-answer: the core queues the rest for the link's session, and
        # the device (persistent session at the edge) gets it once both are back.
        before, observer = _edge_down_mid_answer(rig, dev, "stream")
        back = time.monotonic()
        _wait_ended(dev, {dev.topic("stream")})
        view = dev.view(dev.topic("stream"))
        assert view.complete, (view.types(), view.missing, view.conflicts)
        assert len(view.messages) == len(replies_on(observer, dev.topic("stream")))
        assert view.deliveries > before
        print(f"edge restarted mid-answer: {before} messages before, "
              f"{view.deliveries - before} after ({view.redelivered} redelivered), complete "
              f"{time.monotonic() - back:.2f} s after the edge was back")
        owner_stats = [b.stats for b in rig.bridges]
        assert sum(s["accepted"] for s in owner_stats) == 2, owner_stats
