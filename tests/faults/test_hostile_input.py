"""Scenario 6: malformed and hostile payloads interleaved with valid requests."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.rig import Env
from tests.faults.sizes import SIZES

pytestmark = [pytest.mark.mosquitto]


@pytest.mark.llama
def test_hostile_payloads_each_get_one_error_and_never_disturb_the_bridge(env: Env) -> None:
    result = scenarios.hostile_input(env, SIZES)
    assert result.terminal == result.sent and result.lost == 0 and result.duplicated == 0


def test_oversized_correlation_data_cannot_knock_the_bridge_off_the_broker(env: Env) -> None:
    """Regression test for B3."""
    result = scenarios.oversized_correlation_data(env, SIZES)
    assert result.terminal == result.sent


def test_a_publish_the_broker_refuses_never_cuts_the_bridge_off(env: Env) -> None:
    """Regression test for B12: every request ends, the other devices are served."""
    result = scenarios.poison_publish(env, SIZES)
    assert result.terminal == result.sent


def test_nan_and_infinity_are_bad_requests_not_forwarded(env: Env) -> None:
    """Regression test for B5."""
    result = scenarios.non_finite_numbers(env, SIZES)
    assert result.terminal == result.sent
