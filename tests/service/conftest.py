"""Fixtures the service tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import EmbeddedBroker, EmbeddedLlama, EmbeddedLlamaUnavailable


@pytest.fixture
def amqtt(amqtt_broker: EmbeddedBroker) -> EmbeddedBroker:
    """conftest's embedded amqtt broker, under the short name these tests use."""
    return amqtt_broker


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two real llama.cpp servers (one slot, one thread each): their URLs. One pair for
    the whole run: several bridges over two backends (scale-out, shared sessions)."""
    servers: list[EmbeddedLlama] = []
    try:
        for i in range(2):
            log = tmp_path_factory.mktemp(f"llama-pair-{i}") / "llama-server.log"
            server = EmbeddedLlama(parallel=1, ctx=1024, threads=1, log_path=log,
                                   chat_template="chatml")  # as tests/conftest.py: no stops
            servers.append(server)
            try:
                server.start()
            except EmbeddedLlamaUnavailable as exc:
                pytest.fail(f"{exc}\nscripts/setup installs everything.", pytrace=False)
        yield [s.url for s in servers]
    finally:
        for server in servers:
            server.stop()
