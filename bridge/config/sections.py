"""The tables of the configuration: ``[mqtt]``, ``[llama]``, ``[device]`` and ``[web]``.

Each is a value of :class:`bridge.config.settings.DeploymentConfig`, which loads them
from the TOML file, the environment and the flags; they are defined here to keep that
module about loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from bridge.protocol.packet import MAX_PACKET, MIN_DEVICE_PACKET
from bridge.protocol.topics import ID_RULE, is_valid_id


def llama_server_url(url: str, name: str = "llama url") -> str:
    """A llama-server base URL as the settings and the client keep it: checked, no trailing ``/``.

    Args:
        url: e.g. ``http://127.0.0.1:8080``.
        name: what the error message calls it (the setting or argument it came from).

    Returns:
        ``url`` without its trailing ``/``.

    Raises:
        ValueError: it does not start with ``http://`` or ``https://`` or names no host.
    """
    if not url.startswith(("http://", "https://")) or not urlsplit(url).netloc:
        raise ValueError(f"{name} {url!r} must start with http:// or https:// and name a "
                         "host: http://host:port, e.g. http://127.0.0.1:8080")
    return url.rstrip("/")


class MqttSettings(BaseModel):
    """How the bridge connects to the broker (``[mqtt]``)."""

    model_config = ConfigDict(extra="forbid")

    host: str | None = Field(
        None, description="Broker host. Unset: start a local broker on 127.0.0.1 "
                          "(Mosquitto if installed, else amqtt)."
    )
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    client_id: str | None = Field(None, description="Default: 'llm-bridge-{bridge_id}'.")
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto", description="'auto' tries MQTT 5 and falls back to 3.1.1; with the local "
                            "broker, its own (Mosquitto 5, amqtt 3.1.1)."
    )
    # An int range, not Literal[0, 1, 2]: the environment gives the string "1", which a
    # Literal refuses ("Input should be 0, 1 or 2") while an int field coerces it.
    qos: int = Field(1, ge=0, le=2, description="QoS of every reply message and subscription.")
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(
        3600, ge=0,
        description="How long the broker keeps the bridge's subscriptions and the requests "
                    "and cancels sent to it while it is disconnected (MQTT 5). The bridge's own "
                    "QoS 1 replies are resent by paho after a reconnect either way. In a shared "
                    "group the default is 30 s: the broker keeps routing requests to a departed "
                    "member until its session ends.",
    )
    max_inflight: int = Field(20, ge=1, le=65535, description="Unacknowledged QoS>0 publishes.")
    max_queued: int = Field(
        1000, ge=10, description="Publishes waiting in paho; a full queue blocks generation."
    )
    reconnect_min_s: float = Field(1.0, ge=1, description="paho counts whole seconds.")
    reconnect_max_s: float = Field(30.0, ge=1)
    connect_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> MqttSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s ({self.reconnect_max_s}) must be >= "
                             f"reconnect_min_s ({self.reconnect_min_s})")
        return self


class LlamaSettings(BaseModel):
    """The llama-server backends (``[llama]``)."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(
        default_factory=list,
        description="llama-server base URLs. Empty: start an embedded llama.cpp (xllamacpp).",
    )
    names: list[str] = Field(
        default_factory=list,
        description="A name per URL, in the same order, shown on the status topic instead "
                    "of the URL (devices may read it). Empty: backend-1, backend-2, ...",
    )
    api_key: SecretStr | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    first_byte_timeout_s: float = Field(
        120.0, gt=0,
        description="llama-server sends nothing until a slot frees: allow for queueing.",
    )
    idle_timeout_s: float = Field(60.0, gt=0, description="Max silence between tokens.")
    retries: int = Field(3, ge=1, le=10, description="Attempts before the first byte.")
    health_interval_s: float = Field(5.0, gt=0)
    session_affinity: bool = Field(
        True,
        description="A session's next turn goes to the backend that answered its last one "
                    "(its prompt cache) when that one is healthy and has a free slot.")
    embedded_parallel: int = Field(2, ge=1, le=64)
    embedded_ctx: int = Field(4096, ge=256)
    embedded_model: Path | None = Field(None, description="GGUF path; default Gemma 3 270M.")

    @field_validator("urls")
    @classmethod
    def _strip_slash(cls, urls: list[str]) -> list[str]:
        return [llama_server_url(url) for url in urls]

    @field_validator("names")
    @classmethod
    def _valid_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not is_valid_id(name):
                raise ValueError(f"backend name {name!r} must match {ID_RULE} "
                                 "(a label, not an address: devices see it)")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"backend names must be unique; given more than once: "
                             f"{', '.join(twice)}")
        return names

    @model_validator(mode="after")
    def _one_name_per_url(self) -> LlamaSettings:
        # Without urls the bridge starts one embedded llama.cpp server: one name at most.
        if self.names and len(self.names) != max(1, len(self.urls)):
            raise ValueError(
                f"[llama] names has {len(self.names)} entries and urls {len(self.urls)}: give "
                "one name per URL, in the same order (or leave names out: backend-1, ...)")
        return self

    def backend_names(self, count: int) -> list[str]:
        """The names of ``count`` backends: ``names`` if given, else backend-1, backend-2, ..."""
        if self.names and len(self.names) == count:
            return list(self.names)
        return [f"backend-{i}" for i in range(1, count + 1)]


class DeviceSettings(BaseModel):
    """What the bridge assumes of the devices that ask it (``[device]``)."""

    model_config = ConfigDict(extra="forbid")

    max_packet: int | None = Field(
        None, ge=MIN_DEVICE_PACKET, le=MAX_PACKET,
        description="Largest MQTT PUBLISH packet (header, topic, properties and payload) a "
                    "device can receive, for requests that give no max_packet of their own: "
                    "every reply message is made to fit it (docs/devices.md). Unset: only "
                    "max_message_bytes and the broker's limit bound a message.")


class WebSettings(BaseModel):
    """The web playground ``run`` serves (``[web]``; README, *Web playground*)."""

    model_config = ConfigDict(extra="forbid")

    port: int | None = Field(
        None, ge=1, le=65535,
        description="Serve the web playground (static page and config.json) on this TCP "
                    "port; unset: no page.")
    host: str = Field(
        "127.0.0.1",
        description="Address the page is served on. Loopback by default: the local broker's "
                    "WebSocket listener is loopback too, and the page has no login of its own.")
    mqtt_url: str | None = Field(
        None,
        description="The broker's WebSocket URL the page connects to (ws:// or wss://), for a "
                    "broker of your own (--mqtt-host). Unset: the local broker's WebSocket "
                    "listener, or with your own broker none (the page asks).")
    ws_port: int | None = Field(
        None, ge=1, le=65535,
        description="Port of the local broker's WebSocket listener (loopback). Unset: a free "
                    "port when the page is served, else no WebSocket listener.")

    @field_validator("mqtt_url")
    @classmethod
    def _websocket_url(cls, url: str | None) -> str | None:
        if url is not None and (not url.startswith(("ws://", "wss://"))
                                or not urlsplit(url).netloc):
            raise ValueError(f"web mqtt_url {url!r} must be a WebSocket URL with a host: "
                             "ws://host:port or wss://host:port, e.g. ws://127.0.0.1:9001")
        return url


__all__ = ["DeviceSettings", "LlamaSettings", "MqttSettings", "WebSettings", "llama_server_url"]
