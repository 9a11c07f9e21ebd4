"""llamacpp-mqtt-bridge: stream answers from a local llama.cpp server to MQTT devices.

The public API; everything else is private to the package.
"""

__version__ = "0.1.0"

from bridge.client import BridgeClient
from bridge.config import DeploymentConfig, LlamaSettings, MqttSettings, load_config
from bridge.exceptions import (
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
    RequestRejected,
    StreamCancelled,
)
from bridge.llama_client import LlamaCppClient
from bridge.service import Bridge
from bridge.topics import Topics
from bridge.wire import BridgeRequest, ErrorCode, decode_reply, encode

__all__ = [
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
    "RequestRejected",
    "StreamCancelled",
    "Topics",
    "__version__",
    "decode_reply",
    "encode",
    "load_config",
]
