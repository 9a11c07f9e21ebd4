"""Deployment settings (TOML file, environment, flags) and request profiles.

Depends only on :mod:`bridge.protocol`.
"""
