"""MQTT topic names of the protocol (docs/protocol.md, *Topics*), as one frozen value object.

Every topic the bridge subscribes to or publishes on is built here, so the rule
"never publish outside ``P/reply/{client}/…`` for a request from ``{client}``"
has one place to live.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.protocol.packet import topic_bytes

MAX_ID_CHARS = 64
"""Longest request id, session, profile, bridge or client name (characters)."""
ID_RULE = f"[A-Za-z0-9_.-]{{1,{MAX_ID_CHARS}}}"
"""Request ids, and every other name that stands alone as one topic level or is named by a
request (``session``, ``profile``, bridge ids, shared groups, backend names): no
wildcards, no ``/``. Written without anchors, as messages and docs quote it."""
ID_PATTERN = f"^{ID_RULE}$"
""":data:`ID_RULE` anchored, for pydantic ``Field(pattern=...)``."""
CLIENT_RULE = f"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_ID_CHARS - 1}}}"
"""Client names in ``P/request/{client}``: as :data:`ID_RULE`, but starting with a letter
or digit."""
CLIENT_PATTERN = f"^{CLIENT_RULE}$"
""":data:`CLIENT_RULE` anchored."""

_CLIENT_RE = re.compile(CLIENT_RULE)
_ID_RE = re.compile(ID_RULE)
# No wildcards, no leading '/', and no leading '$' ($SYS, $share belong to the broker).
_PREFIX_RE = re.compile(r"^[^#+\x00/$][^#+\x00]*$")

MAX_TOPIC_LEVELS = 32
"""Most levels a reply topic may have. Brokers close the connection of a client that
publishes deeper topics (Mosquitto 2.0 at 200 levels; others cap lower, down to 10-32),
and a publish the broker refuses that way is resent on every reconnect: a deep MQTT 5
Response Topic is refused at intake instead."""
MAX_RESPONSE_TOPIC_BYTES = 1024
"""Longest MQTT 5 Response Topic honoured (UTF-8 bytes); every reply carries it."""
# Code points MQTT topic names must not contain: wildcards, U+0000, the C0 and C1
# control characters, and Unicode non-characters. Mosquitto disconnects a client that
# publishes such a topic (its UTF-8 check refuses the last three).
_FORBIDDEN_TOPIC_CHARS = re.compile(
    "[+#\x00-\x1f\x7f-\x9f\ufdd0-\ufdef"
    + "".join(chr(plane + 0xFFFE) + chr(plane + 0xFFFF) for plane in range(0, 0x110000, 0x10000))
    + "]")


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
        # P/reply/{client}/{id} must stay within what brokers accept.
        if self.prefix.count("/") + 4 > MAX_TOPIC_LEVELS:
            raise ValueError(f"topic prefix {self.prefix!r} has too many levels: reply topics "
                             f"under it would exceed {MAX_TOPIC_LEVELS} levels")

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

    def response_topic_problem(self, client: str, topic: str) -> str | None:
        """Why an MQTT 5 Response Topic cannot be used for ``client``'s replies, or None.

        A Response Topic is honoured only inside the client's reply namespace and only
        if every broker will take a publish on it (see :data:`MAX_TOPIC_LEVELS`).

        Returns:
            None if the topic is usable, else a message naming the rule or limit it breaks.
        """
        ns = self.reply_namespace(client)
        if not topic.startswith(ns) or len(topic) == len(ns):
            return f"it must lie under {ns} (the client's own reply namespace)"
        if (bad := _FORBIDDEN_TOPIC_CHARS.search(topic)) is not None:
            return (f"it contains {bad.group()!r} (U+{ord(bad.group()):04X}): no wildcards, "
                    "control characters or Unicode non-characters")
        size = topic_bytes(topic)
        if size > MAX_RESPONSE_TOPIC_BYTES:
            return f"it is {size} bytes long; the limit is {MAX_RESPONSE_TOPIC_BYTES} bytes"
        levels = topic.count("/") + 1
        if levels > MAX_TOPIC_LEVELS:
            return f"it has {levels} topic levels; the limit is {MAX_TOPIC_LEVELS}"
        return None

    def is_allowed_response_topic(self, client: str, topic: str) -> bool:
        """Whether ``topic`` may carry ``client``'s replies (see :meth:`response_topic_problem`)."""
        return self.response_topic_problem(client, topic) is None
