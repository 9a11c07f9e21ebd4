"""Start a real :class:`~bridge.service.bridge.Bridge` in-process against a broker and llama."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridge.config.settings import load_config
from bridge.service.bridge import Bridge

_ids = itertools.count(1)


@contextmanager
def running_bridge(host: str, port: int, llama_urls: list[str], *, protocol: str = "auto",
                   mqtt: dict[str, Any] | None = None, llama: dict[str, Any] | None = None,
                   **overrides: Any) -> Iterator[Bridge]:
    """A started bridge; stopped (offline status published) on exit.

    Args:
        host, port: the broker.
        llama_urls: backends.
        protocol: ``auto``, ``5`` or ``3.1.1``.
        mqtt: extra ``[mqtt]`` settings (credentials, TLS).
        llama: extra ``[llama]`` settings (health probe interval, timeouts).
        overrides: top-level settings (``chunk_bytes``, ``max_tokens_cap`` …).
    """
    overrides.setdefault("bridge_id", f"test-bridge-{next(_ids)}")
    overrides.setdefault("max_tokens_cap", 48)
    overrides.setdefault("dedupe_ttl_s", 60)
    with tempfile.TemporaryDirectory(prefix="bridge-sessions-") as scratch:
        # Sessions in a folder of this bridge's own, not in the working directory, where
        # one test's conversations would meet the next test's.
        overrides.setdefault("sessions_db", Path(scratch) / "sessions.db")
        yield from _run(host, port, llama_urls, protocol, mqtt, llama, overrides)


def _run(host: str, port: int, llama_urls: list[str], protocol: str,
         mqtt: dict[str, Any] | None, llama: dict[str, Any] | None,
         overrides: dict[str, Any]) -> Iterator[Bridge]:
    cfg = load_config(mqtt={"host": host, "port": port, "protocol": protocol,
                            "reconnect_min_s": 1, "reconnect_max_s": 2, **(mqtt or {})},
                      llama={**(llama or {}), "urls": llama_urls}, **overrides)
    bridge = Bridge(cfg, llama_urls)
    bridge.start()
    try:
        yield bridge
    finally:
        bridge.stop()


@contextmanager
def bridge_process(workdir: Path, host: str, port: int, llama_urls: list[str], bridge_id: str,
                   env: dict[str, str], metrics_port: int, *, protocol: str = "5",
                   shared_group: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m bridge run`` as its own process (so it can be SIGKILLed); killed on exit.

    Args:
        workdir: its working directory; its output goes to ``{bridge_id}.log`` there.
        host, port: the broker.
        llama_urls: backends.
        bridge_id: ``--bridge-id``.
        env: extra environment (``BRIDGE_…`` settings).
        metrics_port: ``--metrics-port``.
        protocol: ``--mqtt-protocol``.
        shared_group: ``--shared-group``, if any.
    """
    cmd = [sys.executable, "-m", "bridge", "run", "--mqtt-host", host, "--mqtt-port", str(port),
           "--mqtt-protocol", protocol, "--bridge-id", bridge_id,
           "--metrics-port", str(metrics_port)]
    if shared_group is not None:
        cmd += ["--shared-group", shared_group]
    for url in llama_urls:
        cmd += ["--llama-url", url]
    with open(workdir / f"{bridge_id}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=workdir, env={**os.environ, **env})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
