"""The public API: what ``bridge`` exports is pinned, and the import paths users have keep working.

A name added to or removed from ``bridge.__all__`` must be a decision: change the list below
together with the README/docs that describe it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect

import bridge

PUBLIC = [
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


def test_all_is_pinned() -> None:
    assert sorted(bridge.__all__) == PUBLIC


def test_every_public_name_exists_and_is_documented() -> None:
    for name in bridge.__all__:
        obj = getattr(bridge, name)
        if name != "__version__":
            assert inspect.getdoc(obj), f"bridge.{name} has no docstring"


def test_public_names_come_from_private_layers() -> None:
    """Every class and function is defined in a layer subpackage, not in ``bridge`` itself."""
    for name in bridge.__all__:
        obj = getattr(bridge, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            layer = obj.__module__.split(".")[1]
            assert layer in {"protocol", "config", "llama", "mqtt", "service"}, (name, layer)


def test_the_original_scripts_import_path_works() -> None:
    legacy = importlib.import_module("llamacpp_mqtt_deploy")
    assert legacy.LlamaCppClient is bridge.LlamaCppClient
    assert legacy.DeploymentConfig is bridge.DeploymentConfig
    assert callable(legacy.main)


def test_the_version_is_one_value() -> None:
    from bridge.version import __version__

    assert bridge.__version__ == __version__
    assert importlib.metadata.version("llamacpp-mqtt-bridge") == __version__  # pyproject reads it
