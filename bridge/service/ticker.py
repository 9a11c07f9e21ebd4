"""The one thread for everything driven by time rather than by a token.

* flushes coalesced text when its ``flush_ms`` is up (workers only flush when a
  new delta arrives, and the next one may be seconds away);
* sends ``progress`` heartbeats after ``heartbeat_s`` of silence: queued
  (``queued_ms``), waiting for the first token (``prompt_progress``), or mid-answer
  with no field (a backend that stalls must not look like a lost request, which
  devices resend after three heartbeats);
* cancels requests that run past ``max_generation_s``;
* publishes the status message: every ``status_interval_s``, and soon after anything
  it shows changes (:meth:`Ticker.status_changed`), at most once per
  :data:`STATUS_MIN_INTERVAL_S` -- a change within that second is published at its
  end, never dropped.

Workers call :meth:`Ticker.wake_at` when they buffer text, so a flush is never
later than its deadline, without polling every stream at ``flush_ms``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bridge.mqtt.link import PublishError
from bridge.service.job import Job, JobState

log = logging.getLogger("bridge.service.ticker")

_MAX_SLEEP_S = 0.25  # heartbeats and deadlines are checked at least this often
STATUS_MIN_INTERVAL_S = 1.0
"""Least time between two status publishes caused by changes: N requests in a second
cost one status message, not N."""


class Ticker:
    """Args:
        jobs: returns a snapshot of the live jobs.
        heartbeat_s: silence after which a ``progress`` message is sent.
        periodic: publishes the status (from this thread): every ``periodic_s``, and after
            :meth:`status_changed`, at most once per ``min_interval_s``.
    """

    def __init__(self, jobs: Callable[[], list[Job]], heartbeat_s: float,
                 periodic: Callable[[], None], periodic_s: float,
                 min_interval_s: float = STATUS_MIN_INTERVAL_S) -> None:
        self._jobs = jobs
        self._heartbeat_s = heartbeat_s
        self._periodic = periodic
        self._periodic_s = periodic_s
        self._min_interval_s = min_interval_s
        self._changed = False  # something the status shows changed since it was built
        self._last_status = float("-inf")  # time.monotonic() of the last publish
        self._cond = threading.Condition()
        self._next_wake = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bridge-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(5)

    def status_changed(self) -> None:
        """Something the status shows changed: publish it within ``min_interval_s``.

        Cheap and safe from any thread; many calls within the interval make one publish.
        """
        if not self._changed:
            self._changed = True
            self.wake_at(max(time.monotonic(), self._last_status + self._min_interval_s))

    def wake_at(self, due: float | None) -> None:
        """Make sure the ticker runs no later than ``due`` (``time.monotonic()``)."""
        if due is not None and due < self._next_wake:
            with self._cond:
                self._next_wake = due
                self._cond.notify()

    def _loop(self) -> None:
        next_periodic = time.monotonic() + self._periodic_s
        while not self._stop.is_set():
            now = time.monotonic()
            with self._cond:
                self._next_wake = now + _MAX_SLEEP_S
            wake = self.tick(now)
            status_due = self._last_status + self._min_interval_s
            if now >= next_periodic or (self._changed and now >= status_due):
                next_periodic = now + self._periodic_s
                self._changed = False  # before building it: a later change makes another
                self._last_status = now
                try:
                    self._periodic()
                except Exception:
                    log.exception("periodic task failed")
            elif self._changed:
                wake = min(wake, status_due)
            with self._cond:
                # A worker may have asked for an earlier wake while we were busy.
                self._next_wake = min(self._next_wake, wake, next_periodic)
                self._cond.wait(max(0.0, self._next_wake - time.monotonic()))

    def tick(self, now: float) -> float:
        """Flush due text, send heartbeats, stop overlong answers.

        Returns:
            when the next flush is due (``time.monotonic()``), at most ``_MAX_SLEEP_S`` away.
        """
        wake = now + _MAX_SLEEP_S
        for job in self._jobs():
            ch = job.channel
            if job.state is JobState.running and now >= job.deadline and not job.timed_out:
                job.timed_out = True
                job.token.cancel()
            if not ch.link.has_room():
                # The broker is not keeping up (or is away): flushing or a heartbeat would
                # block this thread, and with it max_generation_s for every other request.
                continue
            due = ch.due()
            if due is not None:
                if due <= now:
                    ch.poll()
                else:
                    wake = min(wake, due)
            if not ch.finished and now - ch.last_sent >= self._heartbeat_s:
                try:
                    if job.state is JobState.queued:
                        ch.progress(queued_ms=round((now - job.acc.received_at) * 1000))
                    elif job.state is JobState.running and ch.first_text_at is None:
                        ch.progress(prompt_progress={
                            "waiting_ms": round((now - (job.started_at or now)) * 1000)})
                    elif job.state is JobState.running:
                        ch.progress()
                except PublishError as exc:
                    log.debug("heartbeat for %s skipped: %s", job.acc.request_id, exc)
        return wake
