"""An in-process MQTT broker (amqtt 0.12): the fallback local broker.

``llamacpp-mqtt-bridge run`` without ``--mqtt-host`` starts Mosquitto when it is
installed and this broker when it is not (:mod:`bridge.mqtt.brokers.local`). It runs in its own
thread with its own asyncio event loop: the bridge itself is threaded (paho), and a
private loop keeps amqtt's tasks from ever competing with anything else.

Two amqtt 0.12.1 defects a device would see are fixed
(:mod:`bridge.mqtt.brokers.amqtt_fixes` says how; the tests in
``tests/mqtt/test_local_broker.py`` show them fixed): retained messages of other clients'
filters leaked to every connecting client, and concurrent CONNECTs failed with
``RuntimeError: dictionary changed size during iteration``.

Known quirks that remain, measured against paho-mqtt 2.2 on loopback (see
``tests/mqtt/test_brokers.py`` for the tests that pin them):

* **MQTT 3.1.1 only.** A v5 CONNECT is answered with CONNACK "unsupported
  protocol version" (paho 2.2 reports reason code 132 and, with
  ``loop_start()``, keeps retrying). A v5 CONNECT with a Will is mis-parsed instead
  ("Will flag set, but will topic/message not present" logged at WARNING, no
  CONNACK): clients must connect with 3.1.1 from the start, as ``run`` does. There
  are no v5 properties, no Maximum Packet Size, no shared subscriptions.
* **``$share/...`` filters are accepted but never match**: amqtt treats the
  whole string as a literal filter. A bridge subscribing through a shared
  subscription receives no requests at all on amqtt -- subscribe plainly.
* **Messages queued for an offline persistent session arrive with the retain
  flag set.** The retain flag is therefore not a reliable "stale message"
  signal on amqtt; requests queued while the bridge was away look retained.
* **No persistent sessions for "anonymous" sessions.** amqtt's stock
  ``AnonymousAuthPlugin`` marks every session anonymous when anonymous access is
  allowed, and anonymous sessions are dropped on disconnect (no offline QoS 1
  queueing). We replace it with
  :class:`~bridge.mqtt.brokers.amqtt_fixes.OpenAuthPlugin`, which admits everyone
  but keeps ``clean_session=False`` sessions as MQTT 3.1.1 requires; they expire
  after ``session_expiry_s`` so abandoned client ids cannot pile up queues.
* **No size limit.** A 1 MiB publish is accepted and delivered; the broker sends
  no Maximum Packet Size (3.1.1 has none), so size bounds are the bridge's job.
* **Publishing to a topic starting with ``$`` closes the connection.**
* **``Broker.shutdown()`` can hang** (a client handler waits forever for its
  reader task; seen intermittently with a persistent session, a retained
  message and a refused v5 client retrying, after amqtt logged "Received PUBACK
  for unknown pending message Id"). :meth:`EmbeddedBroker.stop` bounds it by ``stop_timeout``,
  then closes the listener and cancels the remaining tasks itself.
* QoS 1 delivery order per subscriber held in every run here (loopback), but
  amqtt hands each outgoing message to its own asyncio task, so order is not
  guaranteed by construction as it is in Mosquitto.
* Everything is in memory: a broker restart loses retained messages and sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from types import TracebackType
from typing import Any, Literal

from bridge.mqtt.brokers.amqtt_fixes import OpenAuthPlugin, PatchedBroker
from bridge.mqtt.brokers.base import LocalBrokerError, address_error, check_port_free

__all__ = ["EmbeddedBroker", "EmbeddedBrokerError", "OpenAuthPlugin"]

_log = logging.getLogger(__name__)

# Loggers amqtt (and the state-machine library it uses) write to; INFO from them is a
# line per connection and packet, far too chatty for a service log.
_NOISY_LOGGERS = ("amqtt", "transitions")


class EmbeddedBrokerError(LocalBrokerError):
    """The embedded broker could not start or stop."""


class EmbeddedBroker:
    """An amqtt broker running in a background thread with its own event loop.

    A :class:`~bridge.mqtt.brokers.base.LocalBroker`: ``kind`` "amqtt", ``protocol`` "3.1.1".

    Args:
        host: address to listen on. Keep the default (loopback): the embedded
            broker has no authentication.
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
        ws_port: port of an MQTT-over-WebSocket listener (amqtt's ``ws`` type) for
            browsers, on ``host`` too; 0 picks a free one, None starts none.
        session_expiry_s: seconds a disconnected persistent session (and its
            queued messages) is kept; None keeps them until the broker stops.
        log_level: level for amqtt's loggers; WARNING keeps per-packet chatter out.
        start_timeout: seconds :meth:`start` waits for the listener.
        stop_timeout: seconds :meth:`stop` waits for a clean amqtt shutdown before
            tearing the loop down itself.

    Usage::

        with EmbeddedBroker(port=0) as broker:
            client.connect(broker.host, broker.port)
    """

    kind: Literal["mosquitto", "amqtt"] = "amqtt"
    protocol: Literal["5", "3.1.1"] = "3.1.1"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        ws_port: int | None = None,
        session_expiry_s: int | None = 3600,
        log_level: int = logging.WARNING,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._requested_ws_port = ws_port
        self._ws_port: int | None = None
        self.session_expiry_s = session_expiry_s
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        """The port the broker listens on (the real one once started with port 0)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def ws_port(self) -> int | None:
        """The WebSocket listener's port (the real one once started); None: none."""
        return self._ws_port if self._ws_port is not None else self._requested_ws_port

    #: The WebSocket listener admits anyone, like the TCP one: it is bound to ``host``.
    ws_account: tuple[str, str] | None = None

    @property
    def running(self) -> bool:
        """Whether the broker thread is alive and serving."""
        return self._thread is not None and self._thread.is_alive() and self._port is not None

    def config(self) -> dict[str, Any]:
        """The amqtt 0.12 broker configuration this instance uses.

        amqtt 0.12 takes a dict shaped like its ``BrokerConfig`` dataclass (older
        releases used ``auth``/``topic-check`` sections, now deprecated). Listing
        ``plugins`` explicitly also drops the defaults we do not want: the event
        and packet loggers (a log line per packet) and the ``$SYS`` plugin (a
        publish every 20 s and a psutil import).

        Returns:
            The configuration dictionary.
        """
        listeners = {"default": {"type": "tcp", "bind": f"{self.host}:{self._requested_port}"}}
        if self._requested_ws_port is not None:
            listeners["ws"] = {"type": "ws", "bind": f"{self.host}:{self._requested_ws_port}"}
        return {
            "listeners": listeners,
            "plugins": {f"{OpenAuthPlugin.__module__}.{OpenAuthPlugin.__qualname__}": {}},
            "session_expiry_interval": self.session_expiry_s,
            # amqtt adds this to the client's keep-alive before dropping a silent client.
            "timeout_disconnect_delay": 0,
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the broker and return once its port accepts connections.

        Raises:
            EmbeddedBrokerError: the port is taken (the message names it and says
                how to pick another), or the broker failed or timed out starting.
        """
        if self.running:
            return
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(self.log_level)
        self._check_port_free()
        self._started.clear()
        self._start_error = None
        self._port = self._ws_port = None
        # Loop and stop event exist before the thread runs, so stop() can always
        # signal the broker, even while it is still starting.
        self._loop = asyncio.new_event_loop()
        self._stop_requested = asyncio.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"amqtt-broker-{self._requested_port}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(self.start_timeout):
            self.stop()
            raise EmbeddedBrokerError(
                f"embedded MQTT broker did not start on {self.host}:{self._requested_port} "
                f"within {self.start_timeout:.0f} s"
            )
        if self._start_error is not None:
            error = self._start_error
            self._thread.join(self.stop_timeout)
            self._thread = None
            raise self._describe_start_error(error) from error
        _log.debug("embedded MQTT broker listening on %s:%d", self.host, self.port)

    def stop(self) -> None:
        """Shut the broker down and join its thread (bounded by ``stop_timeout``).

        Safe to call twice or on a broker that never started.

        Raises:
            EmbeddedBrokerError: the broker thread did not end in time.
        """
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None:
            return
        if loop is not None and stop_requested is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed between check and call
                loop.call_soon_threadsafe(stop_requested.set)
        # The thread itself bounds the amqtt shutdown by stop_timeout, then cancels
        # whatever is left; allow for both phases.
        thread.join(self.stop_timeout * 2 + 2)
        if thread.is_alive():
            raise EmbeddedBrokerError(
                f"embedded MQTT broker on {self.host}:{self.port} did not stop within "
                f"{self.stop_timeout * 2 + 2:.0f} s"
            )
        self._thread = None
        self._loop = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self.host}:{self.port}, {state})"

    # ------------------------------------------------------------------ internals

    def _check_port_free(self) -> None:
        """Fail early, with a clear message, when the port is already taken.

        amqtt would fail too, but only after logging a traceback at ERROR level.
        """
        try:
            check_port_free(self.host, self._requested_port)
            if self._requested_ws_port is not None:
                check_port_free(self.host, self._requested_ws_port, websocket=True)
        except LocalBrokerError as exc:
            raise EmbeddedBrokerError(str(exc)) from exc.__cause__

    def _describe_start_error(self, error: BaseException) -> EmbeddedBrokerError:
        cause: BaseException | None = error
        while cause is not None:
            known = address_error(self.host, self._requested_port, cause) \
                if isinstance(cause, OSError) else None
            if known is not None:
                return EmbeddedBrokerError(str(known))
            cause = cause.__cause__ or cause.__context__
        return EmbeddedBrokerError(f"cannot start the embedded MQTT broker: {error}")

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # report any failure to the starting thread
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                _log.exception("embedded MQTT broker stopped with an error")
        finally:
            self._cancel_leftovers(loop)
            loop.close()

    async def _serve(self) -> None:
        assert self._stop_requested is not None
        broker = PatchedBroker(self.config(), loop=asyncio.get_running_loop())
        await broker.start()
        self._port = _bound_port(broker) or self._requested_port
        if self._requested_ws_port is not None:
            self._ws_port = _bound_port(broker, "ws") or self._requested_ws_port
        self._started.set()
        await self._stop_requested.wait()
        try:
            await asyncio.wait_for(broker.shutdown(), self.stop_timeout)
        except Exception as exc:  # TimeoutError included
            # amqtt's shutdown can wait forever on a stuck client handler. Close the
            # listening sockets ourselves so the port is free; _run cancels the rest.
            _log.warning("embedded MQTT broker did not shut down cleanly (%r); forcing", exc)
            for server in list(getattr(broker, "_servers", {}).values()):
                instance = getattr(server, "instance", None)
                if instance is not None:
                    instance.close()

    @staticmethod
    def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if not pending:
            return
        # amqtt logs every cancelled task as an ERROR with a traceback; the warning
        # in _serve already said that we are forcing the shutdown.
        amqtt_logger = logging.getLogger("amqtt")
        level = amqtt_logger.level
        amqtt_logger.setLevel(logging.CRITICAL)
        try:
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(
                    asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 2.0)
                )
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            amqtt_logger.setLevel(level)


def _bound_port(broker: Any, listener: str = "default") -> int | None:
    """Read the port a listener actually bound (needed for port 0).

    amqtt keeps its listening servers in a private dict; this degrades to None
    if a later amqtt changes that, and the caller falls back to the requested port.
    """
    try:
        sockets = broker._servers[listener].instance.sockets
        return int(sockets[0].getsockname()[1])
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
