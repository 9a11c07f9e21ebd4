"""The intake thread: every inbound message is admitted, refused or acted on here.

paho's network thread only hands messages over (:meth:`Admission.on_inbound`). This
thread validates a request (:func:`bridge.service.intake.parse_request`), answers bad
input with one ``error``, applies its profile, duplicates and per-client limits, and
queues it, publishing ``start``; a cancel stops a queued or running request. It never
waits for the network thread: everything it publishes bypasses the publish window.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from queue import Queue

from bridge.config.profiles import ProfileRegistry, UnknownProfile
from bridge.config.settings import DeploymentConfig
from bridge.llama.pool import BackendPool
from bridge.mqtt.link import Inbound, MqttLink, PublishError
from bridge.protocol.address import ReplyAddress
from bridge.protocol.errors import SessionStoreError
from bridge.protocol.fit import DoesNotFit, fit, smallest_error
from bridge.protocol.messages import ErrorCode, ErrorMsg
from bridge.service.dedupe import ClientLimits, DedupeCache
from bridge.service.finish import Finisher
from bridge.service.intake import Accepted, Rejected, apply_profile, parse_cancel, parse_request
from bridge.service.job import Job, JobKey, JobState, JobTable, Outcome
from bridge.service.metrics import BridgeMetrics
from bridge.service.reply import ReplyChannel
from bridge.service.scheduler import FairQueue, QueueFull, WorkerPool
from bridge.service.sessions import as_chat
from bridge.service.shared import ClaimState, SharedState
from bridge.service.ticker import Ticker

log = logging.getLogger("bridge")
request_log = logging.getLogger("bridge.requests")

INTAKE_BOUND = 10_000
"""Inbound messages waiting for validation; past it paho's thread waits (back-pressure)."""


class Admission:
    """Owns the intake thread and what it decides.

    Args:
        config: the deployment configuration.
        link: the MQTT link.
        pool: the backends (the model named in ``start``).
        queue: the requests waiting for a worker.
        workers: the worker pool once started (the queue position in ``start``).
        limits: per-client in-flight and rate limits.
        dedupe: the duplicate cache.
        profiles: the profiles in force.
        metrics: counts accepted and rejected requests.
        ticker: told that the status changed.
        jobs: the requests not finished yet.
        finisher: ends requests answered here.
        run: what a worker calls to run a job.
        stopping: set when the bridge stops.
        shared: the store shared with other bridges (``sessions_url``), if any.
    """

    def __init__(self, config: DeploymentConfig, link: MqttLink, pool: BackendPool,
                 queue: FairQueue[JobKey], workers: Callable[[], WorkerPool | None],
                 limits: ClientLimits, dedupe: DedupeCache, profiles: ProfileRegistry,
                 metrics: BridgeMetrics, ticker: Ticker, jobs: JobTable, finisher: Finisher,
                 run: Callable[[Job], None], stopping: threading.Event,
                 shared: SharedState | None = None) -> None:
        self._cfg = config
        self._topics = config.topics
        self._link = link
        self._pool = pool
        self._queue = queue
        self._workers = workers
        self._limits = limits
        self._dedupe = dedupe
        self._profiles = profiles
        self._metrics = metrics
        self._ticker = ticker
        self._jobs = jobs
        self._finisher = finisher
        self._run = run
        self._stopping = stopping
        self._shared = shared
        self._inbox: Queue[Inbound | None] = Queue(INTAKE_BOUND)
        self._thread = threading.Thread(target=self._loop, name="bridge-intake", daemon=True)

    # ------------------------------------------------------------------ the thread

    def on_inbound(self, msg: Inbound) -> None:
        """paho's thread: only hand over. The intake thread never waits on paho, so this
        blocking put cannot deadlock, and it slows the broker down when we are flooded."""
        self._inbox.put(msg)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Let the thread end once it has taken what is already handed over."""
        self._inbox.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            msg = self._inbox.get()
            if msg is None or self._stopping.is_set():
                return
            try:
                if (client := self._topics.client_of(msg.topic, "request")) is not None:
                    self._accept(msg, client)
                elif (client := self._topics.client_of(msg.topic, "cancel")) is not None:
                    self._cancel(msg, client)
                elif msg.topic.startswith(f"{self._cfg.prefix}/status/"):
                    # amqtt hands a new session retained messages of others' filters
                    log.debug("ignored retained status on %r", msg.topic)
                else:
                    log.warning("ignored message on %r: the client level must match "
                                "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", msg.topic[:200])
            except PublishError as exc:
                log.warning("could not answer message on %r: %s", msg.topic[:200], exc)
            except Exception:  # never let one message kill the intake
                log.exception("internal error handling message on %r", msg.topic[:200])

    # ------------------------------------------------------------------ requests

    def _accept(self, msg: Inbound, client: str) -> None:
        result = parse_request(msg, client, self._cfg, self._link.max_payload_bytes)
        if isinstance(result, Rejected):
            self._reject(result.reply, result.code, result.message, client)
            return
        acc = as_chat(result)  # with a session, 'prompt' is one user message
        if acc.request.profile is not None:
            try:  # applied now: a SIGHUP reload does not change a queued request
                acc = apply_profile(acc, self._profiles.get(acc.request.profile),
                                    self._cfg.max_tokens_cap)
            except UnknownProfile as exc:
                self._reject(acc.reply, ErrorCode.bad_request, str(exc), client)
                return
        # One conversation answers in order: its requests run one at a time.
        group = (client, acc.request.session) if acc.request.session is not None else None
        key = acc.key
        seen = self._dedupe.check_and_add(key)
        if seen is not None:
            self._duplicate(acc, seen.finished, seen.record)
            return
        claimed = False
        if self._shared is not None:
            verdict = self._claim(acc, self._shared)
            if verdict is None:
                return
            claimed = verdict
        admitted, why, retry_ms = self._limits.admit(client)
        if not admitted:
            self._dedupe.forget(key)
            if claimed and self._shared is not None:
                self._shared.release(client, acc.request_id)
            self._reject(acc.reply, ErrorCode.rate_limited, why, client, retryable=True,
                         retry_after_ms=retry_ms)
            return
        channel = ReplyChannel(self._link, acc.reply, chunk_bytes=acc.chunk_bytes,
                               flush_s=self._cfg.flush_ms / 1000.0,
                               record=self._cfg.dedupe_ttl_s > 0)
        job = Job(acc, channel, deadline=acc.received_at + self._cfg.max_generation_s,
                  claimed=claimed)
        self._jobs.add(job)
        workers = self._workers()
        try:
            with channel.lock:  # `start` must precede anything the worker publishes
                ahead = self._queue.put(client, key, lambda: self._run(job), group=group)
                free = (workers.size - workers.busy) if workers else 0
                position = 0 if ahead < free else ahead - free + 1
                channel.start_locked(self._pool.model_name, position)
        except QueueFull:
            self._finisher.forget(job)
            self._reject(acc.reply, ErrorCode.busy,
                         f"the bridge's queue is full ({self._cfg.queue_size} waiting): "
                         "retry later", client, retryable=True, retry_after_ms=2000)
            return
        self._metrics.request_accepted()
        self._ticker.status_changed()

    def _claim(self, acc: Accepted, shared: SharedState) -> bool | None:
        """Claim the request in the store shared with the other bridges.

        Returns:
            True if this bridge holds the claim; False if it runs the request unclaimed
            (Redis is away and the request needs no session: duplicates are then caught
            by this bridge only); None if it is answered here: a duplicate of a request
            another bridge runs or has answered, or a session request while Redis is away.
        """
        try:
            claim = shared.claim(acc.client, acc.request_id)
        except SessionStoreError as exc:
            if acc.request.session is None:
                return False
            self._dedupe.forget(acc.key)
            log.warning("request %s/%s: %s", acc.client, acc.request_id, exc.message)
            self._reject(acc.reply, exc.code, exc.public_message, acc.client, retryable=True,
                         retry_after_ms=max(1000, shared.lease_ms))
            return None
        if claim.state is ClaimState.mine:
            return True
        self._dedupe.forget(acc.key)  # known in the shared store: ask it again next time
        if claim.state is ClaimState.running:
            log.info("duplicate of request %s/%s ignored: bridge %s runs it, its answer is "
                     "on its way", acc.client, acc.request_id, claim.holder)
        else:
            self._duplicate(acc, True, claim.record)
        return None

    def _reject(self, reply: ReplyAddress, code: ErrorCode, message: str, client: str, *,
                retryable: bool = False, retry_after_ms: int | None = None) -> None:
        self._metrics.request_rejected(code.value)
        self._ticker.status_changed()
        request_log.info("request id=%s client=%s outcome=error code=%s message=%r",
                         reply.request_id, client, code.value, message)
        error = ErrorMsg(id=reply.request_id, seq=0, code=code, message=message,
                         retryable=retryable, retry_after_ms=retry_after_ms)
        try:
            payload = fit(error, reply.max_payload)
        except DoesNotFit:  # a max_packet too small for any error: the smallest there is
            payload = smallest_error(reply.request_id, 0, code, retryable=retryable)
        self._link.publish(reply.topic, payload, correlation_data=reply.correlation_data,
                           flow_controlled=False)

    def _duplicate(self, acc: Accepted, finished: bool, record: list[bytes] | None) -> None:
        if not finished:
            log.info("duplicate of running request %s/%s ignored: its answer is on its way",
                     acc.client, acc.request_id)
        elif record and acc.reply.max_payload is not None \
                and max(map(len, record)) > acc.reply.max_payload:
            # The kept messages were cut for a larger max_packet: replaying them would
            # overflow this device's buffer.
            log.info("duplicate of finished request %s/%s with a smaller max_packet: its kept "
                     "answer does not fit, not replayed", acc.client, acc.request_id)
            self._reject(acc.reply, ErrorCode.bad_request,
                         "this id was answered in messages larger than this max_packet "
                         "allows: use a new id", acc.client)
        elif record:
            log.info("duplicate of finished request %s/%s: replaying %d messages",
                     acc.client, acc.request_id, len(record))
            for payload in record:
                self._link.publish(acc.reply.topic, payload,
                                   correlation_data=acc.reply.correlation_data,
                                   flow_controlled=False)
        else:
            self._reject(acc.reply, ErrorCode.bad_request,
                         "this id was already answered and the answer is no longer kept: "
                         "use a new id", acc.client)

    # ------------------------------------------------------------------ cancels

    def _cancel(self, msg: Inbound, client: str) -> None:
        request_id = parse_cancel(msg.payload)
        if request_id is None:
            log.warning("cancel from %s ignored: payload must be {\"id\": ...} or a bare id",
                        client)
            return
        with self._jobs.lock:
            job = self._jobs.get((client, request_id))
            if job is None:
                log.info("cancel for %s/%s: no such request running", client, request_id)
                return
            job.cancelled = True
            queued = job.state is JobState.queued and self._queue.remove(client, job.key)
        if queued:
            job.outcome = Outcome.cancelled
            # The intake thread must never wait for the publish window.
            job.channel.done("cancelled", None, job.timings(None), flow_controlled=False)
            self._finisher.finish(job, wait=False)
        else:
            job.token.cancel()  # closes the HTTP connection: llama-server frees the slot
