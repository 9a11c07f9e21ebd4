"""The device client for asyncio programs (dashboards, gateways, home-automation
integrations), on aiomqtt: many requests at once over one connection.

It speaks the protocol as the sync :class:`~bridge.mqtt.device.BridgeClient` does, through
the same :class:`~bridge.mqtt.exchange.Exchange` (order, copies, gaps, the terminal
message, resends after silence) and the same connection set-up
(:mod:`bridge.mqtt.paho_client`: credentials, TLS, TCP_NODELAY). One subscription,
``P/reply/{client}/+``, receives every reply of the client; one task hands each message to
the bounded inbox of its request, which the request's reader drains.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import AsyncExitStack, aclosing
from typing import Any, Self

import aiomqtt

from bridge.config.settings import MqttSettings
from bridge.mqtt.answer import AnswerText
from bridge.mqtt.exchange import (
    IDLE_TIMEOUT_S,
    MAX_RESENDS,
    RESEND_AFTER_S,
    Delivery,
    Exchange,
    Publish,
    cancel_message,
    new_client_name,
    request_message,
    text_request,
)
from bridge.mqtt.paho_client import (
    DEVICE_KEEPALIVE_S,
    NO_DELAY,
    broker_host,
    credentials,
    device_v5,
    refused,
    tls_context,
    unreachable,
)
from bridge.protocol.messages import ReplyMessage
from bridge.protocol.topics import Topics, is_valid_id

__all__ = ["AsyncBridgeClient"]

INBOX_SIZE = 10_000
"""Messages of one request received and not yet read, at most (beyond: dropped, counted,
and the reader sees the gap)."""
RECEIVED_SIZE = 100_000
"""Messages received and not yet handed to their request, at most (aiomqtt's queue)."""


class _Inbox:
    """The messages of one request, waiting for its reader."""

    def __init__(self, size: int) -> None:
        self._items: deque[tuple[str, bytes]] = deque()
        self._size = size
        self._ready = asyncio.Event()
        self._error: BaseException | None = None

    def put(self, topic: str, payload: bytes) -> bool:
        """Add a message; False if the inbox is full (the message is dropped)."""
        if len(self._items) >= self._size:
            return False
        self._items.append((topic, payload))
        self._ready.set()
        return True

    def fail(self, error: BaseException) -> None:
        """End the reader's wait with ``error`` once the messages before it are read."""
        self._error = error
        self._ready.set()

    async def get(self, timeout: float) -> tuple[str, bytes] | None:
        """The next message, or None after ``timeout`` seconds without one."""
        if not self._items and self._error is None:
            self._ready.clear()
            try:
                async with asyncio.timeout(max(0.0, timeout)):
                    await self._ready.wait()
            except TimeoutError:
                return None
        if self._items:
            return self._items.popleft()
        assert self._error is not None
        raise self._error


def _refused_codes(codes: Iterable[Any]) -> list[str]:
    """The failures among a SUBACK's reason codes (paho gives ReasonCode objects)."""
    return [str(c) for c in codes if getattr(c, "is_failure", False)]


class AsyncBridgeClient:
    """Talk to a bridge over MQTT from asyncio, many requests at once.

    ::

        async with AsyncBridgeClient(settings, client="kitchen") as dev:
            async for text in dev.stream_text("Hello"):
                print(text, end="")

    Args:
        mqtt_settings: broker address, credentials, TLS and protocol (as the sync client).
        prefix: topic prefix of the bridge.
        client: this device's name (``{client}`` topic level and MQTT client id).
        resend_after_s: resend a request (same id) after this much silence; the bridge
            sends a heartbeat every ``heartbeat_s`` (5 s) while it holds a request.
        max_resends: resends in a row without an answer in between, at most.
        timeout: bound of every wait on the broker (connect, SUBACK, PUBACK, disconnect).
    """

    def __init__(self, mqtt_settings: MqttSettings, *, prefix: str = "llm",
                 client: str | None = None, resend_after_s: float = RESEND_AFTER_S,
                 max_resends: int = MAX_RESENDS, timeout: float = 10.0) -> None:
        self.settings = mqtt_settings
        self.topics = Topics(prefix)
        self.client_name = client or new_client_name()
        self.resend_after_s = resend_after_s
        self.max_resends = max_resends
        self.timeout = timeout
        self._namespace = self.topics.reply_namespace(self.client_name)
        self._mqtt: aiomqtt.Client | None = None
        self._stack: AsyncExitStack | None = None
        self._reader: asyncio.Task[None] | None = None
        self._inboxes: dict[str, _Inbox] = {}
        self._lost: ConnectionError | None = None
        self._lost_event = asyncio.Event()  # set with _lost: ends waits on a PUBACK
        self.dropped = 0  # messages dropped because their request's reader fell behind
        self.undecodable = 0  # payloads on a reply topic that were not reply messages
        self.unrouted = 0  # messages of no request being read (finished or abandoned)
        self.resends = 0  # requests published again after silence

    # ------------------------------------------------------------------ connection

    async def connect(self) -> Self:
        """Connect, subscribe to this client's replies and start handing them out.

        Raises:
            ConnectionError: the broker is unreachable, refused us or the subscription,
                or did not answer within ``timeout``.
        """
        if self._mqtt is not None:
            raise RuntimeError("already connected")
        username, password = credentials(self.settings)
        client = aiomqtt.Client(
            broker_host(self.settings), self.settings.port, identifier=self.client_name,
            username=username, password=password, tls_context=tls_context(self.settings),
            protocol=aiomqtt.ProtocolVersion.V5 if device_v5(self.settings)
            else aiomqtt.ProtocolVersion.V311,
            keepalive=DEVICE_KEEPALIVE_S, timeout=self.timeout,
            max_queued_incoming_messages=RECEIVED_SIZE,
            # A request would otherwise wait up to 40 ms for the broker's delayed ACK of
            # this device's previous packet (docs/performance.md).
            socket_options=[NO_DELAY])
        client.pending_calls_threshold = 1000  # concurrent requests are the point here
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(client)
        except aiomqtt.MqttError as exc:
            if isinstance(exc, aiomqtt.MqttCodeError):
                raise refused(self.settings, exc) from exc
            raise unreachable(self.settings, exc) from exc
        try:
            codes = await client.subscribe(self._namespace + "+", qos=1, timeout=self.timeout)
            if failed := _refused_codes(codes):
                raise refused(self.settings, f"subscription to {self._namespace}+ refused "
                                             f"({', '.join(failed)})")
        except BaseException as exc:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await stack.aclose()
            if isinstance(exc, aiomqtt.MqttError):
                raise refused(self.settings, exc) from exc
            raise
        self._mqtt, self._stack, self._lost = client, stack, None
        self._lost_event = asyncio.Event()
        self._reader = asyncio.create_task(self._dispatch(client),
                                           name=f"bridge-replies-{self.client_name}")
        return self

    async def close(self) -> None:
        """Stop handing out replies, end every reader's wait, disconnect (each bounded)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.wait({reader}, timeout=self.timeout)
        self._fail(ConnectionError("the client was closed"))
        stack, self._stack, self._mqtt = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await stack.aclose()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _dispatch(self, client: aiomqtt.Client) -> None:
        """Hand every received message to the inbox of its request."""
        try:
            async for message in client.messages:
                topic, payload = message.topic.value, message.payload
                inbox = self._inboxes.get(topic[len(self._namespace):]) \
                    if topic.startswith(self._namespace) else None
                if inbox is None or not isinstance(payload, bytes | bytearray):
                    self.unrouted += 1
                elif not inbox.put(topic, bytes(payload)):
                    self.dropped += 1
        except aiomqtt.MqttError as exc:
            self._fail(ConnectionError(f"lost the connection to the MQTT broker: {exc}"))

    def _fail(self, error: ConnectionError) -> None:
        self._lost = error
        self._lost_event.set()
        for inbox in self._inboxes.values():
            inbox.fail(error)

    def _connected(self) -> aiomqtt.Client:
        if self._lost is not None:
            raise self._lost
        if self._mqtt is None:
            raise ConnectionError("not connected: use `async with AsyncBridgeClient(...)`")
        return self._mqtt

    async def _publish(self, message: Publish) -> None:
        # aiomqtt waits for the PUBACK until its timeout even when the connection is gone,
        # so the wait also ends when the reader task sees the connection lost.
        publish = asyncio.ensure_future(self._connected().publish(
            message.topic, message.payload, qos=1, timeout=self.timeout))
        publish.add_done_callback(_retrieve)
        lost = asyncio.ensure_future(self._lost_event.wait())
        try:
            await asyncio.wait({publish, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not publish.done():
                publish.cancel()
        error: BaseException | None = None
        if publish.done() and not publish.cancelled():  # else abandoned: the connection is lost
            error = publish.exception()
            if error is None:
                return
            if not isinstance(error, aiomqtt.MqttError):
                raise error
        if self._lost is not None:
            raise self._lost
        raise ConnectionError(f"publishing on {message.topic} failed: {error}") from error

    # ------------------------------------------------------------------ requests

    async def ask(self, request: dict[str, Any] | str, *,
                  idle_timeout: float = IDLE_TIMEOUT_S) -> AsyncIterator[ReplyMessage]:
        """Send a request and yield its reply messages in ``seq`` order until the terminal
        one (``done``, ``reply`` or ``error``).

        The request is published when the iteration starts. It is resent (same id) after
        ``resend_after_s`` of silence; if the bridge then answers it anew (it had lost it),
        the messages start again with ``start`` (``seq`` 0): discard what came before.

        Args:
            request: a JSON request (an ``id`` is added if missing: the messages carry it),
                or plain text (sent as the equal JSON request, one user message, so that it
                has an id to resend with).
            idle_timeout: give up when nothing arrives for this long, resends included.
        Raises:
            ReplyTimeout: nothing arrived for ``idle_timeout`` seconds.
            SequenceError: a ``seq`` was skipped (messages were lost).
            ConnectionError: the connection was lost or the client closed.
            ValueError: the request's id is invalid, or this client is reading another
                request with the same id.
        """
        async with aclosing(self._deliveries(request, idle_timeout)) as deliveries:
            async for delivery in deliveries:
                for msg in delivery.messages:
                    yield msg

    async def stream_text(self, request: dict[str, Any] | str, *,
                          idle_timeout: float = IDLE_TIMEOUT_S) -> AsyncIterator[str]:
        """Send a request and yield only its text, piece by piece, as it arrives.

        A ``reply`` (non-streamed answer) gives its ``content``. A restarted answer (see
        :meth:`ask`) gives only the text beyond what was given already.

        Raises:
            BridgeError: the answer ended in an ``error``: the class of its ``code``
                (:class:`~bridge.protocol.errors.RequestRejected`,
                :class:`~bridge.protocol.errors.BackendUnavailable`, ...) with its
                ``code``, message and ``retryable``.
            AnswerChanged: a restarted answer differs from the text given already.
            ReplyTimeout, SequenceError, ConnectionError, ValueError: as :meth:`ask`.
        """
        text = AnswerText()
        async with aclosing(self._deliveries(request, idle_timeout)) as deliveries:
            async for delivery in deliveries:
                for piece in text.feed(delivery):
                    yield piece

    async def cancel(self, request_id: str) -> None:
        """Ask the bridge to stop ``request_id``: its answer ends with ``done``
        (``finish_reason`` ``cancelled``), read by the :meth:`ask` that sent it."""
        await self._publish(cancel_message(self.topics, self.client_name, request_id))

    async def _deliveries(self, request: dict[str, Any] | str,
                          idle_timeout: float) -> AsyncGenerator[Delivery, None]:
        """Publish ``request`` and yield what its :class:`Exchange` makes of its replies."""
        message = request_message(self.topics, self.client_name,
                                  text_request(request) if isinstance(request, str) else request)
        request_id = message.request_id
        assert request_id is not None  # a JSON request always has one
        if not is_valid_id(request_id):  # its replies could not come to P/reply/{client}/+
            raise ValueError(f"invalid request id {request_id!r}: use 1 to 64 of "
                             "[A-Za-z0-9_.-]")
        if request_id in self._inboxes:
            raise ValueError(f"request id {request_id!r} is already being read by this client")
        self._connected()
        inbox = self._inboxes[request_id] = _Inbox(INBOX_SIZE)  # before the replies can come
        loop = asyncio.get_running_loop()
        try:
            await self._publish(message)
            exchange = Exchange(self._namespace, message, now=loop.time(),
                                resend_after_s=self.resend_after_s,
                                max_resends=self.max_resends, idle_timeout_s=idle_timeout)
            while True:
                received = await inbox.get(exchange.deadline() - loop.time())
                if received is None:
                    if (resend := exchange.on_silence(loop.time())) is not None:
                        self.resends += 1
                        await self._publish(resend)
                    continue
                delivery = exchange.on_message(*received, loop.time())
                self.undecodable += delivery.undecodable
                if delivery.messages:
                    yield delivery
                if delivery.finished:
                    return
        finally:
            self._inboxes.pop(request_id, None)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Take a finished publish's exception, so that an abandoned one is not logged."""
    if not future.cancelled():
        future.exception()
