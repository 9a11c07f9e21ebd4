"""A paho client set up from :class:`~bridge.config.settings.MqttSettings`.

The one place that turns ``[mqtt]`` into a paho ``Client``: callback API, protocol
version, credentials, TLS and TCP_NODELAY. The bridge's link and the device client
both build theirs here, so a broker that admits one admits the other.
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


def broker_host(settings: MqttSettings) -> str:
    """The host to connect to: the configured one, else the local broker's."""
    return settings.host or DEFAULT_HOST


def no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send every packet at once (paho leaves Nagle's algorithm on).

    With Nagle, a small packet waits for the ACK of the previous one, and the broker's
    kernel delays that ACK by up to 40 ms when it has nothing to send back: the PUBACK
    of a request followed by its ``start`` cost 40 ms, as did a chunk after a chunk.
    """
    with contextlib.suppress(OSError, AttributeError):  # not TCP (e.g. a unix socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    if settings.username:
        secret = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, secret)
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.ca_file) if settings.ca_file else None,
            certfile=str(settings.cert_file) if settings.cert_file else None,
            keyfile=str(settings.key_file) if settings.key_file else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    client.on_socket_open = no_delay
    return client
