"""The bridge: the path of one request, top to bottom (its contract: docs/protocol.md).

1. paho's network thread receives a message and hands it to the intake queue
   (:meth:`Bridge._on_inbound`) — it never publishes or blocks on the network.
2. The intake thread validates it (:func:`bridge.service.intake.parse_request`), answers
   bad input with one ``error``, applies duplicates and per-client limits, and
   queues the request, publishing ``start`` (:meth:`Bridge._accept`).
3. A worker runs it against the best backend and streams ``chunk``s, ending with
   ``done``/``reply``/``error`` (:meth:`Bridge._run`, :meth:`_stream`, :meth:`_answer_once`).
   Once llama-server has answered with its headers, the stream's tokens are read by
   the relay thread, which serves every stream (:mod:`bridge.llama.relay`).
4. The ticker thread flushes coalesced text when ``flush_ms`` is up, sends
   ``progress`` heartbeats and enforces ``max_generation_s`` (:mod:`bridge.service.ticker`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from bridge.config.profiles import ProfileRegistry, UnknownProfile, apply_profile
from bridge.config.settings import DeploymentConfig
from bridge.llama.client import Delta, ReasoningDelta, TextDelta
from bridge.llama.pool import BackendPool
from bridge.llama.relay import Relay
from bridge.mqtt.link import Inbound, MqttLink, PublishError, StreamRefused
from bridge.mqtt.refusals import StreamKey
from bridge.protocol.errors import (
    BackendError,
    BackendUnavailable,
    BridgeError,
    RequestRejected,
    StreamCancelled,
)
from bridge.protocol.messages import ErrorCode, ErrorMsg, Usage, encode
from bridge.protocol.packet import payload_room
from bridge.service.dedupe import ClientLimits, DedupeCache
from bridge.service.intake import Accepted, Rejected, parse_cancel, parse_request
from bridge.service.job import Job
from bridge.service.metrics import BridgeMetrics, LiveState
from bridge.service.reply import ReplyChannel
from bridge.service.scheduler import FairQueue, QueueFull, WorkerPool
from bridge.service.sessions import Sessions, as_chat
from bridge.service.ticker import Ticker
from bridge.version import __version__

log = logging.getLogger("bridge")
request_log = logging.getLogger("bridge.requests")

_INTAKE_BOUND = 10_000  # inbound messages waiting for validation
_SHUTDOWN_MESSAGE = "the bridge is shutting down; send the request again"
_DEFAULT_HTTP_POOL = 64  # kept-alive connections per backend (urllib3 opens more on demand)
# How long a finished request waits for the broker to acknowledge its terminal message,
# so that the request log says what was delivered (normally well under a millisecond).
_CONFIRM_S = 5.0
_REFUSED_MESSAGE = ("the broker closed the bridge's connection on a reply message of this "
                    "request and would not take it; the answer was stopped")


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
        self.queue: FairQueue[tuple[str, str]] = FairQueue(config.queue_size)
        self.profiles = ProfileRegistry(config.profiles)  # swapped on SIGHUP (bridge.cli)
        self.sessions = Sessions.from_config(config)  # the file opens on first use
        self.workers: WorkerPool | None = None
        self.relay = Relay()  # reads every running stream's tokens, in one thread
        self.jobs: dict[tuple[str, str], Job] = {}
        self.stats = {"accepted": 0, "rejected": 0, "done": 0, "errors": 0, "cancelled": 0}
        self._jobs_lock = threading.Lock()
        self._intake: queue.Queue[Inbound | None] = queue.Queue(_INTAKE_BOUND)
        self._stopping = threading.Event()
        self._started = time.time()
        self._intake_thread = threading.Thread(target=self._intake_loop, name="bridge-intake",
                                               daemon=True)
        self.ticker = Ticker(self._live_jobs, config.heartbeat_s, self.publish_status,
                             config.status_interval_s)
        self.metrics = BridgeMetrics(config.bridge_id, __version__, LiveState(
            queued=lambda: len(self.queue),
            active=lambda: self.workers.busy if self.workers else 0,
            backends=lambda: self.pool.backends,
            published=lambda: (self.link.published, self.link.published_bytes),
            accepted=lambda: self.stats["accepted"],
        ))
        self.metrics_port: int | None = None  # bound port of the metrics endpoint, if any
        self.link = MqttLink(
            config, self._on_inbound,
            will_payload=self._status_payload("offline", reason="connection lost"),
            subscriptions=[self.topics.request_filter(config.shared_group),
                           self.topics.cancel_filter()],
            on_connected=self.publish_status,
            on_refused=self._on_refused,
        )

    # ================================================================= lifecycle

    def start(self) -> None:
        """Probe backends, connect to the broker, start intake, workers and ticker."""
        if self.cfg.metrics_port is not None:  # first: a taken port fails before anything runs
            self.metrics_port = self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
        self.pool.start()
        size = self.cfg.max_concurrent or self.pool.total_slots
        self.relay.start()
        self.workers = WorkerPool(self.queue, size)
        self.workers.start()
        self._intake_thread.start()
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
        # With the broker away and the window full, waiting would never end (B8).
        self.link.stop_waiting()
        self._intake.put(None)
        for key in self.queue.drain():
            job = self.jobs.get(key)
            if job is not None:
                self._end_unrun(job, ErrorCode.backend_unavailable, _SHUTDOWN_MESSAGE, True)
        with self._jobs_lock:
            running = [j for j in self.jobs.values() if j.state == "running"]
        for job in running:
            job.shutting_down = True
            job.token.cancel()
        if self.workers is not None:
            self.workers.stop()
        self.relay.stop()
        self.ticker.stop()
        self._intake_thread.join(5)
        self.link.close(self._status_payload("offline", reason="shutdown"))
        self.pool.stop()
        self.sessions.close()
        self.metrics.close()
        log.info("bridge %s stopped", self.cfg.bridge_id)

    # ================================================================= 1. receive

    def _on_inbound(self, msg: Inbound) -> None:
        # paho's thread: only hand over. The intake thread never waits on paho, so this
        # blocking put cannot deadlock, and it slows the broker down when we are flooded.
        self._intake.put(msg)

    def _intake_loop(self) -> None:
        while True:
            msg = self._intake.get()
            if msg is None or self._stopping.is_set():
                return
            try:
                if (client := self.topics.client_of(msg.topic, "request")) is not None:
                    self._accept(msg, client)
                elif (client := self.topics.client_of(msg.topic, "cancel")) is not None:
                    self._cancel(msg, client)
                elif msg.topic.startswith(f"{self.cfg.prefix}/status/"):
                    # amqtt hands a new session retained messages of others' filters
                    log.debug("ignored retained status on %r", msg.topic)
                else:
                    log.warning("ignored message on %r: the client level must match "
                                "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", msg.topic[:200])
            except PublishError as exc:
                log.warning("could not answer message on %r: %s", msg.topic[:200], exc)
            except Exception:  # never let one message kill the intake
                log.exception("internal error handling message on %r", msg.topic[:200])

    # ================================================================= 2. accept

    def _accept(self, msg: Inbound, client: str) -> None:
        result = parse_request(msg, client, self.cfg, self.link.max_payload_bytes)
        if isinstance(result, Rejected):
            self._reject(result.reply_topic, result.request_id, result.correlation_data,
                         result.code, result.message, client)
            return
        acc = as_chat(result)  # with a session, 'prompt' is one user message
        if acc.request.profile is not None:
            try:  # applied now: a SIGHUP reload does not change a queued request
                acc = apply_profile(acc, self.profiles.get(acc.request.profile),
                                    self.cfg.max_tokens_cap)
            except UnknownProfile as exc:
                self._reject(acc.reply_topic, acc.request_id, acc.correlation_data,
                             ErrorCode.bad_request, str(exc), client)
                return
        # One conversation answers in order: its requests run one at a time.
        group = (client, acc.request.session) if acc.request.session is not None else None
        key = (client, acc.request_id)
        seen = self.dedupe.check_and_add(key)
        if seen is not None:
            self._duplicate(acc, seen.finished, seen.record)
            return
        admitted, why, retry_ms = self.limits.admit(client)
        if not admitted:
            self.dedupe.forget(key)
            self._reject(acc.reply_topic, acc.request_id, acc.correlation_data,
                         ErrorCode.rate_limited, why, client, retryable=True,
                         retry_after_ms=retry_ms)
            return
        channel = ReplyChannel(self.link, acc.reply_topic, acc.request_id,
                               correlation_data=acc.correlation_data, chunk_bytes=acc.chunk_bytes,
                               flush_s=self.cfg.flush_ms / 1000.0,
                               record=self.cfg.dedupe_ttl_s > 0)
        job = Job(acc, channel, deadline=acc.received_at + self.cfg.max_generation_s)
        with self._jobs_lock:
            self.jobs[key] = job
        workers = self.workers
        try:
            with channel.lock:  # `start` must precede anything the worker publishes
                ahead = self.queue.put(client, key, lambda: self._run(job), group=group)
                free = (workers.size - workers.busy) if workers else 0
                position = 0 if ahead < free else ahead - free + 1
                channel.start_locked(self.pool.model_name, position)
        except QueueFull:
            self._forget(job)
            self._reject(acc.reply_topic, acc.request_id, acc.correlation_data, ErrorCode.busy,
                         f"the bridge's queue is full ({self.cfg.queue_size} waiting): retry later",
                         client, retryable=True, retry_after_ms=2000)
            return
        self.stats["accepted"] += 1
        self.ticker.status_changed()

    def _reject(self, topic: str, request_id: str, correlation: bytes | None, code: ErrorCode,
                message: str, client: str, *, retryable: bool = False,
                retry_after_ms: int | None = None) -> None:
        self.stats["rejected"] += 1
        self.metrics.request_rejected(code.value)
        self.ticker.status_changed()
        request_log.info("request id=%s client=%s outcome=error code=%s message=%r",
                         request_id, client, code.value, message)
        payload = encode(ErrorMsg(id=request_id, seq=0, code=code, message=message,
                                  retryable=retryable, retry_after_ms=retry_after_ms))
        self.link.publish(topic, payload, correlation_data=correlation, flow_controlled=False)

    def _duplicate(self, acc: Accepted, finished: bool, record: list[bytes] | None) -> None:
        if not finished:
            log.info("duplicate of running request %s/%s ignored: its answer is on its way",
                     acc.client, acc.request_id)
        elif record:
            log.info("duplicate of finished request %s/%s: replaying %d messages",
                     acc.client, acc.request_id, len(record))
            for payload in record:
                self.link.publish(acc.reply_topic, payload,
                                  correlation_data=acc.correlation_data, flow_controlled=False)
        else:
            self._reject(acc.reply_topic, acc.request_id, acc.correlation_data,
                         ErrorCode.bad_request,
                         "this id was already answered and the answer is no longer kept: "
                         "use a new id", acc.client)

    def _cancel(self, msg: Inbound, client: str) -> None:
        request_id = parse_cancel(msg.payload)
        if request_id is None:
            log.warning("cancel from %s ignored: payload must be {\"id\": ...} or a bare id",
                        client)
            return
        with self._jobs_lock:
            job = self.jobs.get((client, request_id))
            if job is None:
                log.info("cancel for %s/%s: no such request running", client, request_id)
                return
            job.cancelled = True
            queued = job.state == "queued" and self.queue.remove(client, job.key)
        if queued:
            job.outcome = "cancelled"
            # The intake thread must never wait for the publish window (B9).
            job.channel.done("cancelled", None, job.timings(None), flow_controlled=False)
            self._finish(job, wait=False)
        else:
            job.token.cancel()  # closes the HTTP connection: llama-server frees the slot

    # ================================================================= 3. run

    def _run(self, job: Job) -> None:
        with self._jobs_lock:
            if job.state != "queued":
                return  # cancelled while queued: already answered
            job.state = "running"
            job.started_at = time.monotonic()
            # Taken off the queue just before stop() drained it, after stop() listed the
            # running jobs: neither would answer it. _stopping is set before that list is
            # made, so under this lock one of the two always sees the job.
            shutting_down = self._stopping.is_set()
        try:
            if shutting_down:
                self._shut_down(job)
                return
            if job.refused:  # its `start` was refused while it was queued
                self._refused(job)
                return
            if job.cancelled:  # cancel raced with the worker taking the job
                job.outcome = "cancelled"
                job.channel.done("cancelled", None, job.timings(None))
                return
            if job.acc.expires_at is not None and job.started_at > job.acc.expires_at:
                job.outcome = "expired"
                job.channel.error(ErrorCode.expired, "the request expired while queued "
                                  "(MQTT Message Expiry Interval); it was not run")
            elif job.acc.request.clear and self._clear_session(job):
                pass  # a clear without messages: answered
            elif job.acc.request.wants_single_reply:
                self._with_backend(job, self._answer_once)
            else:
                self._with_backend(job, self._stream)
        except StreamCancelled:
            self._cancelled(job)
        except StreamRefused:
            self._refused(job)
        except BridgeError as exc:
            job.outcome = f"error:{exc.code.value}"
            if isinstance(exc, BackendError):  # the device's copy has no backend address
                log.warning("request %s: %s", job.acc.request_id, exc.message)
            job.channel.fail(exc)
        except PublishError as exc:
            job.outcome = "publish_failed"
            log.warning("request %s: stopped publishing: %s", job.acc.request_id, exc)
        except Exception as exc:
            job.outcome = "error:internal"
            log.exception("request %s failed", job.acc.request_id)
            job.channel.error(ErrorCode.internal, f"internal error: {type(exc).__name__}")
        finally:
            self._finish(job)

    def _with_backend(self, job: Job, serve: Any) -> None:
        """Run ``serve(job, backend)``, failing over to another backend before the first byte."""
        tried: set[str] = set()
        while True:
            backend = self.pool.acquire(exclude=tried, model=job.acc.request.model)
            job.backend = backend.url
            try:
                serve(job, backend)
                return
            except BackendUnavailable as exc:
                self.pool.mark_failed(backend, exc)
                tried.add(backend.url)
                if job.channel.first_text_at is not None or len(tried) >= len(self.pool.backends):
                    raise
                log.info("request %s: %s unavailable before the first byte; trying another "
                         "backend", job.acc.request_id, backend.url)
            finally:
                self.pool.release(backend)

    def _llama_params(self, job: Job) -> dict[str, Any]:
        req = job.acc.request
        params = req.sampling()
        params["max_tokens"] = job.acc.max_tokens
        if req.think is False:
            params["chat_template_kwargs"] = {"enable_thinking": False}
        if req.model is not None:
            params["model"] = req.model
        return params

    def _prepare(self, job: Job, backend: Any) -> tuple[list[dict[str, Any]] | str,
                                                        dict[str, Any]]:
        """What to send to ``backend``: the prompt or the chat messages, and the parameters.

        A session request's messages are its system message(s), the stored history
        that fits ``backend``'s context, and its new message(s).
        """
        req = job.acc.request
        params = self._llama_params(job)
        if req.prompt is not None:
            return req.prompt, params
        messages = [m.model_dump(exclude_none=True) for m in req.messages or []]
        if req.session is not None:
            messages = self.sessions.conversation(
                job.acc.client, req.session, messages, llama=backend.client,
                max_tokens=job.acc.max_tokens, tools=req.tools)
        return messages, params

    def _remember(self, job: Job, answer: dict[str, Any]) -> None:
        """After a successful answer: store the session's new turn (before the terminal
        message, so a device that got ``done`` can rely on the turn being kept)."""
        req = job.acc.request
        if req.session is None:
            return
        messages = [m.model_dump(exclude_none=True) for m in req.messages or []]
        try:
            self.sessions.remember(job.acc.client, req.session, messages, answer)
        except BridgeError as exc:  # the answer is still worth sending
            log.error("request %s: session %s/%s not updated: %s", job.acc.request_id,
                      job.acc.client, req.session, exc)

    def _clear_session(self, job: Job) -> bool:
        """``clear``: forget the session; True if the request is answered (no messages)."""
        req = job.acc.request
        assert req.session is not None  # the wire model requires it with 'clear'
        existed = self.sessions.clear(job.acc.client, req.session)
        log.info("session %s/%s cleared (%s)", job.acc.client, req.session,
                 "it existed" if existed else "it was empty")
        if req.messages is not None:
            return False  # then answered as the first turn of the new conversation
        job.outcome = "done"
        job.channel.done("cleared", None, job.timings(None))
        return True

    def _stream(self, job: Job, backend: Any) -> None:
        req, channel = job.acc.request, job.channel
        inputs, params = self._prepare(job, backend)
        if isinstance(inputs, str):
            stream = backend.client.complete_stream(inputs, cancel_token=job.token, **params)
        else:
            stream = backend.client.generate_stream(inputs, cancel_token=job.token, **params)
        answer: list[str] | None = [] if req.session is not None else None

        def on_delta(delta: Delta) -> None:  # in the relay's thread (bridge.llama.relay)
            if isinstance(delta, TextDelta):
                if answer is not None:
                    answer.append(delta.text)
                buffered = channel.text(delta.text)
            elif isinstance(delta, ReasoningDelta) and req.reasoning:
                buffered = channel.reasoning(delta.text)
            else:
                return
            if buffered:  # text waits for flush_ms from now: the ticker must wake for it
                self.ticker.wake_at(channel.due())

        with stream:
            try:
                end = stream.pump(on_delta, self.relay)
            finally:  # a cancelled stream never gets llama-server's usage: count its tokens
                job.usage = stream.usage_so_far()
        job.usage = end.usage or job.usage
        job.llama_prompt_ms = _prompt_ms(end.timings)
        job.outcome = "done"
        finish = end.finish_reason or "stop"
        if answer is not None:
            self._remember(job, {"role": "assistant", "content": "".join(answer)})
        channel.done(finish, job.usage, job.timings(job.usage))

    def _answer_once(self, job: Job, backend: Any) -> None:
        req, channel = job.acc.request, job.channel
        inputs, params = self._prepare(job, backend)
        if isinstance(inputs, str):
            gen = backend.client.complete(inputs, cancel_token=job.token, **params)
        else:
            gen = backend.client.generate(inputs, tools=req.tools, tool_choice=req.tool_choice,
                                          cancel_token=job.token, **params)
        job.usage = gen.usage or Usage()
        job.llama_prompt_ms = _prompt_ms(gen.timings)
        fields: dict[str, Any] = {"content": gen.content, "tool_calls": gen.tool_calls,
                                  "finish_reason": gen.finish_reason or "stop",
                                  "usage": job.usage, "timings": job.timings(job.usage)}
        room = payload_room(self.link.max_payload_bytes, channel.topic)
        if gen.content and channel.reply_size(**fields) > room:
            # Too big for one message: the text goes as chunks, then a reply without content.
            channel.chunks(gen.content)
            fields["content"] = None
        if channel.reply_size(**fields) > room:  # tool_calls alone too big: say so, not drop
            raise RequestRejected(
                ErrorCode.too_large,
                f"the answer's tool_calls do not fit in one message of {room} bytes "
                "(max_message_bytes or the broker's Maximum Packet Size, less the topic); "
                "ask for shorter tool arguments or raise max_message_bytes")
        job.outcome = "reply"
        answer: dict[str, Any] = {"role": "assistant", "content": gen.content or ""}
        if gen.tool_calls:
            answer["tool_calls"] = gen.tool_calls
        self._remember(job, answer)
        channel.reply(**fields)

    def _cancelled(self, job: Job) -> None:
        """The HTTP call was cancelled: say why, as the terminal message."""
        channel = job.channel
        if job.refused:
            self._refused(job)
        elif job.timed_out:
            job.outcome = "error:timeout"
            channel.error(ErrorCode.timeout,
                          f"the answer took longer than max_generation_s "
                          f"({self.cfg.max_generation_s:g} s); ask for fewer max_tokens")
        elif job.shutting_down:
            self._shut_down(job)
        else:
            job.outcome = "cancelled"
            channel.done("cancelled", job.usage, job.timings(job.usage))

    def _on_refused(self, key: StreamKey) -> None:
        """paho's thread: the broker refused a message of reply stream ``key``. Stop the
        requests answering on it (their workers then end them, see :meth:`_refused`)."""
        with self._jobs_lock:
            hit = [j for j in self.jobs.values()
                   if (j.channel.topic, j.channel.correlation_data) == key]
        for job in hit:
            job.refused = True
            job.token.cancel()  # stops generating: nothing of it can be delivered

    def _refused(self, job: Job) -> None:
        """End a request whose reply stream the broker refused with one ``error``.

        A Response Topic may itself be what the broker refuses, so the error goes to the
        request's default reply topic then (the device's own namespace); otherwise it
        goes where the refused messages went.
        """
        job.outcome = "publish_failed"
        channel = job.channel
        self.link.forget_refused((channel.topic, channel.correlation_data))
        default = self.topics.reply(job.acc.client, job.acc.request_id)
        log.error("request %s of %s: the broker refused its reply stream on %r; ending it "
                  "with an error on %r", job.acc.request_id, job.acc.client,
                  channel.topic[:200], default)
        try:
            channel.refused(default, _REFUSED_MESSAGE)
        except PublishError as exc:
            log.warning("could not tell %s that its answer was stopped: %s",
                        job.acc.request_id, exc)

    def _shut_down(self, job: Job) -> None:
        """The bridge is stopping under a job it took: tell the device to send it again."""
        job.outcome = "error:shutdown"
        job.channel.error(ErrorCode.backend_unavailable, _SHUTDOWN_MESSAGE, retryable=True)

    # ================================================================= bookkeeping

    def _end_unrun(self, job: Job, code: ErrorCode, message: str, retryable: bool) -> None:
        job.outcome = f"error:{code.value}"
        try:
            job.channel.error(code, message, retryable=retryable)
        except PublishError as exc:
            log.warning("could not answer %s: %s", job.acc.request_id, exc)
        self._finish(job, wait=False)

    def _forget(self, job: Job) -> None:
        with self._jobs_lock:
            self.jobs.pop(job.key, None)
        self.limits.finished(job.acc.client)
        self.dedupe.forget(job.key)

    def _confirm(self, job: Job, wait: bool) -> str:
        """What became of the terminal message, for the request log.

        Args:
            job: the finished request.
            wait: wait (at most ``_CONFIRM_S``) for the broker's acknowledgement; never
                from the intake thread, which must not depend on the network thread.
        Returns:
            ``acked``, ``refused`` (the request then ends as :meth:`_refused` says),
            ``pending`` (no answer from the broker yet) or ``none`` (nothing was sent).
        """
        info = job.channel.terminal_info
        if info is None:
            return "none"
        ok = self.link.delivered(info, _CONFIRM_S if wait else 0.0)
        if ok is False and job.outcome != "publish_failed":
            self._refused(job)  # the terminal message itself was refused
        return {True: "acked", False: "refused", None: "pending"}[ok]

    def _finish(self, job: Job, *, wait: bool = True) -> None:
        with self._jobs_lock:
            if job.state == "finished":
                return
            job.state = "finished"
            self.jobs.pop(job.key, None)
        self.limits.finished(job.acc.client)
        terminal = self._confirm(job, wait)
        kind = job.outcome.split(":")[0]
        if kind == "publish_failed":
            self.dedupe.forget(job.key)  # nothing complete arrived: a resend must run
        elif kind == "error" and job.channel.first_text_at is None:
            # Nothing was generated: a retry with the same id (what `retryable` invites)
            # must be served, not answered with this error again.
            self.dedupe.forget(job.key)
        else:
            self.dedupe.finish(job.key, job.channel.record)
        self.stats["done" if kind in ("done", "reply") else
                   "cancelled" if kind == "cancelled" else "errors"] += 1
        t = job.timings(job.usage)
        self.metrics.request_finished(job.outcome, job.backend, t, job.usage)
        self.ticker.status_changed()
        request_log.info(
            "request id=%s client=%s outcome=%s backend=%s prompt_tokens=%d "
            "completion_tokens=%d messages=%d queue_ms=%.0f ttft_ms=%s total_ms=%.0f "
            "tokens_per_s=%s llama_prompt_ms=%s terminal=%s",
            job.acc.request_id, job.acc.client, job.outcome, job.backend,
            job.usage.prompt_tokens, job.usage.completion_tokens, job.channel.seq.next,
            t.queue_ms, "-" if t.ttft_ms is None else f"{t.ttft_ms:.0f}", t.total_ms,
            "-" if t.tokens_per_s is None else f"{t.tokens_per_s:.1f}",
            "-" if job.llama_prompt_ms is None else f"{job.llama_prompt_ms:.1f}", terminal)

    def _live_jobs(self) -> list[Job]:
        with self._jobs_lock:
            return list(self.jobs.values())

    # ================================================================= status

    def _status_payload(self, state: str, **extra: Any) -> bytes:
        body: dict[str, Any] = {"state": state, "bridge_id": self.cfg.bridge_id,
                                "version": __version__, "prefix": self.cfg.prefix, **extra}
        if state == "online":
            body.update(
                started_at=round(self._started, 3), mqtt="5" if self.link.is_v5 else "3.1.1",
                backends=[b.snapshot() for b in self.pool.backends],
                queued=len(self.queue), active=self.workers.busy if self.workers else 0,
                shared_group=self.cfg.shared_group,
                stats={**self.stats, **self.metrics.snapshot()}, published=self.link.published,
            )
        return json.dumps(body, separators=(",", ":")).encode()

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
            self.link.publish(self.topics.status(self.cfg.bridge_id),
                              self._status_payload("online"), retain=True, flow_controlled=False)
        except PublishError as exc:
            log.warning("status not published: %s", exc)


def _prompt_ms(timings: dict[str, Any] | None) -> float | None:
    """llama-server's ``timings.prompt_ms`` if it sent a number (it is not in the spec)."""
    value = (timings or {}).get("prompt_ms")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
