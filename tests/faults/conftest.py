"""The ``env`` fixture: what a fault scenario may use besides what it starts itself."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.llama.embedded import EmbeddedLlama
from tests.faults.rig import Env
from tests.support.waiting import poll_until


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    """A private directory, the session's llama.cpp server and ``make_llama``, on demand.

    The llama fixtures are requested lazily so scenarios that use only the scripted
    backend do not start llama.cpp; modules mark their tests ``llama`` / ``mosquitto``.
    """

    def llama_url() -> str:
        return str(request.getfixturevalue("llama_server"))

    def make_llama(**kwargs: Any) -> EmbeddedLlama:
        factory = request.getfixturevalue("make_llama")
        server: EmbeddedLlama = factory(**kwargs)
        return server

    return Env(tmp_path, llama_url, make_llama)


_OURS = ("bridge-", "paho-", "fake-llama", "http-tap", "sampler", "outstanding-probe",
         "soak-")


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """Every thread a scenario started (bridge, paho clients, servers, samplers) has
    ended once the test is over -- on failure too."""
    before = set(threading.enumerate())
    yield

    def ours() -> list[str]:
        return [t.name for t in set(threading.enumerate()) - before
                if t.is_alive() and t.name.startswith(_OURS)]

    left = poll_until(ours, lambda names: not names, 15, 0.1)
    assert not left, f"threads left running after the test: {left}"
