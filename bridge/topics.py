"""MQTT topic names of the protocol (SPEC §4), as one frozen value object.

Every topic the bridge subscribes to or publishes on is built here, so the rule
"never publish outside ``P/reply/{client}/…`` for a request from ``{client}``"
has one place to live.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.wire import CLIENT_PATTERN, ID_PATTERN

_CLIENT_RE = re.compile(CLIENT_PATTERN)
_ID_RE = re.compile(ID_PATTERN)
# No wildcards, no leading '/', and no leading '$' ($SYS, $share belong to the broker).
_PREFIX_RE = re.compile(r"^[^#+\x00/$][^#+\x00]*$")


def is_valid_client(name: str) -> bool:
    """True if ``name`` may stand as the ``{client}`` level of a topic."""
    return _CLIENT_RE.fullmatch(name) is not None


def is_valid_id(request_id: str) -> bool:
    """True if ``request_id`` may stand as the ``{id}`` level of a reply topic."""
    return _ID_RE.fullmatch(request_id) is not None


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic tree under one prefix.

    Args:
        prefix: first topic level(s), default ``llm``; no wildcards, no leading ``/``.
    """

    prefix: str = "llm"

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix) or self.prefix.endswith("/"):
            raise ValueError(
                f"invalid topic prefix {self.prefix!r}: use levels like 'llm' or 'site/llm', "
                "without '+', '#', a leading '$', or a leading/trailing '/'"
            )

    # -- filters the bridge subscribes to
    def request_filter(self, shared_group: str | None = None) -> str:
        """``P/request/+``, or ``$share/{group}/P/request/+`` with several bridges."""
        base = f"{self.prefix}/request/+"
        return f"$share/{shared_group}/{base}" if shared_group else base

    def cancel_filter(self, shared_group: str | None = None) -> str:
        """``P/cancel/+``. Never shared: every bridge must see every cancel."""
        del shared_group  # a cancel must reach the bridge running the request
        return f"{self.prefix}/cancel/+"

    # -- concrete topics
    def request(self, client: str) -> str:
        return f"{self.prefix}/request/{client}"

    def cancel(self, client: str) -> str:
        return f"{self.prefix}/cancel/{client}"

    def reply(self, client: str, request_id: str) -> str:
        return f"{self.prefix}/reply/{client}/{request_id}"

    def reply_namespace(self, client: str) -> str:
        """``P/reply/{client}/``: every reply for ``client`` lies below it."""
        return f"{self.prefix}/reply/{client}/"

    def status(self, bridge_id: str) -> str:
        return f"{self.prefix}/status/{bridge_id}"

    def status_filter(self) -> str:
        return f"{self.prefix}/status/+"

    # -- parsing
    def client_of(self, topic: str, kind: str) -> str | None:
        """The ``{client}`` of ``P/{kind}/{client}``, or None if the topic is not one.

        Args:
            topic: the topic a message arrived on.
            kind: ``request`` or ``cancel``.
        Returns:
            the client name if it is valid, else None.
        """
        head = f"{self.prefix}/{kind}/"
        if not topic.startswith(head):
            return None
        client = topic[len(head):]
        return client if is_valid_client(client) else None

    def is_allowed_response_topic(self, client: str, topic: str) -> bool:
        """An MQTT 5 Response Topic is honoured only inside the client's reply namespace."""
        ns = self.reply_namespace(client)
        return (
            topic.startswith(ns)
            and len(topic) > len(ns)
            and "+" not in topic
            and "#" not in topic
            and "\x00" not in topic
            and len(topic.encode()) <= 1024
        )
