"""The fault matrix (issue 4): real bridge, real Mosquitto, real llama.cpp, faults injected.

Short form: ``pytest tests/faults`` (part of the normal suite). Long form, with the
soak and the figures in ``docs/reliability.md``: ``scripts/reliability``.
"""
