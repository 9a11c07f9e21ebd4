"""Fixtures the service tests share."""

from __future__ import annotations

import pytest

from tests.support.processes import EmbeddedBroker


@pytest.fixture
def amqtt(amqtt_broker: EmbeddedBroker) -> EmbeddedBroker:
    """conftest's embedded amqtt broker, under the short name these tests use."""
    return amqtt_broker
