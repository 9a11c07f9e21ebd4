"""Several llama-servers behind one bridge: choice, model routing, failover.

The unit tests drive :class:`BackendPool`'s choice with hand-set state; the rest run
two real llama.cpp servers (``make_llama``, one slot each) behind a real bridge, on
amqtt (MQTT 3.1.1) and on Mosquitto (MQTT 5), and ask each server's own ``/metrics``
which of them generated what.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import requests

from bridge.config.settings import LlamaSettings, MqttSettings
from bridge.llama.pool import BackendPool, model_names
from bridge.mqtt.device import BridgeClient
from bridge.protocol.errors import BackendUnavailable, RequestRejected
from bridge.protocol.messages import ErrorCode
from tests.support.bridge_proc import running_bridge
from tests.support.processes import BrokerInfo, EmbeddedLlama
from tests.support.recorder import Recorder, check_reply_stream, text_of
from tests.support.waiting import REPLY_TIMEOUT as TIMEOUT

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"

# ---------------------------------------------------------------------------- unit


def _pool(n: int = 2) -> BackendPool:
    pool = BackendPool(LlamaSettings(), [f"http://127.0.0.1:{9 + i}" for i in range(n)])
    for i, b in enumerate(pool.backends):
        b.healthy, b.slots = True, 2
        b.models = [f"m{i}"]
        b.names = model_names([f"/models/m{i}.gguf", f"m{i}"])
    return pool


def test_model_names_accept_id_file_name_and_stem() -> None:
    names = model_names(["/root/.cache/x/Gemma-3-270M-Q4_K_M.gguf", "alpha", ""])
    assert {"alpha", "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-q4_k_m",
            "/root/.cache/x/gemma-3-270m-q4_k_m.gguf"} == names


def test_most_free_slots_then_least_recently_used() -> None:
    pool = _pool(3)
    a, b, c = pool.backends
    c.slots = 4
    assert pool.acquire() is c  # 4 free beats 2
    assert pool.acquire() is c  # 3 free
    assert pool.acquire() is a  # a, b, c all 2 free: a and b never used, a first
    assert pool.acquire() is b  # a now has 1 free
    assert pool.acquire() is c  # 2 free vs 1, 1
    for backend in (a, b, c, c, c):
        pool.release(backend)
    assert [x.active for x in pool.backends] == [0, 0, 0]
    # sequential requests alternate instead of always landing on the first backend
    order = []
    for _ in range(4):
        got = pool.acquire(exclude={c.url})
        order.append(got.url)
        pool.release(got)
    assert order == [a.url, b.url, a.url, b.url]


def test_a_preferred_backend_is_taken_while_it_is_healthy_and_has_a_free_slot() -> None:
    pool = _pool(2)
    a, b = pool.backends
    b.slots = 4  # the usual choice would be b (most free slots)
    assert pool.acquire(prefer=a.url) is a
    assert pool.acquire(prefer=a.url) is a  # its second slot
    assert pool.acquire(prefer=a.url) is b  # a is full: the usual choice
    pool.release(a)
    a.healthy = False
    assert pool.acquire(prefer=a.url) is b  # unhealthy: never
    a.healthy = True
    assert pool.acquire(prefer=a.url, exclude={a.url}) is b  # it failed this request
    assert pool.acquire(prefer=a.url, model="m1") is b  # it does not serve the model
    assert [x.active for x in pool.backends] == [1, 4]
    pool.release(b)
    assert pool.acquire(prefer="http://127.0.0.1:1") is a  # unknown here: the usual choice


def test_model_routing_and_its_errors() -> None:
    pool = _pool(2)
    a, b = pool.backends
    assert pool.acquire(model="m1") is b
    assert pool.acquire(model="M0.GGUF") is a  # file name, any case
    with pytest.raises(RequestRejected) as rejected:
        pool.acquire(model="m9")
    assert rejected.value.code == ErrorCode.bad_request
    assert "'m0', 'm1'" in rejected.value.message and "m9" in rejected.value.message
    # b is down: it may serve m9 when back, so this is not the device's fault
    b.healthy = False
    with pytest.raises(BackendUnavailable, match=re.escape(b.url)):
        pool.acquire(model="m9")
    with pytest.raises(BackendUnavailable):
        pool.acquire(model="m1")
    a.healthy = False
    with pytest.raises(BackendUnavailable, match="no healthy llama-server"):
        pool.acquire()


# ---------------------------------------------------------------------------- real servers


def _predicted(llama: EmbeddedLlama) -> int:
    """Tokens this llama-server generated since it started (its own /metrics)."""
    text = requests.get(f"{llama.url}/metrics", timeout=10).text
    match = re.search(r"^llamacpp:tokens_predicted_total (\d+)", text, re.M)
    assert match, text[:500]
    return int(match.group(1))


def _status(rec: Recorder, bridge_id: str, want: Callable[[dict[str, Any]], bool],
            since: int = 0, timeout: float = 30.0) -> dict[str, Any]:
    """Wait for a status message of ``bridge_id`` (the ``since``-th recorded message or
    later) that satisfies ``want``."""
    topic = f"llm/status/{bridge_id}"

    def matching(msgs: list[Any]) -> list[dict[str, Any]]:
        return [body for m in msgs[since:] if m.topic == topic
                for body in (json.loads(m.payload),) if want(body)]

    assert rec.wait_for(lambda ms: bool(matching(ms)), timeout), \
        f"no matching status of {bridge_id}: {[m.payload[:300] for m in rec.on_topic(topic)]}"
    return matching(rec.messages)[-1]


def _backend(status: dict[str, Any], name: str) -> dict[str, Any]:
    """A backend in a status message, by its name (the status never shows URLs)."""
    return next(b for b in status["backends"] if b["name"] == name)


@pytest.fixture
def two_llamas(make_llama: Callable[..., EmbeddedLlama]) -> tuple[EmbeddedLlama, EmbeddedLlama]:
    """Two real llama.cpp servers, one slot each, reporting the models ``alpha`` and ``beta``."""
    return (make_llama(parallel=1, ctx=1024, threads=1, alias="alpha"),
            make_llama(parallel=1, ctx=1024, threads=1, alias="beta"))


#: The real-llama tests that do not depend on the MQTT version run on amqtt (3.1.1) and on
#: Mosquitto (MQTT 5); the brokers are cheap next to the two llama.cpp servers.
BROKERS = pytest.mark.parametrize("broker", ["amqtt", "mosquitto-v5"], indirect=True)


@BROKERS
def test_requests_spread_and_route_by_model(
    two_llamas: tuple[EmbeddedLlama, EmbeddedLlama], broker: BrokerInfo
) -> None:
    alpha, beta = two_llamas
    settings = MqttSettings(host=broker.host, port=broker.port, protocol=broker.protocol)
    with running_bridge(broker.host, broker.port, [alpha.url, beta.url],
                        protocol=broker.protocol) as bridge, \
            BridgeClient(settings, client="dev-models") as dev:
        assert bridge.workers is not None and bridge.workers.size == 2  # 1 + 1 slots
        assert bridge.link.is_v5 == broker.v5

        def ask(**fields: Any) -> list[Any]:
            msgs = list(dev.ask({"prompt": "Hi", "max_tokens": 4, **fields},
                                idle_timeout=TIMEOUT))
            check_reply_stream(msgs)
            return msgs

        # one request at a time still reaches both servers (least recently used wins ties)
        before = (_predicted(alpha), _predicted(beta))
        for _ in range(4):
            assert ask()[-1].type == "done"
        after = (_predicted(alpha), _predicted(beta))
        assert after[0] > before[0] and after[1] > before[1], (before, after)

        # a named model runs only where it is served: by alias, file name or its stem
        for model, served, idle in (("alpha", alpha, beta), ("BETA", beta, alpha)):
            before = (_predicted(served), _predicted(idle))
            for _ in range(2):
                assert ask(model=model)[-1].type == "done"
            assert _predicted(served) > before[0] and _predicted(idle) == before[1]
        for model in (GEMMA_FILE, GEMMA_FILE.removesuffix(".gguf")):
            assert ask(model=model)[-1].type == "done"

        # a model no backend has: bad_request naming what there is (all backends are up)
        msgs = ask(model="gamma")
        assert [m.type for m in msgs] == ["start", "error"]
        assert msgs[-1].code == "bad_request" and not msgs[-1].retryable
        assert "'alpha', 'beta'" in msgs[-1].message and "gamma" in msgs[-1].message
        snapshot = {b["name"]: b["models"] for b in
                    json.loads(bridge.status.payload())["backends"]}
        assert snapshot == {"backend-1": ["alpha"], "backend-2": ["beta"]}


@BROKERS
def test_failover_before_first_byte_only_then_put_back(
    two_llamas: tuple[EmbeddedLlama, EmbeddedLlama], broker: BrokerInfo,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two_llamas
    monkeypatch.setenv("BRIDGE_LLAMA__HEALTH_INTERVAL_S", "0.5")
    settings = MqttSettings(host=broker.host, port=broker.port, protocol=broker.protocol)
    rec = Recorder(broker.host, broker.port, v5=broker.v5, topic_filter="llm/status/+")
    try:
        with running_bridge(broker.host, broker.port, [first.url, second.url],
                            protocol=broker.protocol, bridge_id="failover",
                            max_tokens_cap=2000, status_interval_s=1) as bridge, \
                BridgeClient(settings, client="dev-failover") as dev:
            # 1. A server that dies mid-answer: the request ends with an error and is NOT
            #    retried elsewhere (its text was published; a retry would duplicate it).
            rid = dev.send({"prompt": "Count: one, two, three,", "max_tokens": 2000})
            seen: list[Any] = []
            for msg in dev.replies(rid, idle_timeout=TIMEOUT):
                seen.append(msg)
                if msg.type == "chunk" and len([m for m in seen if m.type == "chunk"]) == 2:
                    assert bridge.jobs[("dev-failover", rid)].backend == first.url
                    first.kill()
            check_reply_stream(seen)
            assert seen[-1].type == "error", seen[-1]
            assert seen[-1].code in ("backend_error", "backend_unavailable", "timeout")
            assert text_of(seen)  # what was sent stays sent; nothing after the error

            # 2. Requests keep succeeding on the other server; the dead one is taken out.
            since = len(rec.messages)
            for _ in range(4):
                msgs = list(dev.ask({"prompt": "Hi", "max_tokens": 4}, idle_timeout=TIMEOUT))
                check_reply_stream(msgs)
                assert msgs[-1].type == "done", msgs[-1]
            down = _status(rec, "failover",
                           lambda s: not _backend(s, "backend-1")["healthy"], since)
            assert _backend(down, "backend-2")["healthy"]
            assert _backend(down, "backend-1")["error"]

            # 3. Back up: the probe puts it back and it serves again.
            since = len(rec.messages)
            first.restart()
            _status(rec, "failover", lambda s: all(b["healthy"] for b in s["backends"]), since)
            before = _predicted(first)
            for _ in range(2):
                msgs = list(dev.ask({"prompt": "Hi", "max_tokens": 4}, idle_timeout=TIMEOUT))
                assert msgs[-1].type == "done", msgs[-1]
            assert _predicted(first) > before
    finally:
        rec.close()


@BROKERS
def test_failover_when_a_server_is_dead_before_the_probe_notices(
    two_llamas: tuple[EmbeddedLlama, EmbeddedLlama], broker: BrokerInfo,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that picks a dead server (still marked healthy) goes to the other one."""
    first, second = two_llamas
    monkeypatch.setenv("BRIDGE_LLAMA__HEALTH_INTERVAL_S", "3600")  # no probe during the test
    settings = MqttSettings(host=broker.host, port=broker.port, protocol=broker.protocol)
    with running_bridge(broker.host, broker.port, [first.url, second.url],
                        protocol=broker.protocol) as bridge, \
            BridgeClient(settings, client="dev-dead") as dev:
        assert all(b.healthy for b in bridge.pool.backends)
        first.kill()
        before = _predicted(second)
        msgs = list(dev.ask({"prompt": "Hi", "max_tokens": 4}, idle_timeout=TIMEOUT))
        check_reply_stream(msgs)
        assert msgs[-1].type == "done", msgs[-1]
        assert _predicted(second) > before
        dead = bridge.pool.backends[0]
        assert dead.url == first.url and not dead.healthy and dead.last_error
        # with the only other server down too, the device hears backend_unavailable
        second.kill()
        msgs = list(dev.ask({"prompt": "Hi", "max_tokens": 4}, idle_timeout=TIMEOUT))
        check_reply_stream(msgs)
        assert msgs[-1].type == "error" and msgs[-1].code == "backend_unavailable"
        assert msgs[-1].retryable
        # devices are not told where llama-server runs; the operator's log says it
        assert "127.0.0.1" not in msgs[-1].message and "http" not in msgs[-1].message
        # slots are released before the terminal message is published
        assert [b.active for b in bridge.pool.backends] == [0, 0]
