"""A paho client set up from :class:`~bridge.config.settings.MqttSettings`.

The one place that turns ``[mqtt]`` into a connection: callback API, protocol version,
credentials, TLS and TCP_NODELAY. The bridge's link and the device client build their
paho client here (:func:`new_client`), and the asyncio device client (on aiomqtt) takes
the same parts (:func:`credentials`, :func:`tls_context`, :data:`NO_DELAY`), so a broker
that admits one admits the others.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config.settings import MqttSettings

DEFAULT_HOST = "127.0.0.1"
"""Where a client connects when ``[mqtt] host`` is unset (the local broker listens there)."""
DEVICE_KEEPALIVE_S = 30
"""MQTT keepalive of the device clients (seconds)."""
NO_DELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
"""``setsockopt`` arguments that turn Nagle's algorithm off (see :func:`no_delay`)."""


def broker_host(settings: MqttSettings) -> str:
    """The host to connect to: the configured one, else the local broker's."""
    return settings.host or DEFAULT_HOST


def device_v5(settings: MqttSettings) -> bool:
    """Whether a device client speaks MQTT 5: only when ``protocol`` says ``5``.

    ``auto`` means 3.1.1 for a device, which every broker speaks; the bridge's own link
    tries 5 first and falls back.
    """
    return settings.protocol == "5"


def credentials(settings: MqttSettings) -> tuple[str | None, str | None]:
    """``(username, password)`` of ``settings``; ``(None, None)`` without a username."""
    if not settings.username:
        return None, None
    secret = settings.password.get_secret_value() if settings.password else None
    return settings.username, secret


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """The TLS context of ``settings``, or None without ``tls``.

    The broker's certificate and host name are verified, against ``ca_file`` or else the
    system's CAs; ``cert_file``/``key_file`` are this client's certificate, if the broker
    wants one.
    """
    if not settings.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    if settings.cert_file:
        context.load_cert_chain(str(settings.cert_file),
                                str(settings.key_file) if settings.key_file else None)
    if settings.ca_file:
        context.load_verify_locations(str(settings.ca_file))
    else:
        context.load_default_certs()
    return context


def unreachable(settings: MqttSettings, exc: object) -> ConnectionError:
    """What a device client raises when it cannot reach the broker."""
    return ConnectionError(f"cannot reach MQTT broker at {broker_host(settings)}:"
                           f"{settings.port}: {exc}; is the bridge (or its broker) running?")


def refused(settings: MqttSettings, why: object) -> ConnectionError:
    """What a device client raises when the broker does not accept its connection."""
    return ConnectionError(f"MQTT broker {broker_host(settings)}:{settings.port} did not "
                           f"accept us: {why}")


def no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send every packet at once (paho leaves Nagle's algorithm on).

    With Nagle, a small packet waits for the ACK of the previous one, and the broker's
    kernel delays that ACK by up to 40 ms when it has nothing to send back: the PUBACK
    of a request followed by its ``start`` cost 40 ms, as did a chunk after a chunk.
    """
    with contextlib.suppress(OSError, AttributeError):  # not TCP (e.g. a unix socket)
        sock.setsockopt(*NO_DELAY)


def new_client(settings: MqttSettings, client_id: str, *, v5: bool,
               clean_session: bool | None = None) -> mqtt.Client:
    """A paho client (callback API 2) with the credentials and TLS of ``settings``.

    Args:
        settings: the ``[mqtt]`` section (username, password, TLS files).
        client_id: the MQTT client id.
        v5: MQTT 5 if True, else MQTT 3.1.1.
        clean_session: MQTT 3.1.1 only; None leaves paho's default (a clean session).
    Returns:
        The client, not yet connected, with ``on_socket_open`` set to :func:`no_delay`.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                         clean_session=clean_session)
    username, password = credentials(settings)
    if username is not None:
        client.username_pw_set(username, password)
    if (context := tls_context(settings)) is not None:
        client.tls_set_context(context)
    client.on_socket_open = no_delay
    return client
