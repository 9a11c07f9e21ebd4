"""The end of an accepted request, however it ends.

Its terminal message is confirmed with the broker, its client's in-flight slot and its
duplicate-cache entry are settled, it is counted in the metrics and written to the
request log (logger ``bridge.requests``, one line per request). A request whose reply
stream the broker refused ends here too, with one ``error`` (:meth:`Finisher.refused`).
"""

from __future__ import annotations

import logging

from bridge.mqtt.link import MqttLink, PublishError
from bridge.protocol.messages import ErrorCode
from bridge.protocol.topics import Topics
from bridge.service.dedupe import ClientLimits, DedupeCache
from bridge.service.job import Job, JobTable, Outcome
from bridge.service.metrics import BridgeMetrics
from bridge.service.shared import SharedState
from bridge.service.ticker import Ticker

log = logging.getLogger("bridge")
request_log = logging.getLogger("bridge.requests")

SHUTDOWN_MESSAGE = "the bridge is shutting down; send the request again"
"""The ``error`` of a request the bridge took and will not answer because it stops."""
# How long a finished request waits for the broker to acknowledge its terminal message,
# so that the request log says what was delivered (normally well under a millisecond).
_CONFIRM_S = 5.0
_REFUSED_MESSAGE = ("the broker closed the bridge's connection on a reply message of this "
                    "request and would not take it; the answer was stopped")


class Finisher:
    """Ends requests: :meth:`finish` once per accepted request, from any thread.

    Args:
        topics: the topic layout (a refused stream's error goes to the default reply topic).
        link: the MQTT link.
        jobs: the requests not finished yet.
        limits: per-client in-flight limits (a finished request frees its slot).
        dedupe: the duplicate cache (keeps a finished answer for replaying, or forgets it).
        metrics: counts every finished request.
        ticker: told that the status changed.
        shared: the store shared with other bridges, if any (claims settled like
            ``dedupe``'s entries).
    """

    def __init__(self, topics: Topics, link: MqttLink, jobs: JobTable, limits: ClientLimits,
                 dedupe: DedupeCache, metrics: BridgeMetrics, ticker: Ticker,
                 shared: SharedState | None = None) -> None:
        self._topics = topics
        self._link = link
        self._jobs = jobs
        self._limits = limits
        self._dedupe = dedupe
        self._metrics = metrics
        self._ticker = ticker
        self._shared = shared

    def refused(self, job: Job) -> None:
        """End a request whose reply stream the broker refused with one ``error``.

        A Response Topic may itself be what the broker refuses, so the error goes to the
        request's default reply topic then (the device's own namespace); otherwise it
        goes where the refused messages went.
        """
        job.outcome = Outcome.publish_failed
        channel = job.channel
        self._link.forget_refused(channel.address.stream)
        default = self._topics.reply(job.acc.client, job.acc.request_id)
        log.error("request %s of %s: the broker refused its reply stream on %r; ending it "
                  "with an error on %r", job.acc.request_id, job.acc.client,
                  channel.address.topic[:200], default)
        try:
            channel.refused(default, _REFUSED_MESSAGE)
        except PublishError as exc:
            log.warning("could not tell %s that its answer was stopped: %s",
                        job.acc.request_id, exc)

    def end_unrun(self, job: Job, code: ErrorCode, message: str, retryable: bool) -> None:
        """End a request that never ran with an ``error`` (from the intake thread or stop)."""
        job.failed(code)
        try:
            job.channel.error(code, message, retryable=retryable)
        except PublishError as exc:
            log.warning("could not answer %s: %s", job.acc.request_id, exc)
        self.finish(job, wait=False)

    def forget(self, job: Job) -> None:
        """Drop a request that was never accepted after all (its queue was full)."""
        self._jobs.discard(job)
        self._limits.finished(job.acc.client)
        self._dedupe.forget(job.key)
        self._settle_claim(job, None, answered=False)

    def _settle_claim(self, job: Job, record: list[bytes] | None, *,
                      answered: bool = True) -> None:
        """The shared store's side of a finished request: answered (``record``: what was
        published, for resends; None if too large to keep) or given back (a resend must
        run)."""
        if self._shared is None or not job.claimed:
            return
        job.claimed = False
        if answered:
            self._shared.finished(job.acc.client, job.acc.request_id, record)
        else:
            self._shared.release(job.acc.client, job.acc.request_id)

    def _settle(self, job: Job) -> bool:
        """Keep the answer for resends (True), or forget the request so a resend runs."""
        # Nothing complete arrived, or nothing was generated: a resend or a retry with the
        # same id (what `retryable` invites) must be served, not answered with this again.
        if job.outcome is Outcome.publish_failed \
                or (job.ended_in_error and job.channel.first_text_at is None):
            self._dedupe.forget(job.key)
            self._settle_claim(job, None, answered=False)
            return False
        self._dedupe.finish(job.key, job.channel.record)
        self._settle_claim(job, job.channel.record)
        return True

    def confirm(self, job: Job, wait: bool) -> str:
        """What became of the terminal message, for the request log.

        Args:
            job: the finished request.
            wait: wait (at most ``_CONFIRM_S``) for the broker's acknowledgement; never
                from the intake thread, which must not depend on the network thread.
        Returns:
            ``acked``, ``refused`` (the request then ends as :meth:`refused` says),
            ``pending`` (no answer from the broker yet) or ``none`` (nothing was sent).
        """
        info = job.channel.terminal_info
        if info is None:
            return "none"
        ok = self._link.delivered(info, _CONFIRM_S if wait else 0.0)
        if ok is False and job.outcome is not Outcome.publish_failed:
            self.refused(job)  # the terminal message itself was refused
        return {True: "acked", False: "refused", None: "pending"}[ok]

    def finish(self, job: Job, *, wait: bool = True) -> None:
        """Settle, count and log a request that got its terminal message (once; later
        calls do nothing).

        Args:
            job: the request.
            wait: see :meth:`confirm`.
        """
        if not self._jobs.finish(job):
            return
        self._limits.finished(job.acc.client)
        # Settled before the broker acknowledges the terminal message: the device may
        # already have it, and a resend it sends next (to any bridge) must find the
        # request answered, not running.
        claimed = job.claimed
        answered = self._settle(job)
        terminal = self.confirm(job, wait)
        if answered and job.outcome is Outcome.publish_failed:  # the terminal was refused
            self._dedupe.forget(job.key)
            if claimed and self._shared is not None:
                self._shared.forget(job.acc.client, job.acc.request_id)
        t = job.timings(job.usage)
        self._metrics.request_finished(job.label, job.backend, t, job.usage)
        self._ticker.status_changed()
        request_log.info(
            "request id=%s client=%s outcome=%s backend=%s prompt_tokens=%d "
            "completion_tokens=%d messages=%d queue_ms=%.0f ttft_ms=%s total_ms=%.0f "
            "tokens_per_s=%s llama_prompt_ms=%s cache_n=%s prompt_n=%s terminal=%s",
            job.acc.request_id, job.acc.client, job.outcome_text, job.backend,
            job.usage.prompt_tokens, job.usage.completion_tokens, job.channel.seq.next,
            t.queue_ms, "-" if t.ttft_ms is None else f"{t.ttft_ms:.0f}", t.total_ms,
            "-" if t.tokens_per_s is None else f"{t.tokens_per_s:.1f}",
            "-" if job.llama_prompt_ms is None else f"{job.llama_prompt_ms:.1f}",
            "-" if job.cache_n is None else job.cache_n,
            "-" if job.prompt_n is None else job.prompt_n, terminal)
