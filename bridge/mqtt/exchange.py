"""One request and its replies, as a device sees them: the protocol logic of the device
clients, without sockets, threads or asyncio.

The sync :class:`~bridge.mqtt.device.BridgeClient` and the asyncio
:class:`~bridge.mqtt.async_device.AsyncBridgeClient` both build their requests here and
feed every reply message they receive, with the time, to an :class:`Exchange`, which
says what to do: hand messages to the caller, ignore a copy, resend the request, give up.
What a device must do is docs/protocol.md (*Reply messages*) and the README
(*Several bridges*: resending with the same id):

* messages of one request come with ``seq`` 0, 1, 2 ...; an earlier ``seq`` again is a
  copy (QoS 1 redelivery, or the bridge replaying a finished answer to a resend) and is
  dropped; a later one than expected means messages were lost (:class:`SequenceError`);
* ``done``, ``reply`` and ``error`` end the request;
* the bridge sends a ``progress`` heartbeat every ``heartbeat_s`` while it holds a
  request, so silence for a few heartbeats means the bridge or the broker lost it: the
  device resends the same request with the same id. A bridge that still runs it ignores
  the resend, one that finished it replays the answer (byte for byte, so the copies are
  dropped), and a bridge that never saw it, or lost it in a restart, answers it anew
  from ``start`` (``seq`` 0): the answer *starts again* (:attr:`Delivery.restarted`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from bridge.config.settings import DeploymentConfig
from bridge.protocol.errors import ReplyTimeout, SequenceError
from bridge.protocol.messages import TERMINAL_TYPES, ReplyMessage, decode_reply
from bridge.protocol.topics import Topics

HEARTBEAT_S = float(DeploymentConfig.model_fields["heartbeat_s"].default)
"""How often a bridge with its default settings says it still works on a request."""
RESEND_AFTER_S = 3 * HEARTBEAT_S
"""Silence (no message of the request) after which a device resends the request."""
MAX_RESENDS = 3
"""Resends in a row without an answer in between, at most."""
IDLE_TIMEOUT_S = 60.0
"""Silence after which a device gives up (:class:`ReplyTimeout`), resends included."""


def new_request_id() -> str:
    """A fresh request id (12 hex digits)."""
    return secrets.token_hex(6)


def new_client_name() -> str:
    """A device name for a client that was not given one."""
    return f"dev-{secrets.token_hex(4)}"


def text_request(text: str) -> dict[str, Any]:
    """The JSON request equal to a plain-text request: one user message, ``text`` as is."""
    return {"messages": [{"role": "user", "content": text}]}


@dataclass(frozen=True, slots=True)
class Publish:
    """One message a device publishes (QoS 1).

    Attributes:
        topic: where it goes.
        payload: the bytes.
        request_id: the id of the request it carries; None for plain text, whose id the
            bridge chooses (such a request cannot be resent: the resend would get another).
    """

    topic: str
    payload: bytes
    request_id: str | None = None


def request_message(topics: Topics, client: str, request: dict[str, Any] | str | bytes,
                    request_id: str | None = None) -> Publish:
    """The request as published on ``P/request/{client}``.

    Args:
        topics: the bridge's topic tree.
        client: this device's name.
        request: a JSON object (an ``id`` is added if missing), plain text, or raw bytes,
            sent as they are.
        request_id: the id for a JSON object without one (default: a new one).
    """
    if isinstance(request, dict):
        body = dict(request)
        body.setdefault("id", request_id or new_request_id())
        return Publish(topics.request(client), json.dumps(body).encode(), str(body["id"]))
    payload = request.encode() if isinstance(request, str) else request
    return Publish(topics.request(client), payload)


def cancel_message(topics: Topics, client: str, request_id: str) -> Publish:
    """The cancel of ``request_id``, as published on ``P/cancel/{client}``."""
    return Publish(topics.cancel(client), json.dumps({"id": request_id}).encode(), request_id)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one received message means for the caller.

    Attributes:
        messages: reply messages to hand over, in ``seq`` order (none for a copy, another
            request's message or an unreadable payload).
        restarted: the answer started again: ``messages`` begin with its new ``start``
            (``seq`` 0); what was handed over before belongs to the abandoned answer.
        finished: the last of ``messages`` is the terminal one.
        undecodable: the payload was not a reply message.
    """

    messages: tuple[ReplyMessage, ...] = ()
    restarted: bool = False
    finished: bool = False
    undecodable: bool = False


_NOTHING = Delivery()
_UNDECODABLE = Delivery(undecodable=True)


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=8).digest()


class Exchange:
    """The replies of one request: order, copies, gaps, the end, and when to resend.

    Feed it every message received in the device's reply namespace
    (:meth:`on_message`), and call :meth:`on_silence` when nothing arrived by
    :meth:`deadline`. Times are seconds on any monotonic clock.

    Args:
        namespace: ``P/reply/{client}/``; messages on other topics are ignored.
        request: the published request, resent after silence (None or a plain-text
            request: never resent).
        request_id: the id to follow when ``request`` does not give it (None: the first
            request whose message arrives).
        now: when the request was published.
        resend_after_s: silence after which the request is resent.
        max_resends: resends in a row without a new message in between, at most.
        idle_timeout_s: silence after which :meth:`on_silence` gives up.
    """

    def __init__(self, namespace: str, request: Publish | None = None, *,
                 request_id: str | None = None, now: float,
                 resend_after_s: float = RESEND_AFTER_S, max_resends: int = MAX_RESENDS,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.namespace = namespace
        self.request_id = request.request_id if request and request.request_id else request_id
        self._request = request if request is not None and request.request_id else None
        self._resend_after_s = resend_after_s
        self._max_resends = max_resends
        self._idle_timeout_s = idle_timeout_s
        self._heard = now  # the last message of this request, or the publish
        self._resent_at: float | None = None
        self._resends_in_row = 0
        self.resends = 0  # in total
        self.finished = False
        self._digests: list[bytes] = []  # of the messages handed over, by seq
        self._rerun: list[tuple[ReplyMessage, bytes]] = []  # copies of seq 0, 1, ... again

    @property
    def expected(self) -> int:
        """The ``seq`` the next new message must have."""
        return len(self._digests)

    def _can_resend(self) -> bool:
        return self._request is not None and self._resends_in_row < self._max_resends

    def deadline(self) -> float:
        """When :meth:`on_silence` is due if no message of the request arrives before."""
        give_up = self._heard + self._idle_timeout_s
        if not self._can_resend():
            return give_up
        quiet_since = max(self._heard, self._resent_at or self._heard)
        return min(give_up, quiet_since + self._resend_after_s)

    def on_silence(self, now: float) -> Publish | None:
        """Nothing arrived for a while: the request to resend, or None (not yet due).

        Raises:
            ReplyTimeout: nothing arrived for ``idle_timeout_s``.
        """
        if now >= self._heard + self._idle_timeout_s:
            resent = f" after {self.resends} resends" if self.resends else ""
            raise ReplyTimeout(
                f"no reply for {self._idle_timeout_s:g} s (request {self.request_id}){resent}; "
                "is the bridge running? see `llamacpp-mqtt-bridge status`")
        if self._request is None or not self._can_resend() or now < self.deadline():
            return None
        self._resends_in_row += 1
        self.resends += 1
        self._resent_at = now
        return self._request

    def on_message(self, topic: str, payload: bytes, now: float) -> Delivery:
        """One message received in the device's reply namespace.

        Raises:
            SequenceError: a ``seq`` was skipped (messages were lost).
        """
        if self.finished or not topic.startswith(self.namespace):
            return _NOTHING  # brokers may deliver retained messages of other topics freely
        try:
            msg = decode_reply(payload)
        except ValueError:
            return _UNDECODABLE
        if self.request_id is None:
            self.request_id = msg.id
        if msg.id != self.request_id:
            return _NOTHING
        self._heard = now
        digest = _digest(payload)
        if msg.seq == self.expected:
            self._rerun.clear()
            return self._hand_over([(msg, digest)], restarted=False)
        if msg.seq > self.expected:
            raise SequenceError(f"expected seq {self.expected}, got {msg.seq}: messages of "
                                f"request {self.request_id} were lost")
        return self._earlier(msg, digest)

    def _earlier(self, msg: ReplyMessage, digest: bytes) -> Delivery:
        """A ``seq`` that was handed over already: a copy, or the answer starting again."""
        if digest == self._digests[msg.seq]:
            # A copy. If copies of seq 0, 1, ... come in order, the bridge may be sending
            # the answer again: keep them until it either catches up (then they were copies)
            # or differs (then they are the new answer's beginning).
            if msg.seq == len(self._rerun):
                self._rerun.append((msg, digest))
            return _NOTHING
        if msg.seq != len(self._rerun):
            raise SequenceError(
                f"request {self.request_id}'s answer started again (seq {msg.seq} differs "
                f"from the first answer's), but {len(self._rerun)} messages of the new "
                "answer came before it")
        run, self._rerun, self._digests = [*self._rerun, (msg, digest)], [], []
        return self._hand_over(run, restarted=True)

    def _hand_over(self, run: list[tuple[ReplyMessage, bytes]], *, restarted: bool) -> Delivery:
        self._digests.extend(digest for _, digest in run)
        self._resends_in_row = 0
        self._resent_at = None
        self.finished = run[-1][0].type in TERMINAL_TYPES
        return Delivery(tuple(msg for msg, _ in run), restarted=restarted,
                        finished=self.finished)
