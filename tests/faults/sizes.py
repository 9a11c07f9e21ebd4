"""How big the fault scenarios are: SHORT for the test suite, LONG for ``scripts/reliability``.

``SIZES`` is what the tests use; ``FAULTS_SIZE=long`` in the environment (or the
report runner, which passes ``LONG`` explicitly) selects the long form.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """Load of each scenario.

    Attributes:
        name: ``short`` or ``long``.
        restart_streams: concurrent streams across a broker restart (scenario 1).
        stream_tokens: ``max_tokens`` of those streams (real model).
        llama_kill_streams: requests in flight when llama-server is killed (scenario 2).
        pause_streams: streams generating while the broker is frozen (scenario 4).
        burst: requests published at once on 2 slots with a small queue (scenario 5).
        hostile: malformed payloads against the fast scripted backend (scenario 6).
        hostile_real: malformed payloads in the phase against real llama.cpp (scenario 6).
        valid_every: one valid request per this many hostile ones (scenario 6).
        duplicates: requests each sent twice (scenario 7).
        soak_s: duration of the soak (scenario 10; the short form is a smoke run).
        soak_streams: concurrent devices during the soak.
    """

    name: str
    restart_streams: int
    stream_tokens: int
    llama_kill_streams: int
    pause_streams: int
    burst: int
    hostile: int
    hostile_real: int
    valid_every: int
    duplicates: int
    soak_s: float
    soak_streams: int


SHORT = Sizes(name="short", restart_streams=5, stream_tokens=64, llama_kill_streams=3,
              pause_streams=5, burst=100, hostile=1000, hostile_real=60, valid_every=20,
              duplicates=10, soak_s=float(os.environ.get("FAULTS_SOAK_S", "20")), soak_streams=3)
LONG = Sizes(name="long", restart_streams=20, stream_tokens=96, llama_kill_streams=6,
             pause_streams=20, burst=500, hostile=10_000, hostile_real=300, valid_every=20,
             duplicates=50, soak_s=600.0, soak_streams=3)

SIZES = LONG if os.environ.get("FAULTS_SIZE", "short").lower() == "long" else SHORT
