"""A ``#`` subscriber that records everything published on a broker, for assertions.

Tests use it to check the wire contract from the outside: sizes, UTF-8 JSON,
contiguous ``seq``, one terminal message, one QoS per reply topic, and that nothing
is published outside the topics a request may use.

MQTT does not say who published a message, so :class:`PublishLog` keeps what the
test's own clients (the devices) published; :func:`bridge_messages` takes exactly
those out of a recording, and what is left is what the bridge published.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config.settings import DeploymentConfig
from bridge.mqtt.device import BridgeClient
from bridge.protocol.chunks import MIN_CHUNK_BYTES
from bridge.protocol.messages import TERMINAL_TYPES, decode_reply

C = TypeVar("C", BridgeClient, mqtt.Client)


@dataclass(frozen=True)
class Recorded:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None
    content_type: str | None
    qos: int  # as received: min(published QoS, the recorder's subscription QoS 1)


class Recorder:
    """Subscribes to ``#`` (QoS 1) and keeps every message, in arrival order.

    Args:
        host, port: the broker.
        v5: connect with MQTT 5 (to see properties).
        topic_filter: what to record.
    """

    def __init__(self, host: str, port: int, *, v5: bool = False, topic_filter: str = "#",
                 username: str | None = None, password: str | None = None) -> None:
        self.messages: list[Recorded] = []
        self.v5 = v5  # sees MQTT 5 properties
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=f"recorder-{time.monotonic_ns() % 10**9}",
                                   protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        if username:
            self._client.username_pw_set(username, password)
        self._filter = topic_filter
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._ready.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        if not self._ready.wait(10):
            self.close()
            raise TimeoutError("recorder could not subscribe within 10 s")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(self._filter, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        rec = Recorded(msg.topic, bytes(msg.payload), bool(msg.retain),
                       getattr(props, "CorrelationData", None),
                       getattr(props, "ContentType", None), int(msg.qos))
        with self._cond:
            self.messages.append(rec)
            self._cond.notify_all()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def wait_for(self, predicate: Callable[[list[Recorded]], bool], timeout: float) -> bool:
        """Wait until ``predicate(messages)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def on_topic(self, topic: str) -> list[Recorded]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_terminal(self, topic: str, timeout: float) -> list[Any]:
        """Wait for a terminal message on ``topic``; return its decoded messages by seq.

        Raises:
            AssertionError: no terminal message within ``timeout``.
        """
        def ended(msgs: list[Recorded]) -> bool:
            return any(m.topic == topic and decode_reply(m.payload).type in TERMINAL_TYPES
                       for m in msgs)

        assert self.wait_for(ended, timeout), f"no terminal message on {topic} in {timeout} s"
        return [decode_reply(m.payload) for m in self.on_topic(topic)]


def check_reply_stream(messages: list[Any]) -> None:
    """Assert the protocol's invariants of one request's messages (as received, in order)."""
    assert messages, "no messages"
    seqs = [m.seq for m in messages]
    assert seqs == list(range(len(messages))), f"seq not contiguous from 0: {seqs}"
    terminals = [m for m in messages if m.type in TERMINAL_TYPES]
    assert len(terminals) == 1, f"expected one terminal message, got {terminals}"
    assert messages[-1].type in TERMINAL_TYPES, "something followed the terminal message"
    assert len({m.id for m in messages}) == 1, "messages of one topic carry different ids"


def text_of(messages: list[Any]) -> str:
    return "".join(m.text for m in messages if m.type == "chunk" and m.text is not None)


class PublishLog:
    """Everything the test's own MQTT clients publish (wrap them with :meth:`track`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: list[tuple[str, bytes]] = []

    def track(self, client: C) -> C:
        """Record every publish of ``client`` (a :class:`BridgeClient` or a paho client)."""
        paho = client._mqtt if isinstance(client, BridgeClient) else client
        publish = paho.publish

        def logged(topic: str, payload: Any = None, *args: Any, **kwargs: Any
                   ) -> mqtt.MQTTMessageInfo:
            if payload is None:
                data = b""
            elif isinstance(payload, (bytes, bytearray)):
                data = bytes(payload)
            else:  # paho sends str as UTF-8 and numbers as their str()
                data = str(payload).encode()
            with self._lock:
                self.sent.append((topic, data))
            return publish(topic, payload, *args, **kwargs)

        setattr(paho, "publish", logged)  # noqa: B010 -- an instance attribute, not a method
        return client

    def requesters(self, prefix: str = "llm") -> set[str]:
        """The ``{client}`` of every ``P/request/{client}`` a tracked client published on."""
        head = f"{prefix}/request/"
        with self._lock:
            return {t[len(head):] for t, _ in self.sent if t.startswith(head)}

    def chunk_bytes(self, prefix: str = "llm") -> dict[str, int]:
        """Request id -> the ``chunk_bytes`` it asked for (at least the bridge's minimum)."""
        out: dict[str, int] = {}
        with self._lock:
            sent = list(self.sent)
        for topic, payload in sent:
            if not topic.startswith(f"{prefix}/request/"):
                continue
            try:
                body = json.loads(payload)
            except (ValueError, RecursionError):  # bad input sent on purpose
                continue
            if isinstance(body, dict) and isinstance(body.get("chunk_bytes"), int):
                out[str(body.get("id"))] = max(MIN_CHUNK_BYTES, body["chunk_bytes"])
        return out


def bridge_messages(recorded: Iterable[Recorded], log: PublishLog) -> list[Recorded]:
    """``recorded`` without exactly the messages in ``log`` (one each): the bridge's messages."""
    with log._lock:
        pending = Counter(log.sent)
    out: list[Recorded] = []
    for m in recorded:
        key = (m.topic, m.payload)
        if pending[key]:
            pending[key] -= 1
        else:
            out.append(m)
    return out


def check_bridge_messages(recorder: Recorder, log: PublishLog, cfg: DeploymentConfig, *,
                          v5: bool) -> dict[str, list[Any]]:
    """Assert the wire contract on every message the bridge published (docs/protocol.md).

    Every message is UTF-8 JSON of at most ``max_message_bytes``; it is on
    ``P/status/{bridge_id}`` (never naming a backend's address) or on
    ``P/reply/{client}/...`` of a client that sent a request; reply messages are
    valid reply messages, chunks are within the ``chunk_bytes`` of their request,
    every message of a reply topic has the same QoS (the configured one) and, at
    MQTT 5 (bridge and recorder), Content Type ``application/json``.

    Args:
        recorder: recorded everything (``#``) while the bridge ran.
        log: what the test's devices published (taken out of the recording).
        cfg: the bridge's configuration.
        v5: the bridge talked MQTT 5 to the broker.
    Returns:
        The decoded reply messages by topic.
    """
    prefix = cfg.prefix
    clients = log.requesters(prefix)
    asked_chunk = log.chunk_bytes(prefix)
    by_topic: dict[str, list[Any]] = defaultdict(list)
    qos: dict[str, set[int]] = defaultdict(set)
    with recorder._cond:
        recorded = list(recorder.messages)
    for m in bridge_messages(recorded, log):
        body = json.loads(m.payload.decode("utf-8"))  # raises unless UTF-8 JSON
        assert isinstance(body, dict), (m.topic, m.payload[:80])
        assert len(m.payload) <= cfg.max_message_bytes, (m.topic, len(m.payload))
        if m.topic == f"{prefix}/status/{cfg.bridge_id}":
            # every device may read it: it names backends, never says where they run
            for url in cfg.llama.urls:
                where = urlsplit(url).netloc.encode()
                assert where not in m.payload, (m.topic, where, m.payload[:300])
            continue
        head = f"{prefix}/reply/"
        assert m.topic.startswith(head), f"the bridge published on {m.topic!r}"
        client, _, rest = m.topic[len(head):].partition("/")
        assert client in clients and rest, f"reply on {m.topic!r}; requests came from {clients}"
        reply = decode_reply(m.payload)
        if reply.type == "chunk":
            bound = asked_chunk.get(reply.id, cfg.chunk_bytes)
            assert len(m.payload) <= bound, (m.topic, len(m.payload), bound)
        if v5 and recorder.v5:
            assert m.content_type == "application/json", m
        by_topic[m.topic].append(reply)
        qos[m.topic].add(m.qos)
    for topic, levels in qos.items():
        assert levels == {min(cfg.mqtt.qos, 1)}, f"QoS {levels} on {topic}"
    return dict(by_topic)
