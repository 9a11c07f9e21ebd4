"""Waiting for a condition that only polling can observe (e.g. llama-server's /slots)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(probe: Callable[[], T], done: Callable[[T], bool], timeout: float,
               interval: float = 0.2) -> T:
    """Call ``probe`` until ``done(result)`` or ``timeout``; returns the last result.

    For state that sends no event (an HTTP endpoint); everything that does send
    one (MQTT messages) is waited for on a Condition instead.
    """
    deadline = time.monotonic() + timeout
    result = probe()
    while not done(result) and time.monotonic() < deadline:
        time.sleep(interval)
        result = probe()
    return result
