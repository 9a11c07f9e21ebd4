"""The fault suite's rig: devices with persistent sessions, stream bookkeeping, RSS sampling,
and the :class:`Result` row every scenario fills in (and the report prints).

A scenario is a plain function ``(env, sizes) -> Result`` in
:mod:`tests.faults.scenarios`; it starts what it needs (brokers, backends, the
bridge) in ``with`` blocks, so everything stops even when it fails, records its
figures in a :class:`Result`, states its expectations with :meth:`Result.expect`
and ends with :meth:`Result.check`, which raises :class:`ScenarioFailed` (an
``AssertionError``) listing every unmet expectation. The tests call the
functions with the short sizes, ``tests/faults/report.py`` with the long ones.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import psutil  # type: ignore[import-untyped]
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config.settings import load_config
from bridge.llama.embedded import EmbeddedLlama
from bridge.protocol.messages import TERMINAL_TYPES
from bridge.service.bridge import Bridge

SEED = 42
DEADLINE = 180.0  # generous bound on anything a scenario waits for (noisy 2-core machine)

# Prompts with nothing in common, so each stream is easy to tell apart in the tap.
PROMPTS = [
    "Apples are", "Bicycles can", "Copper is a", "Dolphins swim", "Elephants never",
    "Forests grow", "Glaciers move", "Harbours shelter", "Islands form", "Jaguars hunt",
    "Kettles whistle", "Lanterns glow", "Mountains rise", "Nebulae shine", "Oceans hold",
    "Pianos sound", "Quartz is", "Rivers carve", "Satellites orbit", "Tulips bloom",
    "Umbrellas open", "Volcanoes erupt", "Windmills turn", "Xylophones ring", "Yachts sail",
    "Zebras graze",
]


def prompt(i: int) -> str:
    """A distinct prompt for stream ``i``."""
    base = PROMPTS[i % len(PROMPTS)]
    return base if i < len(PROMPTS) else f"{base} (variant {i // len(PROMPTS)})"


# =========================================================================== results


class ScenarioFailed(AssertionError):
    """A scenario's expectations were not met; ``result`` holds its figures."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"{result.scenario}: " + "; ".join(result.failures))
        self.result = result


@dataclass
class Result:
    """One row of the reliability table.

    Attributes:
        scenario: what was done.
        load: how much (streams, requests).
        faults: what was injected.
        sent: requests sent.
        terminal: requests that got exactly one terminal message (after recovery, if any).
        lost: reply messages never received (``seq`` gaps, missing terminals), after
            recovery; plus requests silently dropped.
        duplicated: requests generated twice (backend requests beyond one), second
            terminal messages, and ``seq`` numbers received with different payloads.
        redelivered: harmless QoS 1 redeliveries (same ``seq``, same payload), removed
            by de-duplicating on ``seq``.
        max_rss_mb: peak resident memory of the process hosting the bridge, if sampled.
    """

    scenario: str
    load: str
    faults: str
    sent: int = 0
    terminal: int = 0
    lost: int = 0
    duplicated: int = 0
    redelivered: int = 0
    max_rss_mb: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        """A figure or remark for the report."""
        self.notes.append(text)

    def expect(self, condition: bool, message: str) -> None:
        """Record an expectation; unmet ones make :meth:`check` fail."""
        if not condition:
            self.failures.append(message)

    def check(self) -> Result:
        """Raise :class:`ScenarioFailed` if any expectation was not met; else return self."""
        self.seconds = time.monotonic() - self.started
        if self.failures:
            raise ScenarioFailed(self)
        return self


# =========================================================================== streams


@dataclass
class StreamView:
    """What a device received on one reply topic, de-duplicated by ``seq``."""

    topic: str
    deliveries: int = 0
    by_seq: dict[int, bytes] = field(default_factory=dict)
    conflicts: int = 0  # a seq received again with a different payload

    def add(self, payload: bytes) -> None:
        self.deliveries += 1
        try:
            seq = int(json.loads(payload)["seq"])
        except (ValueError, KeyError, TypeError):
            seq = -1 - self.deliveries  # not a reply message: keep it, it counts as a conflict
            self.conflicts += 1
        old = self.by_seq.get(seq)
        if old is None:
            self.by_seq[seq] = payload
        elif old != payload:
            self.conflicts += 1

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The distinct messages in ``seq`` order."""
        return [json.loads(self.by_seq[s]) for s in sorted(self.by_seq) if s >= 0]

    @property
    def redelivered(self) -> int:
        return self.deliveries - len(self.by_seq) - self.conflicts

    @property
    def terminals(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") in TERMINAL_TYPES]

    @property
    def terminal(self) -> dict[str, Any] | None:
        ends = self.terminals
        return ends[0] if ends else None

    @property
    def missing(self) -> int:
        """Messages known to be missing: ``seq`` gaps, plus one if no terminal arrived."""
        seqs = [s for s in self.by_seq if s >= 0]
        top = max(seqs) if seqs else -1
        gaps = (top + 1) - len(seqs)
        return gaps + (0 if self.terminals else 1)

    @property
    def complete(self) -> bool:
        """``seq`` 0..n without gaps, exactly one terminal message, and it is the last."""
        msgs = self.messages
        return (bool(msgs) and [m["seq"] for m in msgs] == list(range(len(msgs)))
                and len(self.terminals) == 1 and msgs[-1].get("type") in TERMINAL_TYPES
                and self.conflicts == 0)

    @property
    def text(self) -> str:
        return "".join(m.get("text") or "" for m in self.messages if m.get("type") == "chunk")

    def types(self) -> list[str]:
        return [str(m.get("type")) for m in self.messages]


def tally(res: Result, views: list[StreamView], generations_per_request: list[int] | None = None,
          *, streams: int | None = None) -> None:
    """Fill ``terminal``, ``lost``, ``duplicated`` and ``redelivered`` from the streams seen.

    Args:
        views: one per request that should have been answered.
        generations_per_request: backend requests seen for each (more than 1 = generated twice).
        streams: how many answered requests there should be (default ``res.sent``); fewer
            views count as requests silently dropped.
    """
    res.terminal = sum(1 for v in views if len(v.terminals) == 1)
    want = res.sent if streams is None else streams
    res.lost = sum(v.missing for v in views) + max(0, want - len(views))
    res.redelivered = sum(v.redelivered for v in views)
    res.duplicated = (sum(max(0, len(v.terminals) - 1) + v.conflicts for v in views)
                      + sum(max(0, n - 1) for n in generations_per_request or []))


# =========================================================================== devices


class Device:
    """A device: fixed client id, persistent session (3.1.1 ``clean_session=False`` or
    MQTT 5 session expiry), subscribed at QoS 1 to its whole reply namespace.

    It re-subscribes on every connection (harmless when the session survived, needed
    when the broker lost it), reconnects by itself, and records every message.

    Args:
        host, port: the broker.
        name: client id and ``{client}`` topic level.
        protocol: ``"5"`` or ``"3.1.1"``.
        persistent: keep the session across disconnects.
        will: ``(topic, payload)`` Last Will, published by the broker if the device vanishes.
        username, password, ca_file: credentials / TLS.
    """

    def __init__(self, host: str, port: int, name: str, *, protocol: Literal["5", "3.1.1"] = "5",
                 prefix: str = "llm", persistent: bool = True,
                 will: tuple[str, bytes] | None = None, username: str | None = None,
                 password: str | None = None, ca_file: Path | None = None,
                 subscribe: bool = True) -> None:
        self.host, self.port, self.name, self.prefix = host, port, name, prefix
        self.v5 = protocol == "5"
        self.persistent = persistent
        self.namespace = f"{prefix}/reply/{name}/"
        self._subscribe = subscribe
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name,
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                                  clean_session=None if self.v5 else not persistent)
        self.client.reconnect_delay_set(1, 2)
        self.client.max_queued_messages_set(0)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file is not None:
            import ssl

            self.client.tls_set(ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self._pubacks: dict[int, Any] = {}
        self.cond = threading.Condition()
        self.received: list[tuple[str, bytes]] = []
        self.terminal_topics: set[str] = set()  # topics on which a terminal message arrived
        self.by_topic: dict[str, list[bytes]] = {}
        self.connects = 0
        self.session_present: list[bool] = []
        self.connect_failure: str | None = None
        self._acks: dict[int, threading.Event] = {}
        self._codes: dict[int, list[Any]] = {}
        self._ack_lock = threading.Lock()
        self._subscribed = threading.Event()
        self._connack = threading.Event()

    # ------------------------------------------------------------------ connection

    def connect(self, timeout: float = 30.0) -> Device:
        props = None
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self.persistent:
                props.SessionExpiryInterval = 3600
            kwargs = {"clean_start": not self.persistent, "properties": props}
        self.client.connect(self.host, self.port, keepalive=30, **kwargs)
        self.client.loop_start()
        if not self._connack.wait(timeout):
            self.close()
            raise TimeoutError(f"{self.name}: no CONNACK within {timeout} s")
        if self.connect_failure:
            self.close()
            raise ConnectionRefusedError(f"{self.name}: {self.connect_failure}")
        if self._subscribe and not self._subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"{self.name}: no SUBACK within {timeout} s")
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT (crash, power cut): the broker publishes the Will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            with suppress(OSError):
                sock.close()

    def __enter__(self) -> Device:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def barrier(self, timeout: float = 30.0) -> None:
        """A SUBSCRIBE/SUBACK round trip once connected: what the broker had queued for
        us before it is delivered by the time this returns."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.client.is_connected() and self._subscribed.is_set():
                break
            self._subscribed.wait(0.2)
        self.subscribe(self.namespace + "#", timeout=max(1.0, end - time.monotonic()))

    def subscribe(self, topic: str, timeout: float = 30.0) -> list[Any]:
        """Subscribe at QoS 1 and wait for the SUBACK; returns its reason codes."""
        done = threading.Event()
        codes: list[Any] = []
        with self._ack_lock:
            rc, mid = self.client.subscribe(topic, qos=1)
            assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None, f"subscribe failed: {rc}"
            self._acks[mid] = done
            self._codes[mid] = codes
        assert done.wait(timeout), f"{self.name}: no SUBACK for {topic} within {timeout} s"
        return codes

    # ------------------------------------------------------------------ requests

    def request(self, payload: dict[str, Any] | str | bytes, *, topic: str | None = None,
                props: Properties | None = None, wait: bool = True) -> mqtt.MQTTMessageInfo:
        """Publish one request at QoS 1 (on ``P/request/{name}`` unless ``topic``)."""
        data = json.dumps(payload).encode() if isinstance(payload, dict) else \
            payload.encode() if isinstance(payload, str) else payload
        info = self.client.publish(topic or f"{self.prefix}/request/{self.name}", data, qos=1,
                                   properties=props)
        if wait:
            info.wait_for_publish(30)
        return info

    def cancel(self, request_id: str) -> None:
        self.client.publish(f"{self.prefix}/cancel/{self.name}", json.dumps({"id": request_id}),
                            qos=1).wait_for_publish(30)

    def topic(self, request_id: str) -> str:
        return f"{self.namespace}{request_id}"

    # ------------------------------------------------------------------ what arrived

    def view(self, topic: str) -> StreamView:
        view = StreamView(topic)
        with self.cond:
            payloads = list(self.by_topic.get(topic, ()))
        for payload in payloads:
            view.add(payload)
        return view

    def views(self) -> dict[str, StreamView]:
        """Every topic a message arrived on, with what arrived on it."""
        with self.cond:
            topics = list(self.by_topic)
        return {topic: self.view(topic) for topic in topics}

    def wait(self, predicate: Callable[[Device], bool], timeout: float = DEADLINE) -> bool:
        """Wait until ``predicate(self)`` holds (re-checked on every message)."""
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    def has_terminal(self, topic: str) -> bool:
        return topic in self.terminal_topics

    def wait_terminal(self, topic: str, timeout: float = DEADLINE) -> StreamView:
        self.wait(lambda d: topic in d.terminal_topics, timeout)
        return self.view(topic)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        if reason.is_failure:
            self.connect_failure = str(reason)
            self._connack.set()
            return
        self.connects += 1
        self.session_present.append(bool(flags.session_present))
        if self._subscribe:
            self._subscribed.clear()
            _, mid = client.subscribe(self.namespace + "#", qos=1)
            if mid is not None:
                with self._ack_lock:
                    self._acks[mid] = self._subscribed
        self._connack.set()

    def _on_disconnect(self, *args: Any) -> None:
        self._subscribed.clear()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any,
                      props: Any) -> None:
        with self._ack_lock:
            event = self._acks.pop(mid, None)
            target = self._codes.pop(mid, None)
        if target is not None:
            target.extend(codes)
        if event is not None:
            event.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    props: Any) -> None:
        with self.cond:
            self._pubacks[mid] = reason

    def puback_reason(self, mid: int) -> Any:
        """The PUBACK reason code of publish ``mid`` (MQTT 5: failure = refused)."""
        with self.cond:
            return self._pubacks.get(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        try:
            body = json.loads(payload)
            terminal = isinstance(body, dict) and body.get("type") in TERMINAL_TYPES
        except ValueError:
            terminal = False
        with self.cond:
            self.received.append((msg.topic, payload))
            self.by_topic.setdefault(msg.topic, []).append(payload)
            if terminal:
                self.terminal_topics.add(msg.topic)
            self.cond.notify_all()


def v5_props(*, response_topic: str | None = None, correlation: bytes | None = None,
             expiry: int | None = None) -> Properties:
    """PUBLISH properties for an MQTT 5 request."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    return props


# =========================================================================== sampling


@dataclass
class Sample:
    at: float
    rss: int
    fds: int


class ProcessSampler:
    """Samples a process's RSS and open file descriptors every ``interval`` seconds.

    Measurement, not waiting: the thread takes samples until :meth:`stop`.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.25) -> None:
        self.proc = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.samples: list[Sample] = []
        self.extra: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def __enter__(self) -> ProcessSampler:
        self.take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with suppress(psutil.Error):
            self.take()

    def take(self) -> None:
        with self.proc.oneshot():
            self.samples.append(Sample(time.monotonic(), self.proc.memory_info().rss,
                                       self.proc.num_fds()))
        for hook in self.extra:
            hook()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.take()
            except psutil.Error:
                return  # the process is gone

    @property
    def max_rss_mb(self) -> float:
        return max(s.rss for s in self.samples) / 2**20

    def rss_mb(self, index: int) -> float:
        return self.samples[index].rss / 2**20


# =========================================================================== environment


_counter = itertools.count(1)


@dataclass
class Env:
    """What a scenario may use besides what it starts itself.

    Attributes:
        workdir: a private directory.
        llama_url: returns the URL of the shared real llama.cpp server (2 slots).
        make_llama: starts a private real llama.cpp server (stopped by the owner of the env).
    """

    workdir: Path
    llama_url: Callable[[], str]
    make_llama: Callable[..., EmbeddedLlama]

    def dir(self, name: str) -> Path:
        path = self.workdir / f"{name}-{next(_counter)}"
        path.mkdir(parents=True)
        return path


def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE,
               interval: float = 0.05) -> bool:
    """Poll a condition that sends no event (bridge counters, process state) until it holds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= end:
            return False
        time.sleep(interval)  # poll interval, bounded by the deadline above
    return True


@contextmanager
def devices(host: str, port: int, names: list[str], **kwargs: Any) -> Iterator[list[Device]]:
    """Connected devices, closed on exit."""
    made: list[Device] = []
    try:
        for name in names:
            made.append(Device(host, port, name, **kwargs).connect())
        yield made
    finally:
        for device in made:
            with suppress(Exception):
                device.close()


_bridge_ids = itertools.count(1)


@contextmanager
def start_bridge(host: str, port: int, llama_urls: list[str], *, protocol: str = "auto",
                 mqtt_settings: dict[str, Any] | None = None,
                 llama_settings: dict[str, Any] | None = None,
                 **overrides: Any) -> Iterator[Bridge]:
    """Like :func:`tests.support.bridge_proc.running_bridge`, with ``[llama]`` settings too.

    Health probes default to every 2 s: below llama-server's 5 s keep-alive timeout, so
    a probe never races the server closing its idle connection (see docs/reliability.md).
    """
    overrides.setdefault("bridge_id", f"fault-bridge-{next(_bridge_ids)}")
    overrides.setdefault("max_tokens_cap", 48)
    overrides.setdefault("dedupe_ttl_s", 600)
    llama = {"health_interval_s": 2.0, **(llama_settings or {}), "urls": llama_urls}
    cfg = load_config(mqtt={"host": host, "port": port, "protocol": protocol,
                            "reconnect_min_s": 1, "reconnect_max_s": 2, **(mqtt_settings or {})},
                      llama=llama, **overrides)
    bridge = Bridge(cfg, llama_urls)
    bridge.start()
    try:
        yield bridge
    finally:
        bridge.stop()


def bridge_threads_alive(bridge: Bridge) -> list[str]:
    """Names of the bridge's own threads that are NOT alive (empty: all alive)."""
    alive = {t.name for t in threading.enumerate() if t.is_alive()}
    workers = bridge.workers.size if bridge.workers else 0
    wanted = ["bridge-intake", "bridge-ticker", "bridge-health",
              *(f"bridge-worker-{i}" for i in range(workers))]
    client = bridge.link._client  # paho's network thread carries the client id in its name
    paho = getattr(client, "_thread", None)
    dead = [name for name in wanted if name not in alive]
    if paho is None or not paho.is_alive():
        dead.append("paho network thread")
    return dead


@contextmanager
def bridge_process(host: str, port: int, llama_url: str, workdir: Path, *, bridge_id: str,
                   protocol: str = "5", settings: dict[str, str] | None = None,
                   log_level: str = "WARNING") -> Iterator[subprocess.Popen[bytes]]:
    """``python -m bridge run`` as a child process, online (retained status) on return.

    For faults where the bridge may hang: the test stays bounded, because teardown
    ends the process (SIGTERM, then SIGKILL after 10 s).

    Args:
        settings: environment variables, e.g. ``{"BRIDGE_MQTT__MAX_QUEUED": "10"}``.
    Yields:
        The process; its log is ``workdir/bridge.log``.
    """
    from tests.support.recorder import Recorder

    env = {**os.environ, "BRIDGE_DEDUPE_TTL_S": "600", **(settings or {})}
    status = Recorder(host, port, topic_filter=f"llm/status/{bridge_id}")
    log = open(workdir / "bridge.log", "wb")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "--mqtt-host", host, "--mqtt-port", str(port),
         "--mqtt-protocol", protocol, "--llama-url", llama_url, "--bridge-id", bridge_id,
         "--log-level", log_level],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        online = status.wait_for(lambda ms: any(b'"online"' in m.payload for m in ms), 60)
        if not online:
            raise TimeoutError(f"the bridge process never came online; log: "
                               f"{(workdir / 'bridge.log').read_text(errors='replace')[-2000:]}")
        yield proc
    finally:
        status.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def wait_while_progressing(condition: Callable[[], bool], progress: Callable[[], int], *,
                           stall_s: float = 60.0, limit_s: float = 1800.0) -> bool:
    """Poll ``condition`` for as long as ``progress()`` keeps growing.

    For waits whose length depends on how fast a loaded machine generates: give up only
    when nothing moved for ``stall_s`` (a hang), or after ``limit_s`` in any case.
    """
    end = time.monotonic() + limit_s
    last, moved = progress(), time.monotonic()
    while not condition():
        now = time.monotonic()
        current = progress()
        if current != last:
            last, moved = current, now
        if now - moved > stall_s or now > end:
            return False
        time.sleep(0.05)  # poll interval, bounded by the stall and limit above
    return True


def bridge_state(bridge: Bridge) -> str:
    """A one-line picture of a bridge that did not finish, for the failure message."""
    with bridge.jobs.lock:
        jobs = [f"{c}/{i}:{j.state}@seq{j.channel.seq.next}" for (c, i), j in
                list(bridge.jobs.items())[:6]]
    return (f"connected={bridge.link.connected} outstanding={bridge.link.outstanding} "
            f"published={bridge.link.published} jobs={len(bridge.jobs)} {jobs}")
