"""MQTT: the bridge's connection and publish window, the device client, local brokers.

Nothing here knows about llama-server. Depends on :mod:`bridge.protocol` and
:mod:`bridge.config`.
"""
