"""Scenarios 5, 7 and 10: a burst on a small queue, duplicate ids, and a soak (smoke here)."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.rig import Env
from tests.faults.sizes import SIZES

pytestmark = [pytest.mark.mosquitto]


def test_burst_gets_one_terminal_message_per_request(env: Env) -> None:
    result = scenarios.burst(env, SIZES)
    assert result.terminal == result.sent and result.lost == 0 and result.duplicated == 0


def test_duplicate_ids_are_never_generated_twice_and_replay_identically(env: Env) -> None:
    result = scenarios.duplicate_ids(env, SIZES)
    assert result.duplicated == 0 and result.lost == 0


def test_retained_request_is_generated_once_across_bridge_restarts(env: Env) -> None:
    """Regression test for B4."""
    result = scenarios.retained_request(env, SIZES)
    assert result.duplicated == 0


@pytest.mark.llama
def test_soak_smoke_rss_and_fds_flat_every_request_answered(env: Env) -> None:
    result = scenarios.soak(env, SIZES)
    assert result.sent > 0 and result.terminal == result.sent and result.lost == 0
