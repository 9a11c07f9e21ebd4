"""Prometheus metrics and the counters behind the status message's ``stats``.

See README, *Observability*.

Every :class:`~bridge.service.bridge.Bridge` owns one :class:`BridgeMetrics` with a
private ``CollectorRegistry`` -- several bridges can live in one process (the
tests start many) and none of them touches prometheus-client's global registry.

Cost on the hot path is nil by design: nothing here runs per token or per
published message. Messages and bytes published are two plain integers that
:class:`~bridge.mqtt.link.MqttLink` bumps anyway; queue depth, active requests
and backend state are read from the live objects when Prometheus scrapes; only
a request's acceptance, rejection and end (once each per request) take a lock, and
its end observes histograms. The status ``stats`` are read from the same counters.

The exposition is served by prometheus-client's own HTTP server (``metrics_port``),
bound to ``metrics_host`` -- 127.0.0.1 unless configured otherwise, because that
server has neither authentication nor TLS and prometheus-client would otherwise
bind every interface of a gateway that usually sits on a device LAN.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.llama.pool import Backend
from bridge.protocol.messages import Timings, Usage
from bridge.service.job import Outcome

log = logging.getLogger("bridge.service.metrics")

PREFIX = "llm_bridge"

#: Seconds from a request's arrival to its first text (queue time included):
#: interactive answers land in the first buckets, queued ones in the later.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Decode rate per request: a small CPU model does 10-100 tokens/s, a GPU several hundred.
TPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0)
#: Whole requests, up to the default max_generation_s (600 s).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Time spent waiting for a worker.
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class LiveState:
    """Where the metrics read the bridge's current state at scrape time.

    Attributes:
        queued: requests waiting for a worker.
        active: requests running against a backend.
        backends: the configured backends (health, slots, active).
        published: ``(messages, bytes)`` handed to the broker since start.
    """

    queued: Callable[[], int]
    active: Callable[[], int]
    backends: Callable[[], Sequence[Backend]]
    published: Callable[[], tuple[int, int]]


class MetricsError(RuntimeError):
    """The metrics endpoint could not be served (the message says why and what to change)."""


_DONE_LABELS = (Outcome.done.value, Outcome.reply.value)


class BridgeMetrics:
    """The counters and histograms of one bridge.

    Args:
        bridge_id: exported in ``llm_bridge_info``.
        version: the package version, likewise.
        live: callbacks reading the bridge's state at scrape time.
    """

    def __init__(self, bridge_id: str, version: str, live: LiveState) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.live = live
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._lock = threading.Lock()
        self._accepted = 0
        self._outcomes: dict[str, int] = {}
        self._rejected: dict[str, int] = {}
        self._by_backend: dict[str, int] = {}
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

        info = Info(f"{PREFIX}", "This bridge.", registry=self.registry)
        info.info({"bridge_id": bridge_id, "version": version})
        start = Gauge(f"{PREFIX}_start_time_seconds", "Unix time the bridge started.",
                      registry=self.registry)
        start.set(self.started_at)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From a request's arrival to its first text, queue time included.",
            buckets=TTFT_BUCKETS, registry=self.registry)
        self.tokens_per_s = Histogram(
            f"{PREFIX}_tokens_per_second",
            "Completion tokens per second of each request, from its first text to its end.",
            buckets=TPS_BUCKETS, registry=self.registry)
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "From a request's arrival to its terminal message, by any outcome.",
            buckets=DURATION_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time accepted requests waited for a worker.",
            buckets=QUEUE_BUCKETS, registry=self.registry)
        self.prompt_cache = Counter(
            f"{PREFIX}_llama_prompt_tokens",
            "Prompt tokens of finished requests as llama-server reports them: taken from "
            "its prompt cache (cache_n) or read anew (prompt_n).",
            ["source"], registry=self.registry)
        self.registry.register(_LiveCollector(self))

    # ------------------------------------------------------------------ recording

    def request_accepted(self) -> None:
        """Count a request accepted at intake (its ``start`` published)."""
        with self._lock:
            self._accepted += 1

    def request_finished(self, label: str, backend: str | None, timings: Timings,
                         usage: Usage) -> None:
        """Count an accepted request that got its terminal message (once per request).

        Args:
            label: how it ended (:func:`bridge.service.job.outcome_label`).
            backend: the URL of the backend that served it, if one did.
            timings: its times as the ``done`` message reports them.
            usage: its tokens.
        """
        with self._lock:
            self._outcomes[label] = self._outcomes.get(label, 0) + 1
            if backend is not None:
                self._by_backend[backend] = self._by_backend.get(backend, 0) + 1
            self._prompt_tokens += usage.prompt_tokens
            self._completion_tokens += usage.completion_tokens
        self.duration.observe(timings.total_ms / 1000.0)
        self.queue_wait.observe(timings.queue_ms / 1000.0)
        if timings.ttft_ms is not None:
            self.ttft.observe(timings.ttft_ms / 1000.0)
        if timings.tokens_per_s is not None:
            self.tokens_per_s.observe(timings.tokens_per_s)
        if timings.cache_n is not None:
            self.prompt_cache.labels("cache").inc(timings.cache_n)
        if timings.prompt_n is not None:
            self.prompt_cache.labels("read").inc(timings.prompt_n)

    def request_rejected(self, code: str) -> None:
        """Count a request answered with one ``error`` at intake (never queued)."""
        with self._lock:
            self._rejected[code] = self._rejected.get(code, 0) + 1

    # ------------------------------------------------------------------ reading

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started_mono

    def counts(self) -> _Counts:
        """Consistent copies of the counters."""
        with self._lock:
            return _Counts(self._accepted, dict(self._outcomes), dict(self._rejected),
                           dict(self._by_backend), self._prompt_tokens, self._completion_tokens)

    def summary(self) -> dict[str, int]:
        """Requests ``accepted``, ``rejected``, ``done`` (done or reply), ``cancelled`` and
        ended otherwise (``errors``): the first counters of the status ``stats``."""
        return self.counts().summary()

    def snapshot(self) -> dict[str, Any]:
        """The status message's ``stats``: the same numbers as the metrics."""
        counts = self.counts()
        outcomes, rejected = counts.outcomes, counts.rejected
        prompt, completion = counts.prompt_tokens, counts.completion_tokens
        messages, nbytes = self.live.published()
        return {
            **counts.summary(),
            "uptime_s": round(self.uptime_s, 1),
            "outcomes": outcomes,
            "rejected_by_code": rejected,
            "published_messages": messages,
            "published_bytes": nbytes,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
        }

    def exposition(self) -> bytes:
        """The Prometheus text format, as the HTTP endpoint serves it."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ HTTP endpoint

    def serve(self, host: str, port: int) -> int:
        """Start prometheus-client's HTTP server on ``host:port`` (0: any free port).

        Returns:
            the bound port.
        Raises:
            MetricsError: the address is taken or not local (the message says which).
        """
        from prometheus_client import start_http_server

        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {exc}; "
                          "choose another --metrics-port") from exc
        self._server, self._server_thread = server, thread
        bound = int(server.server_port)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP server, if started."""
        server, thread = self._server, self._server_thread
        self._server = self._server_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)


@dataclass(frozen=True)
class _Counts:
    """What :class:`BridgeMetrics` counted, copied at one instant."""

    accepted: int
    outcomes: dict[str, int]  # by outcome label
    rejected: dict[str, int]  # by error code
    by_backend: dict[str, int]  # by backend URL
    prompt_tokens: int
    completion_tokens: int

    def summary(self) -> dict[str, int]:
        """See :meth:`BridgeMetrics.summary`."""
        done = sum(self.outcomes.get(label, 0) for label in _DONE_LABELS)
        cancelled = self.outcomes.get(Outcome.cancelled.value, 0)
        return {"accepted": self.accepted, "rejected": sum(self.rejected.values()),
                "done": done, "errors": sum(self.outcomes.values()) - done - cancelled,
                "cancelled": cancelled}


class _LiveCollector(Collector):
    """Counters kept by the bridge and state read from it, produced at scrape time."""

    def __init__(self, metrics: BridgeMetrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        return []  # not known before the first scrape; the registry then calls collect()

    def collect(self) -> Iterator[Metric]:
        live = self._m.live
        counts = self._m.counts()
        outcomes, rejected, by_backend = counts.outcomes, counts.rejected, counts.by_backend
        prompt, completion = counts.prompt_tokens, counts.completion_tokens

        accepted = CounterMetricFamily(f"{PREFIX}_requests_accepted",
                                       "Requests accepted (a start message was published).")
        accepted.add_metric([], counts.accepted)
        yield accepted

        done = CounterMetricFamily(
            f"{PREFIX}_requests", "Accepted requests by how they ended: done, reply, "
            "cancelled, expired or the error code.", labels=["outcome"])
        for label, count in sorted(outcomes.items()):
            done.add_metric([label], count)
        yield done

        rej = CounterMetricFamily(f"{PREFIX}_requests_rejected",
                                  "Requests refused at intake with one error, by code.",
                                  labels=["code"])
        for code, count in sorted(rejected.items()):
            rej.add_metric([code], count)
        yield rej

        tokens = CounterMetricFamily(f"{PREFIX}_tokens", "Tokens of finished requests.",
                                     labels=["kind"])
        tokens.add_metric(["prompt"], prompt)
        tokens.add_metric(["completion"], completion)
        yield tokens

        queued = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a worker.")
        queued.add_metric([], live.queued())
        yield queued
        active = GaugeMetricFamily(f"{PREFIX}_active_requests",
                                   "Requests running against a backend.")
        active.add_metric([], live.active())
        yield active

        messages, nbytes = live.published()
        msgs = CounterMetricFamily(f"{PREFIX}_published_messages",
                                   "MQTT messages handed to the broker (chunks, start, "
                                   "progress, terminal, status).")
        msgs.add_metric([], messages)
        yield msgs
        size = CounterMetricFamily(f"{PREFIX}_published_bytes",
                                   "Payload bytes handed to the broker.")
        size.add_metric([], nbytes)
        yield size

        # By URL (the operator's view; the endpoint is not for devices) and by the name
        # the status topic shows.
        labels = ["backend", "name"]
        healthy = GaugeMetricFamily(f"{PREFIX}_backend_healthy",
                                    "1 if the llama-server is in rotation.", labels=labels)
        slots = GaugeMetricFamily(f"{PREFIX}_backend_slots", "Slots the llama-server reports.",
                                  labels=labels)
        busy = GaugeMetricFamily(f"{PREFIX}_backend_active",
                                 "Requests this bridge runs on the llama-server now.",
                                 labels=labels)
        served = CounterMetricFamily(f"{PREFIX}_backend_requests",
                                     "Finished requests by the llama-server that served them.",
                                     labels=labels)
        for b in live.backends():
            key = [b.url, b.name]
            healthy.add_metric(key, 1.0 if b.healthy else 0.0)
            slots.add_metric(key, b.slots)
            busy.add_metric(key, b.active)
            served.add_metric(key, by_backend.get(b.url, 0))
        yield healthy
        yield slots
        yield busy
        yield served
