"""How long tests wait, and waiting for a condition that only polling can observe.

Everything that sends an event (MQTT messages, a server's records) is waited for on a
Condition or Event with a timeout; :func:`poll_until` is for state that sends none
(llama-server's ``/slots``, a bridge's counters, a process table).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

LOOPBACK_TIMEOUT = 10.0  # anything on loopback: a CONNACK, a SUBACK, a marker message
REPLY_TIMEOUT = 120.0  # a whole answer from the real llama.cpp on a loaded 2-core machine
DEADLINE = 180.0  # anything a fault scenario waits for (brokers paused, bridges restarted)


def poll_until(probe: Callable[[], T], done: Callable[[T], bool], timeout: float,
               interval: float = 0.2) -> T:
    """Call ``probe`` until ``done(result)`` or ``timeout``; returns the last result."""
    deadline = time.monotonic() + timeout
    result = probe()
    while not done(result) and time.monotonic() < deadline:
        time.sleep(interval)
        result = probe()
    return result
