"""The fault suite's rig: devices with persistent sessions, stream bookkeeping, RSS sampling,
and the :class:`Result` row every scenario fills in (and the report prints).

A scenario is a plain function ``(env, sizes) -> Result`` in
:mod:`tests.faults.scenarios`; it starts what it needs (brokers, backends, the
bridge) in ``with`` blocks, so everything stops even when it fails, records its
figures in a :class:`Result`, states its expectations with :meth:`Result.expect`
and ends with :meth:`Result.check`, which raises :class:`ScenarioFailed` (an
``AssertionError``) listing every unmet expectation. The tests call the
functions with the short sizes, ``tests/faults/report.py`` with the long ones.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.llama.embedded import EmbeddedLlama
from bridge.service.bridge import Bridge
from tests.support.bridge_proc import running_bridge
from tests.support.device import Device
from tests.support.replies import StreamView
from tests.support.waiting import DEADLINE, poll_until

# Prompts with nothing in common, so each stream is easy to tell apart in the tap.
PROMPTS = [
    "Apples are", "Bicycles can", "Copper is a", "Dolphins swim", "Elephants never",
    "Forests grow", "Glaciers move", "Harbours shelter", "Islands form", "Jaguars hunt",
    "Kettles whistle", "Lanterns glow", "Mountains rise", "Nebulae shine", "Oceans hold",
    "Pianos sound", "Quartz is", "Rivers carve", "Satellites orbit", "Tulips bloom",
    "Umbrellas open", "Volcanoes erupt", "Windmills turn", "Xylophones ring", "Yachts sail",
    "Zebras graze",
]


def prompt(i: int) -> str:
    """A distinct prompt for stream ``i``."""
    base = PROMPTS[i % len(PROMPTS)]
    return base if i < len(PROMPTS) else f"{base} (variant {i // len(PROMPTS)})"


# =========================================================================== results


class ScenarioFailed(AssertionError):
    """A scenario's expectations were not met; ``result`` holds its figures."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"{result.scenario}: " + "; ".join(result.failures))
        self.result = result


@dataclass
class Result:
    """One row of the reliability table.

    Attributes:
        scenario: what was done.
        load: how much (streams, requests).
        faults: what was injected.
        sent: requests sent.
        terminal: requests that got exactly one terminal message (after recovery, if any).
        lost: reply messages never received (``seq`` gaps, missing terminals), after
            recovery; plus requests silently dropped.
        duplicated: requests generated twice (backend requests beyond one), second
            terminal messages, and ``seq`` numbers received with different payloads.
        redelivered: harmless QoS 1 redeliveries (same ``seq``, same payload), removed
            by de-duplicating on ``seq``.
        max_rss_mb: peak resident memory of the process hosting the bridge, if sampled.
    """

    scenario: str
    load: str
    faults: str
    sent: int = 0
    terminal: int = 0
    lost: int = 0
    duplicated: int = 0
    redelivered: int = 0
    max_rss_mb: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        """A figure or remark for the report."""
        self.notes.append(text)

    def expect(self, condition: bool, message: str) -> None:
        """Record an expectation; unmet ones make :meth:`check` fail."""
        if not condition:
            self.failures.append(message)

    def check(self) -> Result:
        """Raise :class:`ScenarioFailed` if any expectation was not met; else return self."""
        self.seconds = time.monotonic() - self.started
        if self.failures:
            raise ScenarioFailed(self)
        return self


# =========================================================================== streams


def tally(res: Result, views: list[StreamView], generations_per_request: list[int] | None = None,
          *, streams: int | None = None) -> None:
    """Fill ``terminal``, ``lost``, ``duplicated`` and ``redelivered`` from the streams seen.

    Args:
        views: one per request that should have been answered.
        generations_per_request: backend requests seen for each (more than 1 = generated twice).
        streams: how many answered requests there should be (default ``res.sent``); fewer
            views count as requests silently dropped.
    """
    res.terminal = sum(1 for v in views if len(v.terminals) == 1)
    want = res.sent if streams is None else streams
    res.lost = sum(v.missing for v in views) + max(0, want - len(views))
    res.redelivered = sum(v.redelivered for v in views)
    res.duplicated = (sum(max(0, len(v.terminals) - 1) + v.conflicts for v in views)
                      + sum(max(0, n - 1) for n in generations_per_request or []))


# =========================================================================== devices


def v5_props(*, response_topic: str | None = None, correlation: bytes | None = None,
             expiry: int | None = None) -> Properties:
    """PUBLISH properties for an MQTT 5 request."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    return props


# =========================================================================== sampling


@dataclass
class Sample:
    at: float
    rss: int
    fds: int


class ProcessSampler:
    """Samples a process's RSS and open file descriptors every ``interval`` seconds.

    Measurement, not waiting: the thread takes samples until :meth:`stop`.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.25) -> None:
        self.proc = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.samples: list[Sample] = []
        self.extra: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def __enter__(self) -> ProcessSampler:
        self.take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with suppress(psutil.Error):
            self.take()

    def take(self) -> None:
        with self.proc.oneshot():
            self.samples.append(Sample(time.monotonic(), self.proc.memory_info().rss,
                                       self.proc.num_fds()))
        for hook in self.extra:
            hook()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.take()
            except psutil.Error:
                return  # the process is gone

    @property
    def max_rss_mb(self) -> float:
        return max(s.rss for s in self.samples) / 2**20

    def rss_mb(self, index: int) -> float:
        return self.samples[index].rss / 2**20


# =========================================================================== environment


_counter = itertools.count(1)


@dataclass
class Env:
    """What a scenario may use besides what it starts itself.

    Attributes:
        workdir: a private directory.
        llama_url: returns the URL of the shared real llama.cpp server (2 slots).
        make_llama: starts a private real llama.cpp server (stopped by the owner of the env).
    """

    workdir: Path
    llama_url: Callable[[], str]
    make_llama: Callable[..., EmbeddedLlama]

    def dir(self, name: str) -> Path:
        path = self.workdir / f"{name}-{next(_counter)}"
        path.mkdir(parents=True)
        return path


def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE,
               interval: float = 0.05) -> bool:
    """Poll a condition that sends no event (bridge counters, process state) until it holds."""
    return bool(poll_until(condition, bool, timeout, interval))


@contextmanager
def devices(host: str, port: int, names: list[str], **kwargs: Any) -> Iterator[list[Device]]:
    """Connected devices, closed on exit."""
    made: list[Device] = []
    try:
        for name in names:
            made.append(Device(host, port, name, **kwargs).connect())
        yield made
    finally:
        for device in made:
            with suppress(Exception):
                device.close()


_bridge_ids = itertools.count(1)


def start_bridge(host: str, port: int, llama_urls: list[str], *, protocol: str = "auto",
                 mqtt_settings: dict[str, Any] | None = None,
                 llama_settings: dict[str, Any] | None = None,
                 **overrides: Any) -> AbstractContextManager[Bridge]:
    """:func:`tests.support.bridge_proc.running_bridge` with the scenarios' defaults.

    Health probes default to every 2 s: below llama-server's 5 s keep-alive timeout, so
    a probe never races the server closing its idle connection (see docs/reliability.md).
    """
    overrides.setdefault("bridge_id", f"fault-bridge-{next(_bridge_ids)}")
    overrides.setdefault("dedupe_ttl_s", 600)
    return running_bridge(host, port, llama_urls, protocol=protocol, mqtt=mqtt_settings,
                          llama={"health_interval_s": 2.0, **(llama_settings or {})},
                          **overrides)


def bridge_threads_alive(bridge: Bridge) -> list[str]:
    """Names of the bridge's own threads that are NOT alive (empty: all alive)."""
    alive = {t.name for t in threading.enumerate() if t.is_alive()}
    workers = bridge.workers.size if bridge.workers else 0
    wanted = ["bridge-intake", "bridge-ticker", "bridge-health",
              *(f"bridge-worker-{i}" for i in range(workers))]
    client = bridge.link._client  # paho's network thread carries the client id in its name
    paho = getattr(client, "_thread", None)
    dead = [name for name in wanted if name not in alive]
    if paho is None or not paho.is_alive():
        dead.append("paho network thread")
    return dead


@contextmanager
def bridge_process(host: str, port: int, llama_url: str, workdir: Path, *, bridge_id: str,
                   protocol: str = "5", settings: dict[str, str] | None = None,
                   log_level: str = "WARNING") -> Iterator[subprocess.Popen[bytes]]:
    """``python -m bridge run`` as a child process, online (retained status) on return.

    For faults where the bridge may hang: the test stays bounded, because teardown
    ends the process (SIGTERM, then SIGKILL after 10 s).

    Args:
        settings: environment variables, e.g. ``{"BRIDGE_MQTT__MAX_QUEUED": "10"}``.
    Yields:
        The process; its log is ``workdir/bridge.log``.
    """
    from tests.support.recorder import Recorder

    env = {**os.environ, "BRIDGE_DEDUPE_TTL_S": "600", **(settings or {})}
    status = Recorder(host, port, topic_filter=f"llm/status/{bridge_id}")
    log = open(workdir / "bridge.log", "wb")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "--mqtt-host", host, "--mqtt-port", str(port),
         "--mqtt-protocol", protocol, "--llama-url", llama_url, "--bridge-id", bridge_id,
         "--log-level", log_level],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        online = status.wait_for(lambda ms: any(b'"online"' in m.payload for m in ms), 60)
        if not online:
            raise TimeoutError(f"the bridge process never came online; log: "
                               f"{(workdir / 'bridge.log').read_text(errors='replace')[-2000:]}")
        yield proc
    finally:
        status.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def wait_while_progressing(condition: Callable[[], bool], progress: Callable[[], int], *,
                           stall_s: float = 60.0, limit_s: float = 1800.0) -> bool:
    """Poll ``condition`` for as long as ``progress()`` keeps growing.

    For waits whose length depends on how fast a loaded machine generates: give up only
    when nothing moved for ``stall_s`` (a hang), or after ``limit_s`` in any case.
    """
    end = time.monotonic() + limit_s
    last, moved = progress(), time.monotonic()
    while not condition():
        now = time.monotonic()
        current = progress()
        if current != last:
            last, moved = current, now
        if now - moved > stall_s or now > end:
            return False
        time.sleep(0.05)  # poll interval, bounded by the stall and limit above
    return True


def bridge_state(bridge: Bridge) -> str:
    """A one-line picture of a bridge that did not finish, for the failure message."""
    with bridge.jobs.lock:
        jobs = [f"{c}/{i}:{j.state}@seq{j.channel.seq.next}" for (c, i), j in
                list(bridge.jobs.items())[:6]]
    return (f"connected={bridge.link.connected} outstanding={bridge.link.outstanding} "
            f"published={bridge.link.published} jobs={len(bridge.jobs)} {jobs}")
