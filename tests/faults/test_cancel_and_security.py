"""Scenarios 8 and 9: cancel / device gone / max_generation_s, and TLS + passwords + ACL."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.rig import Env
from tests.faults.sizes import SIZES

pytestmark = [pytest.mark.mosquitto]


@pytest.mark.llama
def test_cancel_device_gone_and_max_generation_free_the_slot(env: Env) -> None:
    result = scenarios.cancel_and_gone(env, SIZES)
    assert result.terminal == result.sent and result.lost == 0


@pytest.mark.llama
def test_bridge_on_tls_passwords_acl_and_least_privilege(env: Env) -> None:
    result = scenarios.security(env, SIZES)
    assert result.terminal == result.sent


def test_bridge_account_cannot_be_used_as_a_device(env: Env) -> None:
    """Regression test for B6."""
    result = scenarios.bridge_account_as_device(env, SIZES)
    assert result.terminal == 0
