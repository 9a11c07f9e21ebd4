"""Shared fixtures: a real llama.cpp server, real brokers (amqtt, Mosquitto).

Nothing here skips: the suite is about the real things, and CI installs them
(``.ci/run``). A missing piece fails with a message saying how to install it.

Markers (declared in pyproject.toml) are added automatically: ``llama`` to every
test that uses the ``llama_server`` fixture, ``mosquitto`` to every test that
uses a Mosquitto broker -- so ``pytest -m "not llama"`` gives a fast run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.llama.client import LlamaCppClient
from tests.support.local_broker import require_mosquitto
from tests.support.processes import (
    BrokerInfo,
    EmbeddedBroker,
    EmbeddedLlama,
    EmbeddedLlamaUnavailable,
    MosquittoProcess,
)
from tests.support.recorder import PublishLog, Recorder
from tests.support.redis_server import RedisProcess

_LLAMA_FIXTURES = {"llama_server", "llama", "make_llama"}
_MOSQUITTO_FIXTURES = {"mosquitto", "mosquitto_secure"}

BROKER_KINDS = ["amqtt", "mosquitto-v311", "mosquitto-v5"]


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers (again -- harmless -- so they exist even without pyproject)."""
    config.addinivalue_line(
        "markers", "llama: needs the real llama.cpp server (xllamacpp + Gemma 3 270M)"
    )
    config.addinivalue_line("markers", "mosquitto: needs the mosquitto binary")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the real servers they use, so they can be selected with ``-m``."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _LLAMA_FIXTURES:
            item.add_marker(pytest.mark.llama)
        callspec = getattr(item, "callspec", None)
        broker_param = callspec.params.get("broker") if callspec is not None else None
        if names & _MOSQUITTO_FIXTURES or (
            "broker" in names and str(broker_param).startswith("mosquitto")
        ):
            item.add_marker(pytest.mark.mosquitto)


# ---------------------------------------------------------------------------- llama.cpp


def _llama_threads() -> int:
    # Two slots decode together; more threads than cores only adds contention.
    return max(1, min(4, os.cpu_count() or 1))


# The suite's servers answer chat requests with ChatML, which the packaged *base* model
# has never seen: it never ends its turn, so every stream runs to max_tokens -- the long,
# steady streams that the load, fault and cancel tests need. (The quick-start default,
# a plain transcript with stop strings, ends answers after a sentence or two; pass
# ``chat_template=None`` for it, as tests/llama/test_embedded.py and the README tests do.)
SUITE_CHAT_TEMPLATE = "chatml"


def _start_llama(log_dir: Path, **kwargs: Any) -> EmbeddedLlama:
    kwargs.setdefault("threads", _llama_threads())
    kwargs.setdefault("chat_template", SUITE_CHAT_TEMPLATE)
    llama = EmbeddedLlama(log_path=log_dir / "llama-server.log", **kwargs)
    try:
        llama.start()
    except EmbeddedLlamaUnavailable as exc:
        pytest.fail(
            f"{exc}\nThe test suite needs the real llama.cpp server; it does not skip. "
            f"scripts/setup installs everything.",
            pytrace=False,
        )
    return llama


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedLlama]:
    """The session's llama.cpp server (2 slots, 4096 context), as an :class:`EmbeddedLlama`.

    Do not kill or restart it (other tests share it): use ``make_llama`` for that.
    """
    server = _start_llama(tmp_path_factory.mktemp("llama"), parallel=2, ctx=4096)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llama_server(llama: EmbeddedLlama) -> str:
    """Base URL of the session's real llama.cpp server (Gemma 3 270M, 2 slots, ctx 4096)."""
    return llama.url


@pytest.fixture
def make_llama(tmp_path: Path) -> Iterator[Callable[..., EmbeddedLlama]]:
    """A factory of private llama.cpp servers (for fault tests and special templates).

    ``make_llama(parallel=1, chat_template=...)`` returns a started
    :class:`EmbeddedLlama`; all are stopped at teardown.
    """
    started: list[EmbeddedLlama] = []

    def factory(**kwargs: Any) -> EmbeddedLlama:
        log_dir = tmp_path / f"llama-{len(started)}"
        log_dir.mkdir()
        server = _start_llama(log_dir, **kwargs)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.stop()


# ---------------------------------------------------------------------------- brokers


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto (``plain`` preset: anonymous, MQTT 3.1.1 + 5) on 127.0.0.1."""
    require_mosquitto()
    proc = MosquittoProcess(tmp_path / "mosquitto", "plain").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def mosquitto_secure(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto (``secure`` preset: TLS + passwords + the shipped ACL)."""
    require_mosquitto()
    proc = MosquittoProcess(tmp_path / "mosquitto-secure", "secure").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private ``redis-server`` on a free 127.0.0.1 port, with its own folder and password."""
    proc = RedisProcess(tmp_path / "redis").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def amqtt_broker() -> Iterator[EmbeddedBroker]:
    """The embedded amqtt broker on a free 127.0.0.1 port."""
    broker = EmbeddedBroker("127.0.0.1", 0)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(params=BROKER_KINDS)
def broker(request: pytest.FixtureRequest) -> BrokerInfo:
    """Each test runs against amqtt (3.1.1), Mosquitto at 3.1.1 and Mosquitto at 5.

    Returns:
        Where the broker is and which protocol version to use.
    """
    kind: str = request.param
    if kind == "amqtt":
        amqtt: EmbeddedBroker = request.getfixturevalue("amqtt_broker")
        return BrokerInfo(amqtt.host, amqtt.port, "3.1.1", "amqtt")
    proc: MosquittoProcess = request.getfixturevalue("mosquitto")
    return BrokerInfo(proc.host, proc.port, "5" if kind == "mosquitto-v5" else "3.1.1", "mosquitto")


@pytest.fixture
def recorder(broker: BrokerInfo) -> Iterator[Recorder]:
    """Everything published on ``broker`` (``#``, QoS 1), from before the bridge starts."""
    rec = Recorder(broker.host, broker.port, v5=broker.protocol == "5")
    yield rec
    rec.close()


@pytest.fixture
def published() -> PublishLog:
    """What the test's devices publish (each device is registered with ``track``)."""
    return PublishLog()


# ---------------------------------------------------------------------------- llama clients


@pytest.fixture
def clients() -> Iterator[list[LlamaCppClient]]:
    """Llama clients a test made (``tests.support.llama_client.serve``), closed after it."""
    made: list[LlamaCppClient] = []
    yield made
    for client in made:
        client.close()
