"""The bridge: builds its parts, starts and stops them (its contract: docs/protocol.md).

The path of one request, top to bottom:

1. paho's network thread receives a message and hands it to the intake thread
   (:meth:`Bridge._on_inbound`) — it never publishes or blocks on the network.
2. The intake thread validates it, answers bad input with one ``error``, applies
   duplicates and per-client limits, and queues the request, publishing ``start``
   (:mod:`bridge.service.admission`).
3. A worker runs it against the best backend and streams ``chunk``s, ending with
   ``done``/``reply``/``error`` (:mod:`bridge.service.runner`); every request ends in
   :mod:`bridge.service.finish` (confirmed, counted, logged).
4. The ticker thread flushes coalesced text when ``flush_ms`` is up, sends
   ``progress`` heartbeats and enforces ``max_generation_s`` (:mod:`bridge.service.ticker`).
"""

from __future__ import annotations

import logging
import threading

from bridge.config.profiles import ProfileRegistry
from bridge.config.settings import DeploymentConfig
from bridge.llama.pool import BackendPool
from bridge.llama.relay import Relay
from bridge.mqtt.link import Inbound, MqttLink, PublishError
from bridge.mqtt.refusals import StreamKey
from bridge.protocol.messages import ErrorCode
from bridge.service.admission import Admission
from bridge.service.dedupe import ClientLimits, DedupeCache
from bridge.service.finish import SHUTDOWN_MESSAGE, Finisher
from bridge.service.job import JobKey, JobTable
from bridge.service.metrics import BridgeMetrics, LiveState
from bridge.service.redis_store import RedisSessionStore, open_redis, redact
from bridge.service.runner import Runner
from bridge.service.scheduler import FairQueue, WorkerPool
from bridge.service.session_store import SessionLimits
from bridge.service.sessions import Sessions
from bridge.service.shared import SharedState
from bridge.service.status import OnlineStatus, offline_status
from bridge.service.ticker import Ticker
from bridge.version import __version__

log = logging.getLogger("bridge")

_DEFAULT_HTTP_POOL = 64  # kept-alive connections per backend (urllib3 opens more on demand)


class Bridge:
    """A running bridge: MQTT link, intake, workers, ticker and backends.

    Args:
        config: the deployment configuration.
        llama_urls: the llama-server base URLs to use (``config.llama.urls`` or embedded).
    """

    def __init__(self, config: DeploymentConfig, llama_urls: list[str]) -> None:
        self.cfg = config
        self.topics = config.topics
        # One pooled connection per concurrent stream. With max_concurrent unset the
        # concurrency (the servers' slots) is known only after probing: 64 covers most.
        self.pool = BackendPool(config.llama, llama_urls, on_change=self._status_changed,
                                pool_size=max(config.max_concurrent or 0, _DEFAULT_HTTP_POOL))
        self.limits = ClientLimits(config.client_max_inflight, config.client_rate_per_min)
        self.dedupe = DedupeCache(config.dedupe_ttl_s)
        self.queue: FairQueue[JobKey] = FairQueue(config.queue_size)
        self.profiles = ProfileRegistry(config.profiles)  # swapped on SIGHUP (bridge.cli.serve)
        self.shared: SharedState | None = None
        if config.sessions_url:  # several bridges: sessions, duplicates and leases in Redis
            where = redact(config.sessions_url)
            self.redis = open_redis(config.sessions_url)  # connects on first use
            self.shared = SharedState(self.redis, prefix=config.prefix,
                                      bridge_id=config.bridge_id,
                                      lease_s=config.session_lease_s,
                                      answer_ttl_s=config.dedupe_ttl_s, where=where)
            self.sessions = Sessions(RedisSessionStore(
                self.redis, SessionLimits.from_config(config), namespace=config.prefix,
                where=where))
        else:
            self.sessions = Sessions.from_config(config)  # the file opens on first use
        self.workers: WorkerPool | None = None
        self.relay = Relay()  # reads every running stream's tokens, in one thread
        self.jobs = JobTable()
        self._stopping = threading.Event()
        self.ticker = Ticker(self.jobs.snapshot, config.heartbeat_s, self.publish_status,
                             config.status_interval_s)
        self.metrics = BridgeMetrics(config.bridge_id, __version__, LiveState(
            queued=lambda: len(self.queue),
            active=self._active,
            backends=lambda: self.pool.backends,
            published=lambda: (self.link.published, self.link.published_bytes),
        ))
        self.metrics_port: int | None = None  # bound port of the metrics endpoint, if any
        self.link = MqttLink(
            config, self._on_inbound,
            will_payload=offline_status(config, "connection lost"),
            subscriptions=[self.topics.request_filter(config.shared_group),
                           self.topics.cancel_filter()],
            on_connected=self.publish_status,
            on_refused=self._on_refused,
        )
        self.status = OnlineStatus(config, self.link, self.pool, lambda: len(self.queue),
                                   self._active, self.metrics)
        self.finisher = Finisher(self.topics, self.link, self.jobs, self.limits, self.dedupe,
                                 self.metrics, self.ticker, self.shared)
        self.runner = Runner(config, self.link, self.pool, self.relay, self.sessions,
                             self.ticker, self.jobs, self._stopping, self.finisher,
                             self.shared)
        self.admission = Admission(config, self.link, self.pool, self.queue,
                                   lambda: self.workers, self.limits, self.dedupe,
                                   self.profiles, self.metrics, self.ticker, self.jobs,
                                   self.finisher, self.runner.run, self._stopping,
                                   self.shared)

    @property
    def stats(self) -> dict[str, int]:
        """Requests accepted, rejected, done, errors, cancelled (:meth:`BridgeMetrics.summary`)."""
        return self.metrics.summary()

    # ================================================================= lifecycle

    def start(self) -> None:
        """Probe backends, connect to the broker, start intake, workers and ticker."""
        if self.cfg.metrics_port is not None:  # first: a taken port fails before anything runs
            self.metrics_port = self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
        self.pool.start()
        if self.shared is not None:
            self.shared.start()
            self.shared.check()  # a wrong sessions_url is logged now, not at the first request
        size = self.cfg.max_concurrent or self.pool.total_slots
        self.relay.start()
        self.workers = WorkerPool(self.queue, size)
        self.workers.start()
        self.admission.start()
        self.ticker.start()
        try:
            self.link.start()
        except BaseException:
            self.stop()  # leave no thread behind when the broker refuses us
            raise
        log.info("bridge %s serving %s/request/+ with %d concurrent requests on %s",
                 self.cfg.bridge_id, self.cfg.prefix, size,
                 ", ".join(b.url for b in self.pool.backends))
        if self.cfg.shared_group and not self.link.is_v5:
            log.warning("shared_group %r over MQTT 3.1.1: shared subscriptions are an MQTT 5 "
                        "feature some brokers (Mosquitto) also give 3.1.1 clients and others "
                        "(amqtt) do not", self.cfg.shared_group)

    def stop(self) -> None:
        """Answer what is queued or running, mark the bridge offline, stop every thread."""
        # In a shared group, first make the broker route new requests to the other bridges.
        self.link.leave_shared()
        self._stopping.set()
        # With the broker away and the window full, waiting would never end.
        self.link.stop_waiting()
        self.admission.close()
        for key in self.queue.drain():
            job = self.jobs.get(key)
            if job is not None:
                self.finisher.end_unrun(job, ErrorCode.backend_unavailable, SHUTDOWN_MESSAGE,
                                        True)
        for job in self.jobs.running():
            job.shutting_down = True
            job.token.cancel()
        if self.workers is not None:
            self.workers.stop()
        self.relay.stop()
        self.ticker.stop()
        self.admission.join(5)
        self.link.close(offline_status(self.cfg, "shutdown"))
        self.pool.stop()
        if self.shared is not None:
            self.shared.stop()
        self.sessions.close()  # with Redis, closes the connection pool shared with it
        self.metrics.close()
        log.info("bridge %s stopped", self.cfg.bridge_id)

    # ================================================================= callbacks

    def _on_inbound(self, msg: Inbound) -> None:
        """paho's thread: a message for the intake thread."""
        self.admission.on_inbound(msg)

    def _on_refused(self, key: StreamKey) -> None:
        """paho's thread: the broker refused a message of reply stream ``key``. Stop the
        requests answering on it (their workers then end them, see
        :meth:`bridge.service.finish.Finisher.refused`)."""
        for job in self.jobs.snapshot():
            if job.channel.address.stream == key:
                job.refused = True
                job.token.cancel()  # stops generating: nothing of it can be delivered

    def _active(self) -> int:
        return self.workers.busy if self.workers else 0

    # ================================================================= status

    def _status_changed(self) -> None:
        """Something the status shows changed (a backend's health or load): the ticker
        republishes it within about a second."""
        self.ticker.status_changed()

    def publish_status(self) -> None:
        """Publish the retained online status: on connect, and from the ticker every
        ``status_interval_s`` and soon after a change (at most about once a second)."""
        if self._stopping.is_set() or not self.link.connected:
            return
        try:
            self.link.publish(self.topics.status(self.cfg.bridge_id), self.status.payload(),
                              retain=True, flow_controlled=False)
        except PublishError as exc:
            log.warning("status not published: %s", exc)
