"""AsyncBridgeClient against the real bridge, real llama.cpp and Mosquitto: a streamed
answer, a cancel, ten concurrent requests on one connection, a resend that a restarted
bridge answers; and, with Mosquitto alone, TCP_NODELAY, TLS with a password, resends and
every wait's bound.

Gemma 3 270M is a base model, so answers are compared with what other readers got for the
same request (the sync client, a raw ``#`` subscriber), never with expected words.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from bridge import AsyncBridgeClient, BridgeClient, MqttSettings, ReplyTimeout
from bridge.protocol.errors import RequestRejected
from bridge.protocol.messages import ErrorCode, decode_reply
from tests.support.bridge_proc import running_bridge
from tests.support.cli_proc import RunningBridge
from tests.support.processes import BrokerInfo, MosquittoProcess, free_port
from tests.support.prompts import SEED, user
from tests.support.recorder import Recorder, check_reply_stream, text_of
from tests.support.waiting import LOOPBACK_TIMEOUT, REPLY_TIMEOUT, poll_until

PROTOCOLS = ["3.1.1", "5"]


def _settings(broker: BrokerInfo) -> MqttSettings:
    """The ``[mqtt]`` settings of a device on ``broker`` (credentials and TLS included)."""
    return MqttSettings.model_validate({
        "host": broker.host, "port": broker.port, "protocol": broker.protocol,
        "username": broker.username, "password": broker.password,
        "tls": broker.tls, "ca_file": broker.ca_file})


def _wire(recorder: Recorder, topic: str) -> list[Any]:
    """The messages a raw ``#`` subscriber got on ``topic``, by seq (copies dropped)."""
    recorder.wait_terminal(topic, LOOPBACK_TIMEOUT)
    return sorted({m.seq: m for m in map(decode_reply, (r.payload for r in
                                                        recorder.on_topic(topic)))}.values(),
                  key=lambda m: m.seq)


def _requests_of(recorder: Recorder, topic: str) -> list[bytes]:
    return [r.payload for r in recorder.on_topic(topic)]


def _no_delay_on_sockets_to(port: int) -> list[int]:
    """TCP_NODELAY of every socket of this process connected to ``port``."""
    values = []
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == port and conn.fd >= 0:
            with socket.socket(fileno=os.dup(conn.fd)) as sock:
                values.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return values


# --------------------------------------------------------------------------- with a bridge


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_streamed_answer_equals_the_sync_clients_and_the_wire(
        mosquitto: MosquittoProcess, llama_server: str, protocol: Any) -> None:
    broker = mosquitto.info(protocol)
    request = {"messages": [user("Write one sentence about the sea.")], "temperature": 0,
               "seed": SEED, "max_tokens": 32}
    recorder = Recorder(broker.host, broker.port)
    try:
        with running_bridge(broker.host, broker.port, [llama_server], protocol=protocol):
            with BridgeClient(_settings(broker), client="dev-sync") as sync_dev:
                sync_msgs = list(sync_dev.ask(request, idle_timeout=REPLY_TIMEOUT))
            async with AsyncBridgeClient(_settings(broker), client="kitchen") as dev:
                msgs = [m async for m in dev.ask({**request, "id": "a1"},
                                                 idle_timeout=REPLY_TIMEOUT)]
                pieces = [t async for t in dev.stream_text({**request, "id": "a2"},
                                                           idle_timeout=REPLY_TIMEOUT)]
            wire = _wire(recorder, "llm/reply/kitchen/a1")
    finally:
        recorder.close()
    check_reply_stream(msgs)
    assert msgs[0].type == "start" and msgs[-1].type == "done"
    assert msgs == wire  # what the device yielded is what the bridge sent, in seq order
    assert text_of(msgs) and text_of(msgs) == text_of(sync_msgs) == "".join(pieces)
    assert len(pieces) > 1  # pieces as they came, not one string at the end


@pytest.mark.asyncio
async def test_cancel_ends_in_done_cancelled_and_frees_the_slot(
        mosquitto: MosquittoProcess, llama_server: str) -> None:
    broker = mosquitto.info("5")
    with running_bridge(broker.host, broker.port, [llama_server], protocol="5",
                        max_tokens_cap=2000):
        async with AsyncBridgeClient(_settings(broker), client="dev-cancel") as dev:
            msgs = []
            async for msg in dev.ask({"id": "long", "max_tokens": 2000,
                                      "prompt": "Count from one to one thousand: one, two,"},
                                     idle_timeout=REPLY_TIMEOUT):
                msgs.append(msg)
                if msg.type == "chunk" and len(msgs) < 1000:
                    await dev.cancel("long")  # repeated cancels are harmless
            slots = await asyncio.to_thread(
                poll_until, lambda: requests.get(f"{llama_server}/slots", timeout=5).json(),
                lambda s: not any(slot["is_processing"] for slot in s), 10)
    check_reply_stream(msgs)
    assert any(m.type == "chunk" for m in msgs)
    assert msgs[-1].type == "done" and msgs[-1].finish_reason == "cancelled", msgs[-1]
    assert msgs[-1].usage.completion_tokens < 2000
    assert not any(slot["is_processing"] for slot in slots), slots


@pytest.mark.asyncio
async def test_ten_concurrent_asks_on_one_connection(mosquitto: MosquittoProcess,
                                                     llama_server: str) -> None:
    broker = mosquitto.info("5")
    recorder = Recorder(broker.host, broker.port)
    try:
        with running_bridge(broker.host, broker.port, [llama_server], protocol="5",
                            client_max_inflight=10):
            async with AsyncBridgeClient(_settings(broker), client="dash") as dev:

                async def one(i: int) -> list[Any]:
                    return [m async for m in dev.ask(
                        {"id": f"c{i}", "prompt": f"Story number {i}:", "max_tokens": 8},
                        idle_timeout=REPLY_TIMEOUT)]

                answers = await asyncio.wait_for(
                    asyncio.gather(*(one(i) for i in range(10))), REPLY_TIMEOUT * 2)
                texts = [t async for t in dev.stream_text("Say hi.", idle_timeout=REPLY_TIMEOUT)]
                assert dev.dropped == 0 and dev.undecodable == 0 and dev.resends == 0
            wires = [_wire(recorder, f"llm/reply/dash/c{i}") for i in range(10)]
    finally:
        recorder.close()
    for i, msgs in enumerate(answers):
        check_reply_stream(msgs)
        assert msgs[0].id == f"c{i}" and msgs[-1].type == "done", msgs[-1]
        assert text_of(msgs)
        assert msgs == wires[i]  # each got its own answer, whole and in order
    assert max(msgs[0].queue for msgs in answers) > 0, "no request waited for a slot"
    assert "".join(texts)  # plain text went as a JSON request with an id


@pytest.mark.asyncio
async def test_a_restarted_bridge_answers_the_resend(mosquitto: MosquittoProcess,
                                                     llama_server: str,
                                                     tmp_path: Path) -> None:
    """The bridge is killed (SIGKILL: nothing is cleaned up, no error is sent) while it
    streams; the client hears nothing, resends the same request with the same id, and the
    bridge started again answers it from the start. The text the client gives out is the
    answer's, once.

    The first bridge sends every token at once, the second coalesces them (``flush_ms``),
    so the new answer is cut into other chunks than the first: the client cannot take its
    messages for copies, it must see the answer start again and skip the text it gave.
    """
    broker = mosquitto.info("5")
    request = {"id": "r1", "messages": [user("Describe a lighthouse.")], "temperature": 0,
               "seed": SEED, "max_tokens": 40}

    def start_bridge(flush_ms: int) -> RunningBridge:
        # a heartbeat would send coalesced text early: keep it past the coalescing time
        env = {**os.environ, "BRIDGE_HEARTBEAT_S": str(max(0.5, 2 * flush_ms / 1000))}
        bridge = RunningBridge("--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
                               "--mqtt-protocol", "5", "--llama-url", llama_server,
                               "--bridge-id", "restarting", "--flush-ms", str(flush_ms),
                               "--sessions-db", str(tmp_path / "sessions.db"), env=env)
        bridge.wait_ready()
        return bridge

    recorder = Recorder(broker.host, broker.port)
    first = await asyncio.to_thread(start_bridge, 0)
    second: RunningBridge | None = None
    try:
        with BridgeClient(_settings(broker), client="dev-ref") as sync_dev:
            reference = text_of(list(sync_dev.ask({**request, "id": "ref"},
                                                  idle_timeout=REPLY_TIMEOUT)))
        async with AsyncBridgeClient(_settings(broker), client="dev-r", resend_after_s=1.5,
                                     max_resends=40) as dev:
            pieces: list[str] = []
            streaming = asyncio.Event()

            async def read() -> None:
                async for text in dev.stream_text(request, idle_timeout=REPLY_TIMEOUT):
                    pieces.append(text)
                    if len(pieces) == 2:
                        streaming.set()

            reader = asyncio.create_task(read())
            await asyncio.wait_for(streaming.wait(), REPLY_TIMEOUT)
            await asyncio.to_thread(first.stop, signal.SIGKILL)
            cut = "".join(pieces)
            # Coalesced for 5 s: even on a loaded machine (a token a second) the new
            # answer is cut into other chunks than the first, one token each.
            second = await asyncio.to_thread(start_bridge, 5000)
            await asyncio.wait_for(reader, REPLY_TIMEOUT)
            resends = dev.resends
    finally:
        for bridge in (first, second):
            if bridge is not None:
                bridge.stop()
        recorder.close()
    sent = _requests_of(recorder, "llm/request/dev-r")
    replies = [decode_reply(r.payload) for r in recorder.on_topic("llm/reply/dev-r/r1")]
    assert resends >= 1 and len(sent) == 1 + resends and len(set(sent)) == 1  # same id, bytes
    assert sum(m.type == "start" for m in replies) >= 2, "the answer did not start again"
    cuts: dict[int, set[str | None]] = {}
    for m in replies:
        if m.type == "chunk":
            cuts.setdefault(m.seq, set()).add(m.text)
    assert any(len(texts) > 1 for texts in cuts.values()), \
        "the new answer was cut as the first one: its start again was not tested"
    assert cut and cut != reference, "the bridge was killed after the answer had ended"
    assert "".join(pieces) == reference


@pytest.mark.asyncio
async def test_tls_and_a_password_as_the_sync_client(mosquitto_secure: MosquittoProcess,
                                                     llama_server: str) -> None:
    login = mosquitto_secure.info("5", "bridge@1")
    with running_bridge(login.host, login.port, [llama_server], protocol="5",
                        bridge_id="bridge-1",
                        mqtt={"username": "bridge@1", "password": login.password}):
        for protocol in PROTOCOLS:
            device = _settings(mosquitto_secure.info(protocol, "dev-a", tls=True))
            async with AsyncBridgeClient(device, client="dev-a") as dev:
                msgs = [m async for m in dev.ask({"prompt": "Hello", "max_tokens": 4},
                                                 idle_timeout=REPLY_TIMEOUT)]
            check_reply_stream(msgs)
            assert msgs[-1].type == "done", msgs[-1]
            with BridgeClient(device, client="dev-a") as sync_dev:
                assert list(sync_dev.ask({"prompt": "Hi", "max_tokens": 2},
                                         idle_timeout=REPLY_TIMEOUT))[-1].type == "done"
        wrong = _settings(mosquitto_secure.info("5", "dev-a", tls=True)).model_copy(
            update={"password": None})
        with pytest.raises(ConnectionError, match="did not accept us"):
            await AsyncBridgeClient(wrong, client="dev-a").connect()


@pytest.mark.asyncio
async def test_an_error_reply_raises_its_typed_exception(mosquitto: MosquittoProcess,
                                                         llama_server: str) -> None:
    broker = mosquitto.info("3.1.1")
    with running_bridge(broker.host, broker.port, [llama_server], protocol="3.1.1"):
        async with AsyncBridgeClient(_settings(broker)) as dev:
            with pytest.raises(RequestRejected, match="colour") as raised:
                async for _ in dev.stream_text({"prompt": "x", "colour": "red"},
                                               idle_timeout=REPLY_TIMEOUT):
                    pass
    assert raised.value.code == ErrorCode.bad_request and not raised.value.retryable


# --------------------------------------------------------------------------- broker only


@pytest.mark.asyncio
async def test_nagle_is_off_on_both_clients_sockets(mosquitto: MosquittoProcess) -> None:
    broker = mosquitto.info("5")
    async with AsyncBridgeClient(_settings(broker)):
        assert _no_delay_on_sockets_to(broker.port) == [1]
        with BridgeClient(_settings(broker)):
            assert _no_delay_on_sockets_to(broker.port) == [1, 1]


@pytest.mark.asyncio
async def test_silence_means_bounded_resends_then_reply_timeout(
        mosquitto: MosquittoProcess) -> None:
    """No bridge: the request goes out 1 + max_resends times, identical, then the client
    gives up after ``idle_timeout``; the sync client does the same."""
    broker = mosquitto.info("5")
    recorder = Recorder(broker.host, broker.port, topic_filter="llm/request/+")
    try:
        async with AsyncBridgeClient(_settings(broker), client="alone", resend_after_s=0.3,
                                     max_resends=2) as dev:
            with pytest.raises(ReplyTimeout, match="after 2 resends"):
                async for _ in dev.ask({"id": "q", "prompt": "x"}, idle_timeout=1.5):
                    pass
        with BridgeClient(_settings(broker), client="alone-sync", resend_after_s=0.3,
                          max_resends=2) as sync_dev, pytest.raises(ReplyTimeout):
            list(sync_dev.ask({"id": "q", "prompt": "x"}, idle_timeout=1.5))
        assert recorder.wait_for(lambda ms: len(ms) == 6, LOOPBACK_TIMEOUT), recorder.messages
    finally:
        recorder.close()
    for client in ("alone", "alone-sync"):
        sent = [m.payload for m in recorder.messages if m.topic == f"llm/request/{client}"]
        assert len(sent) == 3 and len(set(sent)) == 1, sent


@pytest.mark.asyncio
async def test_ids_its_replies_could_not_reach_are_refused(mosquitto: MosquittoProcess) -> None:
    broker = mosquitto.info("5")
    recorder = Recorder(broker.host, broker.port, topic_filter="llm/request/+")
    try:
        async with AsyncBridgeClient(_settings(broker), client="ids") as dev:
            with pytest.raises(ValueError, match="invalid request id"):
                await anext(dev.ask({"id": "a/b", "prompt": "x"}))
            waiting = asyncio.create_task(anext(dev.ask({"id": "twice", "prompt": "x"},
                                                        idle_timeout=3)))
            assert await asyncio.to_thread(
                recorder.wait_for, lambda ms: len(ms) == 1, LOOPBACK_TIMEOUT)
            with pytest.raises(ValueError, match="already being read"):
                await anext(dev.ask({"id": "twice", "prompt": "y"}))
            with pytest.raises(ReplyTimeout):  # no bridge; resent only after 15 s
                await asyncio.wait_for(waiting, LOOPBACK_TIMEOUT)
    finally:
        recorder.close()
    assert [m.payload for m in recorder.messages] == [b'{"id": "twice", "prompt": "x"}']


@pytest.mark.asyncio
async def test_close_and_a_lost_broker_end_every_wait(mosquitto: MosquittoProcess) -> None:
    broker = mosquitto.info("5")
    recorder = Recorder(broker.host, broker.port, topic_filter="llm/request/+")

    def sent_by(client: str) -> bool:  # then its reader waits for replies
        return recorder.wait_for(lambda ms: any(m.topic == f"llm/request/{client}"
                                                for m in ms), LOOPBACK_TIMEOUT)

    try:
        dev = AsyncBridgeClient(_settings(broker), client="closing")
        await dev.connect()
        waiting = asyncio.create_task(anext(dev.ask({"id": "w", "prompt": "x"})))
        assert await asyncio.to_thread(sent_by, "closing")
        await asyncio.wait_for(dev.close(), LOOPBACK_TIMEOUT)
        with pytest.raises(ConnectionError, match="closed"):
            await asyncio.wait_for(waiting, LOOPBACK_TIMEOUT)
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("bridge-replies")]

        async with AsyncBridgeClient(_settings(broker), client="stranded") as dev:
            waiting = asyncio.create_task(anext(dev.ask({"id": "w", "prompt": "x"})))
            assert await asyncio.to_thread(sent_by, "stranded")
            await asyncio.to_thread(mosquitto.kill)
            with pytest.raises(ConnectionError, match="lost the connection"):
                await asyncio.wait_for(waiting, LOOPBACK_TIMEOUT)
            with pytest.raises(ConnectionError):
                await dev.cancel("w")
    finally:
        recorder.close()

    nobody = MqttSettings(host=broker.host, port=free_port())
    with pytest.raises(ConnectionError, match="cannot reach"):
        await AsyncBridgeClient(nobody).connect()


@pytest.mark.asyncio
async def test_a_broker_lost_while_a_puback_is_awaited_ends_that_wait_at_once(
        mosquitto: MosquittoProcess) -> None:
    """aiomqtt would wait for the PUBACK until its own timeout (60 s here); the client ends
    the wait when its reader sees the connection lost."""
    broker = mosquitto.info("5")
    async with AsyncBridgeClient(_settings(broker), client="frozen", timeout=60.0) as dev:
        await asyncio.to_thread(mosquitto.pause)  # takes the PUBLISH, sends no PUBACK
        waiting = asyncio.create_task(anext(dev.ask({"id": "w", "prompt": "x"})))
        await asyncio.to_thread(mosquitto.kill)
        with pytest.raises(ConnectionError, match="lost the connection"):
            await asyncio.wait_for(waiting, LOOPBACK_TIMEOUT)  # well under the 60 s
