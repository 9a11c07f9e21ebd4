"""The bridge service: intake, scheduling, running one request, replies, sessions, metrics.

:class:`bridge.service.bridge.Bridge` is the composition root. Depends on every layer
below (:mod:`bridge.protocol`, :mod:`bridge.config`, :mod:`bridge.llama`, :mod:`bridge.mqtt`).
"""
