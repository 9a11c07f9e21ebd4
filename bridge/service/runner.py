"""Running one accepted request: a worker thread calls :meth:`Runner.run` when its turn comes.

The request runs against the best backend (another one if the first fails before the
first byte) and is answered with ``chunk``s ending in ``done`` (:meth:`Runner._stream`),
or with one ``reply`` (:meth:`Runner._answer_once`: tools, ``stream: false``), or with
an ``error``. Once llama-server has answered with its headers, the stream's tokens are
read by the relay thread, which serves every stream (:mod:`bridge.llama.relay`). A
session request is sent with its stored history and adds a turn to it when answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from bridge.config.settings import DeploymentConfig
from bridge.llama.client import Delta, ReasoningDelta, TextDelta
from bridge.llama.pool import Backend, BackendPool
from bridge.llama.relay import Relay
from bridge.mqtt.link import MqttLink, PublishError, StreamRefused
from bridge.protocol.errors import (
    BackendError,
    BackendUnavailable,
    BridgeError,
    RequestRejected,
    StreamCancelled,
)
from bridge.protocol.messages import ErrorCode, Usage
from bridge.protocol.packet import payload_room
from bridge.service.finish import SHUTDOWN_MESSAGE, Finisher
from bridge.service.job import Job, JobState, JobTable, Outcome
from bridge.service.session_store import Message
from bridge.service.sessions import Sessions
from bridge.service.shared import SharedState
from bridge.service.ticker import Ticker

log = logging.getLogger("bridge")

Serve = Callable[[Job, Backend], None]
"""Answers a job with one backend: :meth:`Runner._stream` or :meth:`Runner._answer_once`."""


class Runner:
    """Runs accepted requests, one per worker thread at a time.

    Args:
        config: the deployment configuration (``max_generation_s``).
        link: the MQTT link (the largest message it may publish).
        pool: the backends.
        relay: reads the tokens of every running stream.
        sessions: the stored conversations.
        ticker: woken when buffered text gets a flush deadline.
        jobs: the requests not finished yet.
        stopping: set when the bridge stops.
        finisher: ends every request this runs.
        shared: the store shared with other bridges, if any: a session's turn runs only
            while this bridge holds it (:mod:`bridge.service.shared`).
    """

    def __init__(self, config: DeploymentConfig, link: MqttLink, pool: BackendPool,
                 relay: Relay, sessions: Sessions, ticker: Ticker, jobs: JobTable,
                 stopping: threading.Event, finisher: Finisher,
                 shared: SharedState | None = None) -> None:
        self._cfg = config
        self._link = link
        self._pool = pool
        self._relay = relay
        self._sessions = sessions
        self._ticker = ticker
        self._jobs = jobs
        self._stopping = stopping
        self._finisher = finisher
        self._shared = shared

    def run(self, job: Job) -> None:
        """Run ``job`` to its terminal message (in a worker thread)."""
        with self._jobs.lock:
            if job.state is not JobState.queued:
                return  # cancelled while queued: already answered
            job.state = JobState.running
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
                self._finisher.refused(job)
                return
            if job.cancelled:  # cancel raced with the worker taking the job
                job.outcome = Outcome.cancelled
                job.channel.done("cancelled", None, job.timings(None))
                return
            if job.acc.expires_at is not None and job.started_at > job.acc.expires_at:
                job.outcome = Outcome.expired
                job.channel.error(ErrorCode.expired, "the request expired while queued "
                                  "(MQTT Message Expiry Interval); it was not run")
                return
            self._take_turn(job)
            if job.acc.request.clear and self._clear_session(job):
                pass  # a clear without messages: answered
            elif job.acc.request.wants_single_reply:
                self._with_backend(job, self._answer_once)
            else:
                self._with_backend(job, self._stream)
        except StreamCancelled:
            self._cancelled(job)
        except StreamRefused:
            self._finisher.refused(job)
        except BridgeError as exc:
            job.failed(exc.code)
            if isinstance(exc, BackendError):  # the device's copy has no backend address
                log.warning("request %s: %s", job.acc.request_id, exc.message)
            job.channel.fail(exc)
        except PublishError as exc:
            job.outcome = Outcome.publish_failed
            log.warning("request %s: stopped publishing: %s", job.acc.request_id, exc)
        except Exception as exc:
            job.failed(ErrorCode.internal)
            log.exception("request %s failed", job.acc.request_id)
            job.channel.error(ErrorCode.internal, f"internal error: {type(exc).__name__}")
        finally:
            self._finisher.finish(job)
            if job.has_turn and self._shared is not None and job.acc.request.session:
                job.has_turn = False  # after the terminal message: the next turn may run
                self._shared.give_turn(job.acc.client, job.acc.request.session)

    def _take_turn(self, job: Job) -> None:
        """Wait until this bridge holds the session's turn in the shared store (another
        bridge may run the session's previous turn). Heartbeats go on meanwhile; a cancel,
        ``max_generation_s`` or the bridge stopping end the wait.

        Raises:
            StreamCancelled: the request was stopped while waiting.
            SessionStoreError: Redis cannot be used (a retryable error for the device).
        """
        shared, session = self._shared, job.acc.request.session
        if shared is None or session is None:
            return
        delay, waited = 0.02, False
        while (holder := shared.take_turn(job.acc.client, session,
                                          job.acc.request_id)) is not None:
            if not waited:
                log.info("request %s: session %s/%s has a turn running (%s); waiting for "
                         "its end", job.acc.request_id, job.acc.client, session, holder)
                waited = True
            if job.token.wait(delay):
                raise StreamCancelled("stopped while waiting for the session's turn")
            delay = min(delay * 2, 0.25)
        job.has_turn = True

    def _with_backend(self, job: Job, serve: Serve) -> None:
        """Run ``serve(job, backend)``, failing over to another backend before the first byte.

        A session's turn goes first to the backend that answered its last turn (its
        prompt cache holds the conversation) while that one is healthy and has a free
        slot (``[llama] session_affinity``).
        """
        tried: set[str] = set()
        prefer = self._affine_backend(job)
        while True:
            backend = self._pool.acquire(exclude=tried, model=job.acc.request.model,
                                         prefer=prefer)
            if prefer is not None:
                log.debug("request %s: session backend %s %s", job.acc.request_id, prefer,
                          "taken" if backend.url == prefer
                          else f"full or down, {backend.url} instead")
            job.backend = backend.url
            try:
                serve(job, backend)
                return
            except BackendUnavailable as exc:
                self._pool.mark_failed(backend, exc)
                tried.add(backend.url)
                if job.channel.first_text_at is not None or len(tried) >= len(self._pool.backends):
                    raise
                log.info("request %s: %s unavailable before the first byte; trying another "
                         "backend", job.acc.request_id, backend.url)
            finally:
                self._pool.release(backend)

    def _affine_backend(self, job: Job) -> str | None:
        """The backend that answered the session's last turn, if affinity applies."""
        session = job.acc.request.session
        if session is None or not self._cfg.llama.session_affinity:
            return None
        return self._sessions.last_backend(job.acc.client, session)

    # ------------------------------------------------------------------ what is sent

    @staticmethod
    def _llama_params(job: Job) -> dict[str, Any]:
        req = job.acc.request
        params = req.sampling()
        params["max_tokens"] = job.acc.max_tokens
        if req.think is False:
            params["chat_template_kwargs"] = {"enable_thinking": False}
        if req.model is not None:
            params["model"] = req.model
        return params

    def _prepare(self, job: Job, backend: Backend) -> tuple[list[Message] | str, dict[str, Any]]:
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
            messages = self._sessions.conversation(
                job.acc.client, req.session, messages, llama=backend.client,
                max_tokens=job.acc.max_tokens, tools=req.tools)
        return messages, params

    # ------------------------------------------------------------------ sessions

    def _remember(self, job: Job, answer: Message) -> None:
        """After a successful answer: store the session's new turn (before the terminal
        message, so a device that got ``done`` can rely on the turn being kept)."""
        req = job.acc.request
        if req.session is None:
            return
        messages = [m.model_dump(exclude_none=True) for m in req.messages or []]
        try:
            self._sessions.remember(job.acc.client, req.session, messages, answer,
                                    backend=job.backend)
        except BridgeError as exc:  # the answer is still worth sending
            log.error("request %s: session %s/%s not updated: %s", job.acc.request_id,
                      job.acc.client, req.session, exc)

    def _clear_session(self, job: Job) -> bool:
        """``clear``: forget the session; True if the request is answered (no messages)."""
        req = job.acc.request
        assert req.session is not None  # the wire model requires it with 'clear'
        existed = self._sessions.clear(job.acc.client, req.session)
        log.info("session %s/%s cleared (%s)", job.acc.client, req.session,
                 "it existed" if existed else "it was empty")
        if req.messages is not None:
            return False  # then answered as the first turn of the new conversation
        job.outcome = Outcome.done
        job.channel.done("cleared", None, job.timings(None))
        return True

    # ------------------------------------------------------------------ answering

    def _stream(self, job: Job, backend: Backend) -> None:
        req, channel = job.acc.request, job.channel
        inputs, params = self._prepare(job, backend)
        if isinstance(inputs, str):
            stream = backend.client.stream_completion(inputs, cancel_token=job.token, **params)
        else:
            stream = backend.client.stream_chat(inputs, cancel_token=job.token, **params)
        answer: list[str] | None = [] if req.session is not None else None
        ticker = self._ticker

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
                ticker.wake_at(channel.due())

        with stream:
            try:
                end = stream.pump(on_delta, self._relay)
            finally:  # a cancelled stream never gets llama-server's usage: count its tokens
                job.usage = stream.usage_so_far()
        job.usage = end.usage or job.usage
        _llama_timings(job, end.timings)
        job.outcome = Outcome.done
        finish = end.finish_reason or "stop"
        if answer is not None:
            self._remember(job, {"role": "assistant", "content": "".join(answer)})
        channel.done(finish, job.usage, job.timings(job.usage))

    def _answer_once(self, job: Job, backend: Backend) -> None:
        req, channel = job.acc.request, job.channel
        inputs, params = self._prepare(job, backend)
        if isinstance(inputs, str):
            gen = backend.client.completion(inputs, cancel_token=job.token, **params)
        else:
            gen = backend.client.chat(inputs, tools=req.tools, tool_choice=req.tool_choice,
                                      cancel_token=job.token, **params)
        job.usage = gen.usage or Usage()
        _llama_timings(job, gen.timings)
        fields: dict[str, Any] = {"content": gen.content, "tool_calls": gen.tool_calls,
                                  "finish_reason": gen.finish_reason or "stop",
                                  "usage": job.usage, "timings": job.timings(job.usage)}
        room = payload_room(self._link.max_payload_bytes, channel.address.topic)
        if gen.content and not channel.reply_fits(room, **fields):
            # Too big for one message: the text goes as chunks, then a reply without content.
            channel.chunks(gen.content)
            fields["content"] = None
        if not channel.reply_fits(room, **fields):  # tool_calls too big: say so, not drop
            raise RequestRejected(
                ErrorCode.too_large,
                f"the answer's tool_calls do not fit in one message of {room} bytes "
                "(max_message_bytes or the broker's Maximum Packet Size, less the topic) or "
                "the request's max_packet; ask for shorter tool arguments or raise the limit")
        job.outcome = Outcome.reply
        answer: Message = {"role": "assistant", "content": gen.content or ""}
        if gen.tool_calls:
            answer["tool_calls"] = gen.tool_calls
        self._remember(job, answer)
        channel.reply(room, **fields)

    # ------------------------------------------------------------------ stopped answers

    def _cancelled(self, job: Job) -> None:
        """The HTTP call was cancelled: say why, as the terminal message."""
        channel = job.channel
        if job.refused:
            self._finisher.refused(job)
        elif job.timed_out:
            job.failed(ErrorCode.timeout)
            channel.error(ErrorCode.timeout,
                          f"the answer took longer than max_generation_s "
                          f"({self._cfg.max_generation_s:g} s); ask for fewer max_tokens")
        elif job.shutting_down:
            self._shut_down(job)
        else:
            job.outcome = Outcome.cancelled
            channel.done("cancelled", job.usage, job.timings(job.usage))

    @staticmethod
    def _shut_down(job: Job) -> None:
        """The bridge is stopping under a job it took: tell the device to send it again."""
        job.outcome = Outcome.shutdown
        job.channel.error(ErrorCode.backend_unavailable, SHUTDOWN_MESSAGE, retryable=True)


def _llama_timings(job: Job, timings: dict[str, Any] | None) -> None:
    """Keep what llama-server's ``timings`` (not in the OpenAI API) says of the prompt:
    its time, and how many tokens came from the slot's cache (``cache_n``) or were read
    anew (``prompt_n``). Missing or non-numeric values stay None."""
    def number(key: str) -> float | None:
        value = (timings or {}).get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            return None
        return float(value)

    job.llama_prompt_ms = number("prompt_ms")
    cache_n, prompt_n = number("cache_n"), number("prompt_n")
    job.cache_n = None if cache_n is None else int(cache_n)
    job.prompt_n = None if prompt_n is None else int(prompt_n)
