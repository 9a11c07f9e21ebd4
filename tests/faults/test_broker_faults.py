"""Scenarios 1 and 4: Mosquitto stopped, crashed, frozen, or not reading, mid-stream."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.rig import Env
from tests.faults.sizes import SIZES

pytestmark = [pytest.mark.mosquitto]


@pytest.mark.llama
def test_broker_sigterm_and_restart_mid_stream_loses_nothing(env: Env) -> None:
    result = scenarios.broker_restart(env, SIZES, kill=False)
    assert result.terminal == result.sent and result.lost == 0 and result.duplicated == 0


@pytest.mark.llama
def test_broker_sigkill_and_restart_mid_stream_recovers_every_stream(env: Env) -> None:
    result = scenarios.broker_restart(env, SIZES, kill=True)
    assert result.terminal == result.sent and result.lost == 0 and result.duplicated == 0


@pytest.mark.llama
def test_broker_frozen_memory_bounded_by_flow_control(env: Env) -> None:
    result = scenarios.broker_paused(env, SIZES)
    assert result.terminal == result.sent and result.lost == 0


def test_broker_frozen_past_max_generation_still_ends_every_stream(env: Env) -> None:
    """Regression test for B2."""
    result = scenarios.broker_paused_past_deadline(env, SIZES)
    assert result.terminal == result.sent


def test_broker_that_stops_reading_neither_stalls_cancels_nor_deadlocks_intake(
    env: Env,
) -> None:
    result = scenarios.broker_stops_reading(env, SIZES)
    assert result.terminal == result.sent


def test_bridge_stops_in_bounded_time_while_the_broker_is_frozen(env: Env) -> None:
    result = scenarios.stop_while_broker_frozen(env, SIZES)
    assert not result.failures
