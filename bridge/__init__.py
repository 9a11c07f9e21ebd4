"""llamacpp-mqtt-bridge: stream answers from a local llama.cpp server to MQTT devices.

The public API; everything else is private to the package.
"""

from bridge.config.settings import DeploymentConfig, LlamaSettings, MqttSettings, load_config
from bridge.llama.async_client import AsyncLlamaCppClient
from bridge.llama.client import LlamaCppClient
from bridge.mqtt.async_device import AsyncBridgeClient
from bridge.mqtt.device import BridgeClient
from bridge.protocol.errors import (
    BackendError,
    BackendHTTPError,
    BackendProtocolError,
    BackendStreamError,
    BackendTimeout,
    BackendUnavailable,
    BridgeError,
    ConnectTimeout,
    FirstByteTimeout,
    IdleTimeout,
    ReplyTimeout,
    RequestRejected,
    SequenceError,
    StreamCancelled,
)
from bridge.protocol.messages import BridgeRequest, ErrorCode, decode_reply, encode
from bridge.protocol.topics import Topics
from bridge.service.bridge import Bridge
from bridge.version import __version__

__all__ = [
    "AsyncBridgeClient",
    "AsyncLlamaCppClient",
    "BackendError",
    "BackendHTTPError",
    "BackendProtocolError",
    "BackendStreamError",
    "BackendTimeout",
    "BackendUnavailable",
    "Bridge",
    "BridgeClient",
    "BridgeError",
    "BridgeRequest",
    "ConnectTimeout",
    "DeploymentConfig",
    "ErrorCode",
    "FirstByteTimeout",
    "IdleTimeout",
    "LlamaCppClient",
    "LlamaSettings",
    "MqttSettings",
    "ReplyTimeout",
    "RequestRejected",
    "SequenceError",
    "StreamCancelled",
    "Topics",
    "__version__",
    "decode_reply",
    "encode",
    "load_config",
]
