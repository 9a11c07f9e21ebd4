"""The publish window: flow control of the messages the bridge hands to paho.

At most ``max_queued`` replies are waiting for the broker; a worker that publishes
more blocks, so a slow broker slows generation down instead of growing memory. At
QoS 1 and 2 a message waits until the broker acknowledged it (paho's ``on_publish``);
at QoS 0 until paho wrote it to the socket, seen through its ``MQTTMessageInfo`` --
paho's ``on_publish`` for QoS 0 builds a ``ReasonCode`` and a ``Properties`` per
message, a quarter of the bridge's CPU in per-token mode, and is not called for
messages a reconnect discards.

The window also keeps the reply streams the broker refused (:mod:`bridge.mqtt.refusals`):
nothing more is published on them, and their queued messages leave paho's session,
and the window, at the next CONNACK.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from bridge.mqtt.refusals import (
    RefusalDetector,
    RefusedStreams,
    StreamKey,
    delivered,
    drop_messages,
)

log = logging.getLogger("bridge.mqtt")

_QOS0_POLL_S = 0.005  # how often a publisher waiting for room looks again, at QoS 0


class PublishError(Exception):
    """A message could not be handed to the broker (too large, or the link is closing)."""


class StreamRefused(PublishError):
    """The broker closed the connection on a message of this reply stream: nothing more
    is published on it (see :mod:`bridge.mqtt.refusals`)."""


class PublishWindow:
    """Counts the messages handed to paho and not yet through, and bounds them.

    Args:
        qos: the QoS every message is published at.
        max_queued: how many messages a flow-controlled publish lets wait for the broker.
        on_refused: called in paho's network thread with each stream the broker refused.

    Attributes:
        closing: set by the link when it closes: a worker waiting for room gives up.
        refused: the reply streams the broker refused.
        published: messages handed to paho (those paho refused at once taken back).
        published_bytes: their payload bytes.
    """

    def __init__(self, qos: int, max_queued: int,
                 on_refused: Callable[[StreamKey], None] | None = None) -> None:
        self._qos = qos
        self._qos0 = qos == 0
        self._max_queued = max_queued
        self._on_refused = on_refused
        self._lock = threading.Condition()
        # Messages handed to paho and not yet acknowledged (QoS 1, 2) ...
        self._outstanding = 0
        # ... or not yet written to the socket (QoS 0: oldest first, as paho writes them).
        self._unwritten: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        self.closing = False
        self._no_wait = False  # set while stopping: never wait for the window again
        self.published = 0
        self.published_bytes = 0  # both counted under _lock: workers publish concurrently
        self._detector = RefusalDetector()
        self.refused = RefusedStreams()
        self._refused_keys = self.refused.keys  # checked on every publish
        self._to_drop: list[tuple[StreamKey, list[int]]] = []  # paho's thread only

    # ------------------------------------------------------------------ publishing

    def check_stream(self, topic: str, correlation_data: bytes | None) -> None:
        """Raise :class:`StreamRefused` if the broker refused this reply stream."""
        if self._refused_keys and (topic, correlation_data) in self._refused_keys:
            raise StreamRefused(f"the broker refused an earlier message on {topic[:100]!r}")

    def admit(self, size: int, *, flow_controlled: bool, deadline: float | None) -> None:
        """Count one message about to be handed to paho, first waiting for room.

        Args:
            size: its payload bytes.
            flow_controlled: wait while the window is full (else count it at once).
            deadline: ``time.monotonic()`` after which waiting gives up.
        Raises:
            PublishError: closing, or the deadline passed while waiting for room.
        """
        with self._lock:
            if flow_controlled:
                while self._outstanding_locked() >= self._max_queued:
                    if self.closing or self._no_wait or (
                            deadline is not None and time.monotonic() > deadline):
                        raise PublishError("gave up waiting for the broker to accept messages")
                    # QoS 0: nothing notifies a write; a short poll finds many written.
                    self._lock.wait(_QOS0_POLL_S if self._qos0 else 0.5)
            # Intake messages (start/error) count but never wait: they come from the
            # thread that must not depend on the network thread's progress.
            if not self._qos0:
                self._outstanding += 1
            # Counted before the publish (one lock per message), taken back on refusal.
            self.published += 1
            self.published_bytes += size

    def handed(self, info: mqtt.MQTTMessageInfo, size: int) -> None:
        """Note what paho did with a message :meth:`admit` counted.

        Raises:
            PublishError: paho refused it (it is no longer counted).
        """
        if self._qos0 and info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._unwritten.append(info)  # deque.append is atomic
        # NO_CONN at QoS 0: paho dropped it (nothing to wait for); at QoS>0 paho queues
        # it and resends after reconnecting.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            with self._lock:
                if not self._qos0:
                    self._outstanding -= 1
                    self._lock.notify()
                self.published -= 1
                self.published_bytes -= size
            raise PublishError(f"paho refused the publish: {mqtt.error_string(info.rc)}")

    def acknowledged(self) -> None:
        """The broker acknowledged a message (QoS 1, 2: paho's ``on_publish``)."""
        with self._lock:
            self._outstanding -= 1
            self._lock.notify()

    def delivered(self, info: mqtt.MQTTMessageInfo, timeout: float) -> bool | None:
        """Whether a message reached the broker (see :func:`bridge.mqtt.refusals.delivered`);
        never waits once :meth:`stop_waiting` was called."""
        return delivered(info, self._qos, 0 if self._no_wait else timeout)

    def wake(self) -> None:
        """Wake every worker waiting for room (it looks at the window again)."""
        with self._lock:
            self._lock.notify_all()

    def stop_waiting(self) -> None:
        """From now on a publish that would wait for the window fails instead (shutdown):
        messages that fit still go out, so a normal stop still answers every request."""
        self._no_wait = True
        self.wake()

    def has_room(self) -> bool:
        """Whether a flow-controlled publish would go out without waiting."""
        return self.outstanding < self._max_queued

    @property
    def outstanding(self) -> int:
        """Messages handed to paho and not yet acknowledged by the broker (QoS 1, 2)
        or not yet written to its socket (QoS 0)."""
        with self._lock:
            return self._outstanding_locked()

    def _outstanding_locked(self) -> int:
        if not self._qos0:
            return self._outstanding
        unwritten = self._unwritten
        # Written in order; a reconnect discards the rest and sets their rc (CONN_LOST).
        while unwritten and (unwritten[0].rc != mqtt.MQTT_ERR_SUCCESS
                             or unwritten[0].is_published()):
            unwritten.popleft()
        return len(unwritten)

    # ------------------------------------------------------------------ refused streams

    def connected(self, client: mqtt.Client) -> None:
        """A CONNACK: drop the refused streams' messages before paho resends its session's."""
        self._detector.connected()
        while self._to_drop:
            key, mids = self._to_drop.pop()
            dropped = drop_messages(client, mids)
            with self._lock:  # they will never be acknowledged
                self._outstanding -= len(dropped)
                self._lock.notify_all()
            log.info("dropped %d refused messages on %r", len(dropped), key[0][:200])

    def connection_lost(self, client: mqtt.Client) -> None:
        """Break the reconnect loop of a message the broker keeps refusing: stop publishing
        on its stream now, drop its queued messages at the next CONNACK (QoS 1, 2)."""
        if self._qos0:
            return  # nothing is resent, so there is no loop to break
        found = self._detector.disconnected(client)
        if found is None:
            return
        key, mids = found
        self.refused.add(key)
        self._to_drop.append((key, mids))
        log.error("the broker closed the connection twice on the same message (topic %r): "
                  "its reply stream (%d queued messages) is dropped and its request ended",
                  key[0][:200], len(mids))
        if self._on_refused is not None:
            try:
                self._on_refused(key)
            except Exception:  # never kill paho's network thread
                log.exception("error handling the refused stream %r", key[0][:200])

    def forget_refused(self, key: StreamKey) -> None:
        """Allow publishing on a refused stream again (its request has ended)."""
        self.refused.discard(key)
