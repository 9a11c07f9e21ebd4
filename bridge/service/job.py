"""One accepted request and its live state, shared by the service's threads."""

from __future__ import annotations

import threading
import time
from collections.abc import ItemsView
from dataclasses import dataclass, field
from enum import StrEnum

from bridge.llama.client import CancelToken
from bridge.protocol.messages import ErrorCode, Timings, Usage
from bridge.service.intake import Accepted
from bridge.service.reply import ReplyChannel

JobKey = tuple[str, str]
"""What names a job: its request's :attr:`~bridge.service.intake.Accepted.key`."""


class JobState(StrEnum):
    """Where a request is: ``queued`` → ``running`` → ``finished``."""

    queued = "queued"
    running = "running"
    finished = "finished"


class Outcome(StrEnum):
    """How a request ended (see :func:`outcome_label`)."""

    unknown = "?"  # not ended yet
    done = "done"
    reply = "reply"
    cancelled = "cancelled"
    expired = "expired"
    publish_failed = "publish_failed"  # the broker refused its reply stream
    error = "error"  # an ``error`` message, whose code is in :attr:`Job.error`
    shutdown = "shutdown"  # a retryable ``error``: the bridge stopped under it


def outcome_label(outcome: Outcome, error: ErrorCode | None = None) -> str:
    """The metrics' ``outcome`` label: ``done``, ``reply``, ``cancelled``, ``expired``,
    ``publish_failed``, ``shutdown`` or the error code (``timeout``, ``backend_error`` ...).

    Args:
        outcome: how the request ended.
        error: the code it ended with, for :attr:`Outcome.error`.
    """
    if outcome is Outcome.error:
        return (error or ErrorCode.internal).value
    return "unknown" if outcome is Outcome.unknown else outcome.value


@dataclass(eq=False)
class Job:
    """One accepted request.

    Attributes:
        acc: the validated request and where to answer it.
        channel: publishes its reply messages.
        deadline: ``time.monotonic()`` when ``max_generation_s`` is up.
        state: ``queued`` → ``running`` → ``finished``.
        token: cancels the HTTP call (streamed or not) from any thread, even before it starts.
        cancelled / timed_out / shutting_down / refused: why the token was used
            (``refused``: the broker would not take a message of its reply stream).
        outcome: how it ended; with :attr:`error`, the code of the ``error`` it ended with.
        llama_prompt_ms: llama-server's own prompt time (its ``timings.prompt_ms``), for
            the log line: how much of ``ttft_ms`` the model itself took.
        cache_n / prompt_n: llama-server's prompt tokens reused from the slot's cache and
            read anew (its ``timings``), for ``done.timings`` and the log line.
    """

    acc: Accepted
    channel: ReplyChannel
    deadline: float
    state: JobState = JobState.queued
    started_at: float | None = None
    token: CancelToken = field(default_factory=CancelToken)
    cancelled: bool = False
    timed_out: bool = False
    shutting_down: bool = False
    refused: bool = False
    backend: str | None = None
    usage: Usage = field(default_factory=Usage)
    outcome: Outcome = Outcome.unknown
    error: ErrorCode | None = None
    llama_prompt_ms: float | None = None
    cache_n: int | None = None
    prompt_n: int | None = None

    @property
    def key(self) -> JobKey:
        return self.acc.key

    def failed(self, code: ErrorCode) -> None:
        """Record that the request ends with an ``error`` of ``code``."""
        self.outcome, self.error = Outcome.error, code

    @property
    def ended_in_error(self) -> bool:
        """Whether its terminal message is an ``error`` the service chose (not a refusal)."""
        return self.outcome in (Outcome.error, Outcome.shutdown)

    @property
    def label(self) -> str:
        """Its metrics label (:func:`outcome_label`)."""
        return outcome_label(self.outcome, self.error)

    @property
    def outcome_text(self) -> str:
        """The outcome as the request log writes it: ``done``, ``error:timeout`` ..."""
        return f"error:{self.label}" if self.ended_in_error else self.outcome.value

    def timings(self, usage: Usage | None) -> Timings:
        """Queue time, time to first token and total time as seen from the bridge, now."""
        now = time.monotonic()
        t0 = self.acc.received_at
        first = self.channel.first_text_at
        tps = None
        if usage and usage.completion_tokens and first is not None and now > first:
            tps = round(usage.completion_tokens / (now - first), 2)
        return Timings(queue_ms=round(((self.started_at or now) - t0) * 1000, 2),
                       ttft_ms=round((first - t0) * 1000, 2) if first is not None else None,
                       total_ms=round((now - t0) * 1000, 2), tokens_per_s=tps,
                       cache_n=self.cache_n, prompt_n=self.prompt_n)


class JobTable:
    """The accepted requests not finished yet, by :data:`JobKey`.

    :attr:`lock` guards membership and every change of a job's :attr:`Job.state`: the
    intake thread (cancel), the workers (run, finish) and the bridge stopping race on
    both. Reads of one entry need no lock.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._jobs: dict[JobKey, Job] = {}

    def add(self, job: Job) -> None:
        with self.lock:
            self._jobs[job.key] = job

    def discard(self, job: Job) -> None:
        with self.lock:
            self._jobs.pop(job.key, None)

    def get(self, key: JobKey) -> Job | None:
        return self._jobs.get(key)

    def finish(self, job: Job) -> bool:
        """Mark ``job`` finished and drop it; False if it already was (finish runs once)."""
        with self.lock:
            if job.state is JobState.finished:
                return False
            job.state = JobState.finished
            self._jobs.pop(job.key, None)
            return True

    def running(self) -> list[Job]:
        """The jobs a worker runs now."""
        with self.lock:
            return [j for j in self._jobs.values() if j.state is JobState.running]

    def snapshot(self) -> list[Job]:
        """The jobs now, in the order they were accepted."""
        with self.lock:
            return list(self._jobs.values())

    def items(self) -> ItemsView[JobKey, Job]:
        return self._jobs.items()

    def __getitem__(self, key: JobKey) -> Job:
        return self._jobs[key]

    def __contains__(self, key: object) -> bool:
        return key in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)
