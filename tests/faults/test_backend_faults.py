"""Scenarios 2 and 3: llama-server killed mid-stream, and stalls before/after the first byte."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.rig import Env
from tests.faults.sizes import SIZES

pytestmark = [pytest.mark.mosquitto]


@pytest.mark.llama
def test_llama_killed_mid_stream_errors_then_recovers_without_bridge_restart(env: Env) -> None:
    result = scenarios.llama_killed(env, SIZES)
    assert result.terminal == result.sent and result.lost == 0


def test_retry_with_same_id_after_backend_unavailable_is_served(env: Env) -> None:
    """Regression test for B1."""
    result = scenarios.retry_same_id_after_backend_unavailable(env, SIZES)
    assert result.terminal == result.sent


def test_health_probe_on_a_stale_keepalive_connection_keeps_backend_healthy(env: Env) -> None:
    result = scenarios.stale_keepalive_probe(env, SIZES)
    assert result.terminal == result.sent


def test_llama_stalls_end_in_timeout_and_close_the_connection(env: Env) -> None:
    result = scenarios.llama_stalls(env, SIZES)
    assert result.terminal == result.sent and result.lost == 0
