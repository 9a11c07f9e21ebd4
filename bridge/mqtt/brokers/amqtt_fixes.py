"""amqtt 0.12.1's defects a device would see, fixed by subclassing and replacing its parts.

:class:`~bridge.mqtt.brokers.amqtt.EmbeddedBroker` runs :class:`PatchedBroker` with
:class:`OpenAuthPlugin` as its only plugin. The tests in ``tests/mqtt/test_local_broker.py``
show the first two fixed; ``tests/mqtt/test_brokers.py`` pins the third.

* **Retained messages leaked to every connecting client.** On each CONNECT amqtt sent
  the retained messages matching *every filter any session had subscribed to* to the
  new client: with a dashboard subscribed to ``llm/status/+``, a device subscribing to
  ``llm/reply/kitchen/#`` got the bridge's status. (It meant to resend a resumed
  session's own subscriptions' retained messages.) Now a client gets only those of its
  own filters.
* **Concurrent CONNECTs failed** with ``RuntimeError: dictionary changed size during
  iteration``: amqtt walks its subscription table across ``await`` points while other
  clients' SUBSCRIBEs change it; the connection was dropped after its CONNACK. The
  table now hands out copies to iterate over.
* **No persistent sessions for "anonymous" sessions.** amqtt's stock
  ``AnonymousAuthPlugin`` marks every session anonymous, and amqtt drops those on
  disconnect; :class:`OpenAuthPlugin` admits everyone without doing so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

__all__ = ["OpenAuthPlugin", "PatchedBroker"]


class _SnapshotDict(dict[str, Any]):
    """amqtt's subscription table (filter -> sessions), iterated over copies.

    amqtt loops over this table with ``await`` inside the loop (sending retained
    messages on CONNECT, routing a publish); another client's SUBSCRIBE adding a filter
    meanwhile made the loop raise "dictionary changed size during iteration".
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().__iter__()))

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return list(super().items())


class PatchedBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker with the two defects a device would see fixed (the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions: dict[str, Any] = _SnapshotDict()

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Send retained messages for ``subscription`` only if ``session`` holds it.

        amqtt calls this on SUBSCRIBE (the session holds the filter by then) and, on
        every CONNECT, for each filter of *any* session: those are not the client's.
        """
        holders = self._subscriptions.get(subscription[0], ())
        if all(held.client_id != session.client_id for held, _qos in holders):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


class OpenAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """Admit every client, but keep persistent sessions persistent.

    amqtt's ``AnonymousAuthPlugin`` flags every session as anonymous when anonymous
    access is on, and amqtt then neither queues QoS 1 messages for such a session
    while it is offline nor keeps it after a disconnect -- which would lose replies
    for a device that reconnects with ``clean_session=False``. This plugin admits
    everyone (the embedded broker listens on loopback by default) and leaves
    ``is_anonymous`` False, so MQTT 3.1.1 session semantics hold.
    """

    async def authenticate(self, *, session: Session) -> bool:
        """Accept the connection.

        Args:
            session: the connecting client's amqtt session.

        Returns:
            Always True.
        """
        session.is_anonymous = False
        return True
