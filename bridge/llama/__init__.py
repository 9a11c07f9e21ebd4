"""The llama-server client: HTTP, SSE decoding, typed deltas, the relay, backend pool.

Usable on its own, like an httpx transport: nothing here knows about MQTT. Depends on
:mod:`bridge.protocol` and :mod:`bridge.config`.
"""
