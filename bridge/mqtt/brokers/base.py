"""What every local broker shares: the :class:`LocalBroker` protocol, its error, and
the check that its port can be bound.

:mod:`bridge.mqtt.brokers.local` (Mosquitto, and the choice between the two brokers) and
:mod:`bridge.mqtt.brokers.amqtt` both import it, so amqtt needs nothing from local.
"""

from __future__ import annotations

import errno
import socket
from typing import Literal, Protocol

__all__ = [
    "LocalBroker",
    "LocalBrokerError",
    "address_error",
    "check_port_free",
    "port_in_use_error",
]


class LocalBrokerError(RuntimeError):
    """The local broker could not start or stop (the message says why and what to do)."""


class LocalBroker(Protocol):
    """What ``run`` needs of a local broker, Mosquitto or amqtt."""

    kind: Literal["mosquitto", "amqtt"]
    protocol: Literal["5", "3.1.1"]
    host: str

    @property
    def port(self) -> int: ...

    @property
    def ws_port(self) -> int | None:
        """Port of its loopback MQTT-over-WebSocket listener (browsers); None: it has none."""
        ...

    @property
    def ws_account(self) -> tuple[str, str] | None:
        """Username and password that listener requires; None: it admits anyone."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def port_in_use_error(host: str, port: int, ws_port: int | None = None, *,
                      websocket: bool = False) -> LocalBrokerError:
    """The error for a taken port: which port, and which flags change it.

    Args:
        host: the listener address.
        port: the taken port (the MQTT one, or the WebSocket one if ``websocket``).
        ws_port: the WebSocket listener's port when either may be the taken one.
        websocket: ``port`` is the WebSocket listener's.
    """
    if websocket:
        return LocalBrokerError(
            f"cannot start the embedded MQTT broker: port {port} on {host}, for its "
            f"WebSocket listener, is already in use. Pick a free one with --ws-port, or "
            f"leave --ws-port out for any free port.")
    which = f"port {port}" if ws_port is None else \
        f"port {port} (MQTT, --mqtt-port) or {ws_port} (WebSocket, --ws-port)"
    return LocalBrokerError(
        f"cannot start the embedded MQTT broker: {which} on {host} is already in use "
        f"(another broker such as Mosquitto, or another bridge?). Use that broker with "
        f"--mqtt-host/--mqtt-port, or pick a free port for the embedded one with --mqtt-port.")


def address_error(host: str, port: int, exc: OSError, *,
                  websocket: bool = False) -> LocalBrokerError | None:
    """The error for a listener that cannot bind ``host:port``, if ``exc`` says why.

    Args:
        host: the listener address.
        port: its port.
        exc: what binding it raised.
        websocket: it is the WebSocket listener (the message names --ws-port).

    Returns:
        The error for a taken port or an address that is not this machine's; None for
        any other failure.
    """
    if exc.errno == errno.EADDRINUSE:
        return port_in_use_error(host, port, websocket=websocket)
    if exc.errno == errno.EADDRNOTAVAIL:
        return LocalBrokerError(f"cannot start the embedded MQTT broker: address "
                                f"{host} is not an address of this machine.")
    return None


def check_port_free(host: str, port: int, *, websocket: bool = False) -> None:
    """Fail early, with a clear message, when ``host:port`` cannot be bound.

    SO_REUSEADDR, as brokers set it, so a port in TIME_WAIT does not count as taken.

    Args:
        host: the listener address.
        port: its port; 0 (any free port) is never taken.
        websocket: it is the WebSocket listener (the message names --ws-port).

    Raises:
        LocalBrokerError: the port is taken, or ``host`` is not an address of this machine.
    """
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise address_error(host, port, exc, websocket=websocket) or LocalBrokerError(
                f"cannot start the embedded MQTT broker on {host}:{port}: {exc}") from exc
