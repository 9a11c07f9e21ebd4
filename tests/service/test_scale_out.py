"""Several bridges behind one Mosquitto share the request topics (README, *Scaling out*).

Two bridges in one shared group (``$share/g/llm/request/+``, MQTT 5) and two real
llama.cpp servers: every request is answered exactly once, by one of them; a cancel
reaches whichever bridge runs the request; a bridge that stops cleanly hands its
share of new requests to the others at once; a bridge that is SIGKILLed goes
offline through its Last Will, its in-flight request gets no terminal message, and
the device's resend with the same id is served by the other bridge; a bridge stopped
cleanly while it runs and queues requests ends each of them with one retryable
``backend_unavailable`` error, and their resends are served by the other bridge.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from bridge.config.settings import load_config
from bridge.mqtt.link import SHARED_SESSION_EXPIRY_S, MqttLink
from bridge.protocol.messages import TERMINAL_TYPES, decode_reply
from bridge.service.bridge import Bridge
from tests.support.bridge_proc import bridge_process, running_bridge
from tests.support.device import Device
from tests.support.exactly_once import assert_exactly_once
from tests.support.fake_llama import (
    Action,
    FakeLlama,
    Send,
    SSEHeaders,
    Stall,
    chat_chunk,
    completion_chunk,
    event,
)
from tests.support.processes import (
    MosquittoProcess,
    free_port,
)
from tests.support.recorder import Recorded, Recorder
from tests.support.waiting import poll_until

pytestmark = [pytest.mark.llama, pytest.mark.mosquitto]

TIMEOUT = 180.0
GROUP = "g"


def _by_topic(msgs: list[Recorded], since: int = 0) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for m in msgs[since:]:
        if m.topic.startswith("llm/reply/"):
            out.setdefault(m.topic, []).append(decode_reply(m.payload))
    return out


def _terminals(msgs: list[Recorded], since: int = 0) -> set[str]:
    return {topic for topic, replies in _by_topic(msgs, since).items()
            if any(r.type in TERMINAL_TYPES for r in replies)}



def _seen(topic: str) -> Callable[[list[Recorded]], bool]:
    return lambda msgs: any(m.topic == topic for m in msgs)


def _owner(bridges: list[Bridge], client: str, request_id: str) -> Bridge | None:
    return next((b for b in bridges if (client, request_id) in b.jobs), None)


def test_session_expiry_is_short_in_a_shared_group_unless_configured() -> None:
    def link(shared: str | None, **mqtt_settings: Any) -> MqttLink:
        cfg = load_config(mqtt={"host": "127.0.0.1", **mqtt_settings}, shared_group=shared,
                          llama={"urls": ["http://127.0.0.1:9"]})
        return MqttLink(cfg, lambda _msg: None, will_payload=b"{}",
                        subscriptions=[cfg.topics.request_filter(shared),
                                       cfg.topics.cancel_filter(shared)])

    assert link(None).session_expiry_s == 3600 and not link(None).shared
    assert link(GROUP).shared and link(GROUP).session_expiry_s == SHARED_SESSION_EXPIRY_S
    assert link(GROUP, session_expiry_s=600).session_expiry_s == 600


def test_two_bridges_share_requests_exactly_once_cancel_and_clean_stop(
    mosquitto: MosquittoProcess, llama_pair: list[str]
) -> None:
    host, port = mosquitto.host, mosquitto.port
    rec = Recorder(host, port, topic_filter="llm/#")
    device = Device.bare(mosquitto.host, mosquitto.port, "scale-device", protocol="5").connect()
    common: dict[str, Any] = {"protocol": "5", "shared_group": GROUP, "max_tokens_cap": 400}
    try:
        with running_bridge(host, port, llama_pair, bridge_id="b1", **common) as b1:
            with running_bridge(host, port, llama_pair, bridge_id="b2", **common) as b2:
                bridges = [b1, b2]
                # 1. 40 requests from 10 devices: each answered once, by one bridge.
                topics = []
                for j in range(4):
                    for i in range(10):
                        device.request_as(f"dev-{i}", {"id": f"r{j}", "prompt": "Hi",
                                                       "max_tokens": 3, "temperature": 0})
                        topics.append(f"llm/reply/dev-{i}/r{j}")
                assert rec.wait_for(lambda ms: _terminals(ms) >= set(topics), TIMEOUT), \
                    f"unanswered: {sorted(set(topics) - _terminals(rec.messages))}"
                by_topic = _by_topic(rec.messages)
                for topic in topics:
                    assert_exactly_once(by_topic[topic])
                    assert by_topic[topic][-1].type == "done", by_topic[topic][-1]
                accepted = [b.stats["accepted"] for b in bridges]
                assert sum(accepted) == 40 and min(accepted) > 0, accepted

                # 2. A cancel reaches the bridge that runs the request (cancel topics are
                #    not shared: both bridges see it, the owner acts, the other ignores it).
                long_ids: list[tuple[str, str]] = []
                for n in range(8):  # round robin: two requests usually reach both bridges
                    client = f"dev-long-{n}"
                    device.request_as(client, {"id": "long", "prompt": "Count: one, two,",
                                               "max_tokens": 400})
                    long_ids.append((client, "long"))
                    assert rec.wait_for(_seen(f"llm/reply/{client}/long"), 30)
                    owners = {id(_owner(bridges, c, r)) for c, r in long_ids}
                    if owners == {id(b1), id(b2)}:
                        break
                assert {id(_owner(bridges, c, r)) for c, r in long_ids} == {id(b1), id(b2)}
                for client, rid in long_ids:
                    device.publish(f"llm/cancel/{client}", rid)
                long_topics = {f"llm/reply/{c}/{r}" for c, r in long_ids}
                assert rec.wait_for(lambda ms: _terminals(ms) >= long_topics, TIMEOUT)
                by_topic = _by_topic(rec.messages)
                for topic in long_topics:
                    assert_exactly_once(by_topic[topic])
                    assert by_topic[topic][-1].type == "done"
                    assert by_topic[topic][-1].finish_reason == "cancelled"

            # 3. b2 stopped cleanly: its retained status says so, and it left the group
            #    first, so the broker gives every new request to b1 (none waits in b2's
            #    session for a bridge that is not there).
            retained = Recorder(host, port, topic_filter="llm/status/b2")
            try:
                assert retained.wait_for(lambda ms: bool(ms), 10)
                status = json.loads(retained.messages[-1].payload)
                assert retained.messages[-1].retain
                assert (status["state"], status["reason"]) == ("offline", "shutdown")
            finally:
                retained.close()
            before = b1.stats["accepted"]
            after_topics = []
            for i in range(6):
                device.request_as(f"dev-{i}", {"id": "after-stop", "prompt": "Hi",
                                               "max_tokens": 3})
                after_topics.append(f"llm/reply/dev-{i}/after-stop")
            assert rec.wait_for(lambda ms: _terminals(ms) >= set(after_topics), 60), \
                f"unanswered after b2 stopped: " \
                f"{sorted(set(after_topics) - _terminals(rec.messages))}"
            assert b1.stats["accepted"] == before + 6
    finally:
        device.close()
        rec.close()


SHUTDOWN_MESSAGE = "the bridge is shutting down; send the request again"


def _stalling(path: str, body: dict[str, Any]) -> list[Action]:
    """A backend that never finishes: headers, one piece of text unless the prompt says
    "silent", then nothing until the bridge closes the connection (bounded: 120 s)."""
    chat = path.endswith("chat/completions")
    piece = chat_chunk("Once") if chat else completion_chunk("Once")
    prompt = str(body.get("prompt") or "")
    head: list[Action] = [SSEHeaders()]
    if "silent" not in prompt:
        head.append(Send(event(piece)))
    return [*head, Stall(120)]


def test_clean_stop_ends_running_and_queued_requests_and_the_other_bridge_serves_resends(
    mosquitto: MosquittoProcess
) -> None:
    """README "Several bridges", first row: a bridge stopped cleanly (``Bridge.stop()``,
    what SIGTERM does) ends each queued and running request with one retryable
    ``backend_unavailable`` error, leaves the shared group first, goes offline with
    reason ``shutdown``; the devices' resends (same ids) are served by the other bridge."""
    host, port = mosquitto.host, mosquitto.port
    rec = Recorder(host, port, topic_filter="llm/#")
    device = Device.bare(mosquitto.host, mosquitto.port, "scale-device", protocol="5").connect()
    common: dict[str, Any] = {"protocol": "5", "shared_group": GROUP}
    # two running on b2's two slots (one has published text, one has not), two queued
    requests = {"dev-s0": "tell a story", "dev-s1": "silent", "dev-s2": "tell a story",
                "dev-s3": "silent"}
    topics = {client: f"llm/reply/{client}/stop-1" for client in requests}
    try:
        with FakeLlama(_stalling, slots=2) as slow, FakeLlama() as fast, \
                running_bridge(host, port, [slow.url], bridge_id="b2", **common) as b2:
            assert b2.workers is not None and b2.workers.size == 2
            # b2 is the group's only member: it takes all four
            for client, prompt in requests.items():
                device.request_as(client, {"id": "stop-1", "prompt": prompt, "max_tokens": 32})
                assert rec.wait_for(_seen(topics[client]), 30)
            # poll until two are surely running (the backend holds them) and two queued
            gens = slow.wait_generations(2, 30)
            assert all(g.stall_started.wait(30) for g in gens)
            assert rec.wait_for(lambda ms: any(
                m.topic == topics["dev-s0"] and b'"chunk"' in m.payload for m in ms), 30)
            states = poll_until(lambda: sorted(j.state for j in b2.jobs.snapshot()),
                                lambda s: s == ["queued", "queued", "running", "running"], 30)
            assert states == ["queued", "queued", "running", "running"], states
            assert len(b2.queue) == 2
            starts: dict[str, Any] = {c: decode_reply(rec.on_topic(t)[0].payload)
                                      for c, t in topics.items()}
            assert [starts[c].queue for c in requests] == [0, 0, 1, 2], starts

            with running_bridge(host, port, [fast.url], bridge_id="b1", **common) as b1:
                assert rec.wait_for(lambda ms: any(
                    m.topic == "llm/status/b1" and b'"online"' in m.payload for m in ms), 30)

                # Record where the recorder stood when b2 had left the group.
                left_at: list[int] = []
                leave = b2.link.leave_shared

                def leave_and_mark(timeout: float = 5.0) -> None:
                    leave(timeout)
                    left_at.append(len(rec.messages))

                b2.link.leave_shared = leave_and_mark  # type: ignore[method-assign]
                b2.stop()
                assert left_at, "Bridge.stop() did not leave the shared group"

                # Each request ends with exactly one terminal message: the shutdown error.
                assert rec.wait_for(lambda ms: _terminals(ms) >= set(topics.values()), 30), \
                    sorted(set(topics.values()) - _terminals(rec.messages))
                by_topic = _by_topic(rec.messages)
                for client, topic in topics.items():
                    replies = by_topic[topic]
                    assert_exactly_once(replies)
                    end = replies[-1]
                    assert end.type == "error", (client, end)
                    assert (end.code, end.retryable, end.message) == \
                        ("backend_unavailable", True, SHUTDOWN_MESSAGE), (client, end)
                    # the error went out after b2 had left the group
                    index = next(i for i, m in enumerate(rec.messages) if m.topic == topic
                                 and decode_reply(m.payload).type == "error")
                    assert index >= left_at[0], (client, index, left_at)
                assert any(r.type == "chunk" for r in by_topic[topics["dev-s0"]])
                # the running requests' HTTP calls were closed: llama-server frees the slots
                assert all(g.client_closed.wait(10) for g in gens)
                assert len(slow.generations) == 2  # the queued ones never reached it
                assert b2.stats["accepted"] == 4 and b2.stats["errors"] == 4

                # b2's retained status: offline, reason shutdown
                retained = Recorder(host, port, topic_filter="llm/status/b2")
                try:
                    assert retained.wait_for(lambda ms: bool(ms), 10)
                    last = retained.messages[-1]
                    assert last.retain
                    status = json.loads(last.payload)
                    assert (status["state"], status["reason"]) == ("offline", "shutdown")
                finally:
                    retained.close()

                # The devices resend with the same ids: b1 serves them, from seq 0 again.
                resent_at = len(rec.messages)
                for client, prompt in requests.items():
                    device.request_as(client, {"id": "stop-1", "prompt": prompt,
                                               "max_tokens": 32})
                assert rec.wait_for(
                    lambda ms: _terminals(ms, resent_at) >= set(topics.values()), 60), \
                    sorted(set(topics.values()) - _terminals(rec.messages, resent_at))
                by_topic = _by_topic(rec.messages, resent_at)
                for topic in topics.values():
                    assert_exactly_once(by_topic[topic])
                    assert by_topic[topic][-1].type == "done", by_topic[topic][-1]
                assert b1.stats["accepted"] == 4
                assert sorted(g.prompt_text() for g in fast.generations) == \
                    sorted(requests.values())
                assert b2.stats["accepted"] == 4  # nothing more reached the stopped bridge
    finally:
        device.close()
        rec.close()


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_lost_bridge_goes_offline_by_will_and_resend_is_served_by_the_other(
    mosquitto: MosquittoProcess, llama_pair: list[str], tmp_path: Path, how: str
) -> None:
    """``sigkill``: the bridge crashes, the OS closes its socket, the broker knows at once.
    ``sigstop``: the bridge (or its host, or the network) freezes; the broker only knows
    when 1.5 x keepalive pass without a packet."""
    host, port = mosquitto.host, mosquitto.port
    keepalive, expiry = 5, 5
    env = {"BRIDGE_MQTT__KEEPALIVE_S": str(keepalive),
           "BRIDGE_MQTT__SESSION_EXPIRY_S": str(expiry), "BRIDGE_MAX_TOKENS_CAP": "2000",
           "BRIDGE_LOG_LEVEL": "INFO"}
    rec = Recorder(host, port, topic_filter="llm/#")
    device = Device.bare(mosquitto.host, mosquitto.port, "scale-device", protocol="5").connect()
    try:
        metrics_port = free_port()
        with bridge_process(tmp_path, mosquitto.host, mosquitto.port, llama_pair, "b2",
                            env, metrics_port, shared_group=GROUP) as proc:
            def b2_status(ms: list[Recorded], state: str, since: int = 0) -> bool:
                return any(m.topic == "llm/status/b2" and json.loads(m.payload)["state"] == state
                           for m in ms[since:])

            assert rec.wait_for(lambda ms: b2_status(ms, "online"), 60), \
                (tmp_path / "b2.log").read_text(errors="replace")[-3000:]
            # `run --metrics-port` serves the bridge's metrics
            metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert 'llm_bridge_info{bridge_id="b2"' in metrics
            # b2 is the group's only member: it takes the long request
            topic = "llm/reply/dev-will/long"
            device.request_as("dev-will", {"id": "long", "prompt": "Count: one, two, three,",
                                           "max_tokens": 2000})
            assert rec.wait_for(lambda ms: any(m.topic == topic and b'"chunk"' in m.payload
                                               for m in ms), TIMEOUT)
            with running_bridge(host, port, llama_pair, protocol="5", bridge_id="b1",
                                shared_group=GROUP, max_tokens_cap=2000) as b1:
                killed_at = time.monotonic()
                since = len(rec.messages)
                proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)

                # The broker publishes the Will when the session ends (Will Delay = session
                # expiry), that is `expiry` s after it notices the connection is gone: at
                # once after a crash, after 1.5 x keepalive for a frozen bridge. From then
                # on no request is routed to the lost bridge.
                assert rec.wait_for(lambda ms: b2_status(ms, "offline", since),
                                    1.5 * keepalive + expiry + 30)
                offline_after = time.monotonic() - killed_at
                proc.send_signal(signal.SIGKILL)  # a frozen one holds a llama.cpp slot
                proc.wait(10)
                will = next(json.loads(m.payload) for m in rec.messages[since:]
                            if m.topic == "llm/status/b2")
                assert will["reason"] == "connection lost", will
                noticed = 0.0 if how == "sigkill" else 1.5 * keepalive
                assert offline_after >= noticed + expiry - 0.5, offline_after

                # The request b2 was running never ends: the device must time out.
                first = _by_topic(rec.messages)[topic]
                assert not any(r.type in TERMINAL_TYPES for r in first), first[-1]
                assert [r.seq for r in first] == list(range(len(first)))

                # The device resends with the same id: b1 has never seen it, so it runs it;
                # the answer starts again at seq 0.
                resent_at = len(rec.messages)
                device.request_as("dev-will", {"id": "long", "prompt": "Count: one, two, three,",
                                               "max_tokens": 8})
                assert rec.wait_for(lambda ms: topic in _terminals(ms, resent_at), TIMEOUT)
                second = _by_topic(rec.messages, resent_at)[topic]
                assert_exactly_once(second)
                assert second[-1].type == "done"

                # New requests all reach b1: the dead bridge's session is gone.
                after = []
                for i in range(6):
                    device.request_as(f"dev-{i}", {"id": "after-kill", "prompt": "Hi",
                                                   "max_tokens": 3})
                    after.append(f"llm/reply/dev-{i}/after-kill")
                assert rec.wait_for(lambda ms: _terminals(ms) >= set(after), 60), \
                    sorted(set(after) - _terminals(rec.messages))
                assert b1.stats["accepted"] == 7
    finally:
        device.close()
        rec.close()


def test_crashed_bridge_over_mqtt_311_gives_up_its_share_at_once(
    mosquitto: MosquittoProcess, llama_pair: list[str], tmp_path: Path
) -> None:
    """MQTT 3.1.1 cannot bound a session's life, so a bridge in a shared group connects
    with a clean session: once it crashes, every request goes to the others."""
    host, port = mosquitto.host, mosquitto.port
    rec = Recorder(host, port, topic_filter="llm/#")
    device = Device.bare(mosquitto.host, mosquitto.port, "scale-device", protocol="5").connect()
    try:
        with running_bridge(host, port, llama_pair, protocol="3.1.1", bridge_id="b1",
                            shared_group=GROUP) as b1, \
                bridge_process(tmp_path, mosquitto.host, mosquitto.port, llama_pair, "b3", {},
                               free_port(), protocol="3.1.1", shared_group=GROUP) as proc:
            assert rec.wait_for(lambda ms: any(
                m.topic == "llm/status/b3" and b'"online"' in m.payload for m in ms), 60), \
                (tmp_path / "b3.log").read_text(errors="replace")[-3000:]
            since = len(rec.messages)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert rec.wait_for(lambda ms: any(
                m.topic == "llm/status/b3" and b'"offline"' in m.payload
                for m in ms[since:]), 30)
            topics = []
            for i in range(6):
                device.request_as(f"dev-{i}", {"id": "after-crash", "prompt": "Hi",
                                               "max_tokens": 3})
                topics.append(f"llm/reply/dev-{i}/after-crash")
            assert rec.wait_for(lambda ms: _terminals(ms) >= set(topics), 60), \
                sorted(set(topics) - _terminals(rec.messages))
            assert b1.stats["accepted"] == 6
    finally:
        device.close()
        rec.close()
