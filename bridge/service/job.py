"""One accepted request and its live state, shared by the service's threads."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bridge.llama.client import CancelToken
from bridge.protocol.messages import Timings, Usage
from bridge.service.intake import Accepted
from bridge.service.reply import ReplyChannel


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
        outcome: for the request log line (``done``, ``cancelled``, ``error:<code>`` …).
        llama_prompt_ms: llama-server's own prompt time (its ``timings.prompt_ms``), for
            the log line: how much of ``ttft_ms`` the model itself took.
    """

    acc: Accepted
    channel: ReplyChannel
    deadline: float
    state: str = "queued"
    started_at: float | None = None
    token: CancelToken = field(default_factory=CancelToken)
    cancelled: bool = False
    timed_out: bool = False
    shutting_down: bool = False
    refused: bool = False
    backend: str | None = None
    usage: Usage = field(default_factory=Usage)
    outcome: str = "?"
    llama_prompt_ms: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.acc.client, self.acc.request_id)

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
                       total_ms=round((now - t0) * 1000, 2), tokens_per_s=tps)
