"""The wire contract (docs/protocol.md) as code: messages, topics, chunk building, errors.

The bottom layer: no I/O, no configuration, no threads. Everything else builds on it.
"""
