"""Configuration, defined once: TOML file < environment < command-line flags.

``DeploymentConfig`` is the one place every setting and its default live. The
TOML file has top-level keys for bridge behaviour and ``[mqtt]``, ``[llama]``,
``[device]`` and ``[web]`` tables; environment variables are ``BRIDGE_<KEY>`` and
``BRIDGE_<TABLE>__<KEY>``; flags (``bridge.cli.parser``) override both.
"""

from __future__ import annotations

import contextvars
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from bridge.config.profiles import Profile
from bridge.config.sections import (
    DeviceSettings,
    LlamaSettings,
    MqttSettings,
    WebSettings,
    llama_server_url,
)
from bridge.protocol.chunks import MIN_CHUNK_BYTES
from bridge.protocol.topics import ID_PATTERN, ID_RULE, Topics, is_valid_id

# The TOML file chosen for the load in progress (pydantic-settings builds sources per class).
_toml_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "toml", default=None)


def _default_bridge_id() -> str:
    host = "".join(c if is_valid_id(c) else "-" for c in socket.gethostname())
    return (host or "bridge")[:48]


class DeploymentConfig(BaseSettings):
    """Every setting of one bridge process, with its default.

    ``server_url`` (a keyword argument, or a top-level key of the TOML file) is the
    original deployment script's name for a single llama-server:
    ``DeploymentConfig(server_url="http://localhost:8080")`` is
    ``DeploymentConfig(llama={"urls": ["http://localhost:8080"]})``. It is not a setting
    of its own: ``llama.urls`` holds the URL, and giving both with different URLs is an
    error that says which to keep.
    """

    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    prefix: str = Field("llm", description="First topic level(s): P/request/{client}, ...")
    bridge_id: str = Field(default_factory=_default_bridge_id, pattern=ID_PATTERN)
    shared_group: str | None = Field(
        None,
        pattern=ID_PATTERN,
        description="Subscribe through $share/{group}/... so N bridges split requests (MQTT 5).",
    )
    chunk_bytes: int = Field(
        512, ge=MIN_CHUNK_BYTES,
        description=f"Default chunk payload bound, at least {MIN_CHUNK_BYTES}. A request's "
                    f"own chunk_bytes below {MIN_CHUNK_BYTES} is refused (bad_request).")
    max_chunk_bytes: int = Field(
        16384, ge=MIN_CHUNK_BYTES,
        description="Largest chunk_bytes a request may ask for; a larger one is lowered to it."
    )
    max_message_bytes: int = Field(
        65536, ge=1024, description="No published message exceeds this (nor the broker's limit)."
    )
    flush_ms: float = Field(50.0, ge=0, description="Coalesce deltas for at most this long.")
    heartbeat_s: float = Field(5.0, gt=0, description="Send 'progress' after this much silence.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Requests run at once. Default: llama-server's total_slots."
    )
    queue_size: int = Field(64, ge=1, description="Requests waiting; beyond it: 'busy'.")
    max_request_bytes: int = Field(65536, ge=256)
    max_tokens_default: int = Field(
        256, ge=1,
        description="max_tokens of a request that gives none (and has no profile that does): "
                    "a few sentences, so that a forgotten limit does not stream for minutes. "
                    "Capped by max_tokens_cap.")
    max_tokens_cap: int = Field(4096, ge=1, description="Upper bound on a request's max_tokens.")
    max_generation_s: float = Field(600.0, gt=0, description="Hard limit per request.")
    dedupe_ttl_s: float = Field(600.0, ge=0, description="Same (client, id) never runs twice.")
    client_max_inflight: int = Field(4, ge=1, description="Queued + running per client.")
    client_rate_per_min: int = Field(120, ge=1, description="Requests per client per minute.")
    status_interval_s: float = Field(30.0, gt=0)
    sessions_db: Path = Field(
        Path("bridge-sessions.db"),
        description="SQLite file of 'session' conversations; created on first use.",
    )
    sessions_url: str | None = Field(
        None,
        description="Redis or Valkey holding sessions, duplicates and leases shared by every "
                    "bridge: redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss:// (TLS). Unset: "
                    "sessions_db, this bridge alone.")
    session_lease_s: float = Field(
        5.0, ge=1, le=300,
        description="With sessions_url: a request's and a session turn's lease, renewed "
                    "every third of it by the bridge running it; a crashed bridge's leases "
                    "end this long after its last renewal.")
    session_max_messages: int = Field(
        200, ge=2, description="Messages kept per session; beyond it the oldest turns go.")
    session_max_bytes: int = Field(
        131072, ge=1024, description="JSON bytes kept per session; beyond it the oldest turns go.")
    sessions_per_client: int = Field(
        16, ge=1, description="Sessions per client; a new one evicts the least recently used.")
    sessions_max: int = Field(
        1000, ge=1, description="Sessions in all; a new one evicts the least recently used.")
    session_ttl_s: float = Field(
        30 * 86400.0, ge=0, description="Sessions unused this long are deleted; 0: never.")
    profiles: dict[str, Profile] = Field(
        default_factory=dict,
        description="Named presets ([profiles.NAME]) a request picks with 'profile'; "
                    "reloaded on SIGHUP.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve Prometheus metrics on this port; unset: off.")
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address of the metrics endpoint. Loopback by default: it has no "
                    "authentication or TLS, and a gateway's other interfaces face the devices.",
    )

    mqtt: MqttSettings = Field(default_factory=MqttSettings)  # type: ignore[arg-type]
    device: DeviceSettings = Field(default_factory=DeviceSettings)  # type: ignore[arg-type]
    llama: LlamaSettings = Field(default_factory=LlamaSettings)  # type: ignore[arg-type]
    web: WebSettings = Field(default_factory=WebSettings)  # type: ignore[arg-type]

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, prefix: str) -> str:
        Topics(prefix)  # raises ValueError with a message that says what to change
        return prefix

    @field_validator("sessions_url")
    @classmethod
    def _valid_sessions_url(cls, url: str | None) -> str | None:
        if url is None or url.strip() == "":
            return None
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("redis", "rediss"):
            raise ValueError("sessions_url must start with redis:// or rediss:// (TLS), e.g. "
                             "redis://127.0.0.1:6379/0 (Valkey speaks the same protocol); "
                             "leave it unset to keep sessions in the sessions_db file")
        return url

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, profiles: dict[str, Profile]) -> dict[str, Profile]:
        for name in profiles:
            if not is_valid_id(name):
                raise ValueError(f"profile name {name!r} must match {ID_RULE} "
                                 "(requests name it in their 'profile' field)")
        return profiles

    @model_validator(mode="before")
    @classmethod
    def _server_url(cls, data: Any) -> Any:
        """Turn ``server_url`` into ``llama.urls = [server_url]`` (see the class doc)."""
        if not isinstance(data, dict) or "server_url" not in data:
            return data
        data = dict(data)
        given = data.pop("server_url")
        if given is None:  # the default: the embedded llama.cpp, or llama.urls if given
            return data
        if not isinstance(given, str):
            raise ValueError(f"server_url must be a URL such as http://127.0.0.1:8080, "
                             f"not {type(given).__name__}")
        url = llama_server_url(given, "server_url")
        llama = data.get("llama")
        if isinstance(llama, LlamaSettings):
            urls: Any = llama.urls
        elif isinstance(llama, dict):
            urls = llama.get("urls")
        else:
            urls = None
        if urls:
            same = isinstance(urls, list) and len(urls) == 1 and isinstance(urls[0], str) \
                and urls[0].rstrip("/") == url
            if not same:
                raise ValueError(
                    f"server_url {given!r} and llama.urls {urls!r} disagree: give the "
                    "llama-server URL once, as server_url (one server) or as llama.urls "
                    "(several: [llama] urls, BRIDGE_LLAMA__URLS or --llama-url), not both")
            return data
        if isinstance(llama, LlamaSettings):
            data["llama"] = llama.model_copy(update={"urls": [url]})
        else:
            data["llama"] = {**(llama if isinstance(llama, dict) else {}), "urls": [url]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentConfig:
        if self.chunk_bytes > self.max_chunk_bytes:
            raise ValueError(
                f"chunk_bytes {self.chunk_bytes} exceeds max_chunk_bytes {self.max_chunk_bytes}"
            )
        if self.max_chunk_bytes > self.max_message_bytes:
            raise ValueError("max_chunk_bytes must not exceed max_message_bytes")
        return self

    @property
    def server_url(self) -> str | None:
        """The first llama-server URL (``llama.urls[0]``); None: the bridge starts an
        embedded llama.cpp instead."""
        return self.llama.urls[0] if self.llama.urls else None

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or f"llm-bridge-{self.bridge_id}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: flags (init kwargs) > environment > TOML file.
        toml = InitSettingsSource(settings_cls, init_kwargs=_toml_data.get() or {})
        return (init_settings, env_settings, toml)


def load_config(path: Path | str | None = None, **overrides: Any) -> DeploymentConfig:
    """Build the configuration from a TOML file, the environment and explicit overrides.

    Args:
        path: TOML file, or None for none.
        overrides: values from flags; nested sections as dicts (``mqtt={"host": ...}``).
            ``None`` values are ignored so unset flags don't mask the file or env.
    Returns:
        the validated configuration.
    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the TOML is invalid (message names the file and the problem).
        pydantic.ValidationError: a setting is invalid (message names it).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {p}: invalid TOML: {exc}") from exc
    token = _toml_data.set(data)
    try:
        return DeploymentConfig(**_drop_none(overrides))
    finally:
        _toml_data.reset(token)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out


# The tables are defined in bridge.config.sections; importers of this module get them here.
__all__ = ["DeploymentConfig", "DeviceSettings", "LlamaSettings", "MqttSettings", "WebSettings",
           "llama_server_url", "load_config"]
