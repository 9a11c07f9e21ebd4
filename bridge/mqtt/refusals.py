"""Publishes the broker answers by closing the connection: found, dropped, reported.

A broker closes the connection of a client that publishes something it will not take
(Mosquitto 2.0: a topic of more than 200 levels, a topic that is not valid MQTT UTF-8,
a packet over its ``max_packet_size`` at MQTT 3.1.1). At QoS 1 and 2, paho keeps every
unacknowledged message and sends them all again, oldest first, after it reconnects: the
refused message comes back first each time and the broker closes the connection again,
so one bad reply would cut every device off for good. The intake refuses the causes it
knows (:meth:`bridge.protocol.topics.Topics.response_topic_problem`); this module catches the rest.

The rule: a message that is the oldest unacknowledged one at two consecutive
disconnects, with a successful (re)connect in between -- so it was sent again and the
broker closed the connection again before acknowledging it -- is refused. It is
dropped from paho's session together with every other queued message of its reply
stream (same topic and Correlation Data: the rest of that request's answer would be
refused the same way), and the stream is reported to the bridge, which ends the request.

At QoS 0 nothing is resent, so there is no loop to break: a refused QoS 0 message costs
one reconnect and is lost, like any QoS 0 message during a disconnect.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import paho.mqtt.client as mqtt

StreamKey = tuple[str, bytes | None]
"""One request's reply stream: (topic, MQTT 5 Correlation Data)."""

_MAX_REFUSED = 1024  # refused streams remembered until their request ends


def stream_key_of(message: mqtt.MQTTMessage) -> StreamKey:
    """The reply stream a message queued in paho belongs to."""
    correlation = getattr(message.properties, "CorrelationData", None)
    return (message.topic, bytes(correlation) if correlation is not None else None)


class RefusalDetector:
    """Applies the two-disconnects rule to one paho client (see the module docstring).

    Called from paho's network thread only: :meth:`connected` on every CONNACK,
    :meth:`disconnected` on every lost connection.
    """

    def __init__(self) -> None:
        # The oldest unacknowledged message at the last loss (the object, not its mid:
        # paho reuses mids).
        self._suspect: mqtt.MQTTMessage | None = None
        self._reconnected = False

    def connected(self) -> None:
        self._reconnected = True

    def disconnected(self, client: mqtt.Client) -> tuple[StreamKey, list[int]] | None:
        """Note a lost connection; name the refused stream if the rule applies.

        Nothing is dropped here: paho may be iterating its session's messages right now
        (a connection lost while it resends them after a CONNACK), so the caller drops
        them with :func:`drop_messages` at the next CONNACK, before paho resends.

        Args:
            client: the paho client whose connection was lost.
        Returns:
            the refused stream and the ids of its messages in paho's session now, or None.
        """
        oldest = _oldest_unacknowledged(client)
        refused = oldest is not None and self._reconnected and oldest is self._suspect
        self._reconnected = False
        if not refused or oldest is None:
            self._suspect = oldest
            return None
        self._suspect = None
        key = stream_key_of(oldest)
        return key, stream_mids(client, key)


class RefusedStreams:
    """Reply streams the broker refused, so that nothing more is published on them.

    Bounded: the oldest entries are forgotten first (their requests have long ended).

    Attributes:
        keys: the refused streams (read-only for callers). Every publish looks here, so
            it is a plain dict a caller can test directly (``if keys and key in keys``):
            an empty dict costs no method call.
    """

    def __init__(self) -> None:
        self.keys: OrderedDict[StreamKey, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: StreamKey) -> bool:
        return key in self.keys

    def add(self, key: StreamKey) -> None:
        with self._lock:
            self.keys[key] = None
            self.keys.move_to_end(key)
            while len(self.keys) > _MAX_REFUSED:
                self.keys.popitem(last=False)

    def discard(self, key: StreamKey) -> None:
        with self._lock:
            self.keys.pop(key, None)


def _oldest_unacknowledged(client: mqtt.Client) -> mqtt.MQTTMessage | None:
    # paho has no public view of its session's messages (drop_out_messages() drops all).
    messages: Any = client._out_messages
    with client._out_message_mutex:
        for message in messages.values():
            if message.qos > 0:
                return message  # type: ignore[no-any-return]
    return None


def stream_mids(client: mqtt.Client, key: StreamKey) -> list[int]:
    """Ids of the QoS > 0 messages of stream ``key`` in paho's session, oldest first."""
    messages: Any = client._out_messages  # see _oldest_unacknowledged
    with client._out_message_mutex:
        return [mid for mid, message in messages.items()
                if message.qos > 0 and stream_key_of(message) == key]


def drop_messages(client: mqtt.Client, mids: list[int]) -> list[mqtt.MQTTMessage]:
    """Remove these messages from paho's session (those still in it) before a resend.

    Each dropped message's ``MQTTMessageInfo`` gets ``rc = MQTT_ERR_PROTOCOL`` and is
    marked finished, so whoever waits for it wakes up and sees it was not delivered.
    Only safe where paho is not iterating its session: in ``on_connect`` (called before
    it resends) or outside its network thread while it is disconnected.

    Returns:
        the dropped messages, oldest first.
    """
    messages: Any = client._out_messages  # see _oldest_unacknowledged
    with client._out_message_mutex:
        dropped = [messages.pop(mid) for mid in mids if mid in messages]
    for message in dropped:
        message.info.rc = mqtt.MQTT_ERR_PROTOCOL
        message.info._set_as_published()  # wakes waiters; rc says "failed"
    return dropped


def delivered(info: mqtt.MQTTMessageInfo, qos: int, timeout: float) -> bool | None:
    """Whether a published message reached the broker.

    Args:
        info: what ``Client.publish`` returned for it.
        qos: the QoS it was published at.
        timeout: how long to wait for the broker's acknowledgement (QoS 1, 2) or for
            the write to the socket (QoS 0).
    Returns:
        True once acknowledged (or written, at QoS 0); False if it was refused
        (dropped by :func:`drop_messages`) or discarded; None if still pending at ``timeout``.
    """
    if qos == 0 and info.rc != mqtt.MQTT_ERR_SUCCESS:
        return False  # paho discards a QoS 0 message it cannot write at once
    # Not info.wait_for_publish(): it raises at once for a message queued while
    # disconnected (rc NO_CONN), which paho still sends after reconnecting.
    condition: threading.Condition = info._condition
    with condition:
        condition.wait_for(lambda: bool(info._published), timeout)
        published = bool(info._published)
    if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
        return False
    return True if published else None
