"""The fault scenarios, each a function ``(env, sizes) -> Result`` that asserts its outcome.

Every scenario drives the REAL bridge (:class:`bridge.service.bridge.Bridge` in-process,
or the ``llamacpp-mqtt-bridge run`` command as a child process for the soak)
against real Mosquitto and real llama.cpp; a scripted llama-server stands in
where a fault needs precise timing or a request rate no real model reaches here.
Only 127.0.0.1 is used. See ``docs/reliability.md`` for what each one shows.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import requests
from paho.mqtt.properties import Properties

from bridge.protocol import topics as bridge_topics
from bridge.protocol.messages import TERMINAL_TYPES
from bridge.service.bridge import Bridge
from tests.faults.rig import (
    Env,
    ProcessSampler,
    Result,
    bridge_process,
    bridge_state,
    bridge_threads_alive,
    devices,
    prompt,
    start_bridge,
    tally,
    v5_props,
    wait_until,
    wait_while_progressing,
)
from tests.faults.sizes import Sizes
from tests.support.device import Device
from tests.support.fake_llama import (
    DEFAULT_TEXTS,
    PING,
    Action,
    FakeLlama,
    Pause,
    Respond,
    Send,
    SSEHeaders,
    Stall,
    chat_chunk,
    event,
    stream_script,
)
from tests.support.processes import MOSQUITTO_ACL, MosquittoProcess
from tests.support.prompts import SEED
from tests.support.recorder import Recorder
from tests.support.relay import TcpRelay
from tests.support.replies import StreamView
from tests.support.tap import Exchange, HttpTap
from tests.support.waiting import poll_until

# Bugs the suite found (details and fixes in docs/reliability.md), all fixed; the
# scenarios that showed them are regression tests now.
BUGS: dict[str, str] = {
    "B1": "B1: a retryable error was replayed to a retry with the same id "
          "(Finisher.finish kept errors before any text in the duplicate cache)",
    "B2": "B2: a broker outage longer than max_generation_s left streams without a "
          "terminal message and with seq holes (publishes gave up at the deadline)",
    "B3": "B3: big MQTT 5 Correlation Data made every reply exceed the broker's Maximum "
          "Packet Size: the broker disconnected the bridge and paho re-sent it forever",
    "B4": "B4: a retained request was handed to the bridge on every subscription and "
          "generated again on every bridge start",
    "B5": "B5: NaN/Infinity passed intake and reached llama-server as invalid JSON",
    "B6": "B6: the shipped ACL's device patterns applied to bridge accounts: a bridge "
          "account could ask the LLM in its own name",
    "B7": "B7: a health probe sent on a pooled keep-alive connection that llama-server was "
          "closing failed once and marked a healthy backend down for a whole interval",
    "B8": "B8: Bridge.stop() never returned while the broker was away and the publish "
          "window was full",
    "B9": "B9: cancelling a queued request made the intake thread wait for the publish "
          "window; with the broker slow to acknowledge, a burst deadlocked the bridge",
    "B12": "B12: a reply the broker refused by closing the connection (an MQTT 5 Response "
           "Topic of 202 levels) was resent after every reconnect: no device was served, "
           "and the request was logged outcome=done",
}

#: scenario (report key) -> the bug it shows; the report says "regression test for Bn"
#: when it passes and "FAIL (bug Bn)" when it fails
BUG_OF: dict[str, str] = {
    "retry_same_id_after_backend_unavailable": "B1",
    "broker_paused_past_deadline": "B2",
    "oversized_correlation_data": "B3",
    "retained_request": "B4",
    "non_finite_numbers": "B5",
    "bridge_account_as_device": "B6",
    "stale_keepalive_probe": "B7",
    "stop_while_broker_frozen": "B8",
    "broker_stops_reading": "B9",
    "poison_publish": "B12",
    "soak": "B7",  # at default settings the long soak meets B7 (backend_unavailable)
}


# =========================================================================== helpers


def save_broker_db(broker: MosquittoProcess, timeout: float = 10.0) -> None:
    """SIGUSR1: Mosquitto writes its persistence database now (as autosave would)."""
    assert broker.pid is not None
    offset = broker.log_path.stat().st_size
    os.kill(broker.pid, signal.SIGUSR1)
    ok = wait_until(lambda: b"Saving in-memory database" in _read_from(broker, offset), timeout)
    assert ok, "mosquitto did not save its database on SIGUSR1"


def _read_from(broker: MosquittoProcess, offset: int) -> bytes:
    with open(broker.log_path, "rb") as f:
        f.seek(offset)
        return f.read()


def chat_request(request_id: str, text: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, "seed": SEED, **extra}


def _generation_prompt(x: Exchange) -> str:
    try:
        body = x.json()
    except ValueError:
        return ""
    if isinstance(body.get("prompt"), str):
        return str(body["prompt"])
    messages = body.get("messages") or [{}]
    return str(messages[-1].get("content") or "")


def compare_with_tap(res: Result, tap: HttpTap, streams: dict[str, StreamView]) -> list[int]:
    """Expect each stream's text to equal what llama-server sent for that request.

    Args:
        streams: prompt -> what the device received.
    Returns:
        how many generation requests the backend got for each prompt.
    """
    by_prompt: dict[str, list[Exchange]] = collections.defaultdict(list)
    for x in tap.generations():
        by_prompt[_generation_prompt(x)].append(x)
    counts = []
    mismatched = 0
    for text, view in streams.items():
        gens = by_prompt.get(text, [])
        counts.append(len(gens))
        res.expect(len(gens) == 1, f"{text!r} was generated {len(gens)} times")
        if gens:
            res.expect(gens[0].finished, f"{text!r}: llama-server's answer was cut off")
            if view.text != gens[0].sse_text():
                mismatched += 1
    res.expect(mismatched == 0, f"{mismatched} streams differ from llama-server's output")
    res.note(f"text identical to llama-server's output for {len(streams) - mismatched}/"
             f"{len(streams)} streams")
    return counts


def _fixed_stream(texts: list[str], path: str, body: dict[str, Any]) -> list[Action]:
    return stream_script(path, texts)


def _streaming(devs: list[Device], request_id: str, at_least: int) -> bool:
    """At least ``at_least`` devices received a chunk of ``request_id``."""
    return sum("chunk" in d.view(d.topic(request_id)).types() for d in devs) >= at_least


def _published(bridge: Bridge) -> int:
    return bridge.link.published


def _window_full(bridge: Bridge) -> bool:
    return bridge.link.outstanding >= MAX_QUEUED


def _all_ended(topics: list[str], device: Device) -> bool:
    return all(t in device.terminal_topics for t in topics)


def bridge_idle(bridge: Bridge) -> bool:
    """Every request finished and every reply acknowledged by the broker."""
    return not bridge.jobs and bridge.link.outstanding == 0 and bridge.link.connected


# =========================================================================== 1. broker restart


def broker_restart(env: Env, sizes: Sizes, *, kill: bool) -> Result:
    """Mosquitto stopped (SIGTERM) or crashed (SIGKILL) mid-stream, restarted on its port.

    Devices have persistent sessions (3.1.1 ``clean_session=False`` for the SIGKILL run,
    MQTT 5 session expiry for the SIGTERM run) with fixed client ids. Expected:

    * SIGTERM: Mosquitto saves sessions and queued messages; every stream completes
      with ``seq`` contiguous after de-duplication, without any help from the device.
    * SIGKILL: Mosquitto loses what it acknowledged since its last save (documented:
      ``autosave_interval``); the sessions themselves were saved (SIGUSR1 before the
      streams, standing in for the periodic autosave of long-lived sessions). To make
      that loss certain, half the devices stop reading just before the crash, so the
      broker holds acknowledged replies for them in memory. A device that sees a ``seq``
      gap or no terminal message re-sends its request with the same id; the bridge
      replays the recorded answer. Every stream then completes, and nothing is
      generated twice.

    Both: each stream's text equals what llama-server sent for it.
    """
    n, tokens = sizes.restart_streams, sizes.stream_tokens
    protocol: Any = "3.1.1" if kill else "5"
    sig = "SIGKILL" if kill else "SIGTERM"
    res = Result(f"1. broker {sig} mid-stream, restart",
                 f"{n} streams × {tokens} tokens, real model, MQTT {protocol}",
                 f"Mosquitto {sig}; restarted on its port once the bridge queued replies")
    res.sent = n
    with ExitStack() as stack:
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        tap = stack.enter_context(HttpTap(env.llama_url()))
        bridge = stack.enter_context(start_bridge(
            broker.host, broker.port, [tap.url], protocol=protocol, max_tokens_cap=tokens,
            chunk_bytes=128, flush_ms=0 if kill else 20))
        devs = stack.enter_context(devices(broker.host, broker.port,
                                           [f"restart-{i}" for i in range(n)], protocol=protocol))
        watcher = Recorder(broker.host, broker.port, topic_filter="llm/reply/#")
        stack.callback(watcher.close)
        if kill:
            save_broker_db(broker)
        sampler = stack.enter_context(ProcessSampler())
        payloads = [chat_request("s1", prompt(i), tokens, chunk_bytes=128) for i in range(n)]
        for dev, payload in zip(devs, payloads, strict=True):
            dev.request(payload)
        topic_of = {dev.name: dev.topic("s1") for dev in devs}

        def streaming() -> int:
            return sum(1 for d in devs if "chunk" in d.view(topic_of[d.name]).types())

        res.expect(wait_until(lambda: streaming() >= min(2, n)), "streams never started")
        frozen: list[Device] = []
        if kill:
            # The devices that are streaming stop reading (busy, or on a slow radio link)
            # just before the crash. Beyond its in-flight window (20) the broker keeps
            # their replies in memory: acknowledged to the bridge, lost in the crash --
            # the loss the device's recovery (re-send the same id) must repair.
            frozen = [d for d in devs if "chunk" in d.view(topic_of[d.name]).types()
                      and "done" not in d.view(topic_of[d.name]).types()]
            seen_before = {d.name: len(watcher.on_topic(topic_of[d.name])) for d in frozen}
            for dev in frozen:
                dev.client.loop_stop()

            def held_back() -> bool:
                return all(len(watcher.on_topic(topic_of[d.name])) >= seen_before[d.name] + 30
                           or _ended(watcher.on_topic(topic_of[d.name]), topic_of[d.name])
                           for d in frozen)

            wait_while_progressing(held_back, functools.partial(_published, bridge))
        before = bridge.link.published
        running_at_fault = len(bridge.jobs)  # requests started or queued, not yet answered
        outage = time.monotonic()
        if kill:
            broker.kill()
            for dev in frozen:
                dev.client.loop_start()  # finds the connection dead and reconnects
        else:
            broker.stop()
        res.expect(wait_until(lambda: not bridge.link.connected, 30),
                   "the bridge did not notice the broker was gone")
        # Keep the broker down until the bridge has queued replies (or finished everything).
        wait_until(lambda: bridge.link.published >= before + 10 or not bridge.jobs, 60)
        queued_down = bridge.link.published - before
        broker.restart()
        outage = time.monotonic() - outage
        res.expect(wait_while_progressing(lambda: bridge_idle(bridge),
                                          lambda: bridge.link.published),
                   f"the bridge did not finish: {bridge_state(bridge)}")
        for dev in devs:
            dev.barrier()
        first = [dev.view(topic_of[dev.name]) for dev in devs]
        lost_first = sum(v.missing for v in first)
        resent = 0
        if kill:
            for dev, view, payload in zip(devs, first, payloads, strict=True):
                if not view.complete:
                    dev.request(payload)  # the device's recovery: same id again
                    resent += 1
            for dev in devs:
                dev.wait(lambda d: d.view(topic_of[d.name]).complete)
        else:
            for dev in devs:
                dev.wait(lambda d: d.view(topic_of[d.name]).complete, 30)
        sampler.stop()
        views = [dev.view(topic_of[dev.name]) for dev in devs]
        counts = compare_with_tap(res, tap, {prompt(i): v for i, v in enumerate(views)})
        tally(res, views, counts)
        res.max_rss_mb = sampler.max_rss_mb
        res.note(f"outage {outage:.1f} s; {running_at_fault} requests unanswered at the "
                 f"fault; {queued_down} replies published while down")
        res.expect(running_at_fault > 0 and queued_down > 0,
                   f"the fault did not land mid-stream ({running_at_fault} requests "
                   f"unanswered, {queued_down} replies published while down)")
        res.note(f"{lost_first} messages missing before recovery, {resent} requests re-sent"
                 + (f" ({len(frozen)} devices had stopped reading before the crash)"
                    if kill else ""))
        for view in views:
            end = view.terminal
            res.expect(view.complete, f"{view.topic}: incomplete ({view.types()[-3:]})")
            res.expect(end is not None and end.get("type") == "done",
                       f"{view.topic}: ended with {end}")
        if kill and frozen:
            res.expect(lost_first > 0 and resent > 0,
                       "the crash lost nothing although devices had stopped reading: the "
                       "device's recovery (re-send the same id) was not exercised")
        if not kill:
            res.expect(lost_first == 0, f"{lost_first} messages lost across a clean restart")
            res.expect(resent == 0, "a device had to re-send")
    return res.check()


# =========================================================================== 2. llama killed


def _status_health(recorder: Recorder) -> list[bool]:
    """The ``healthy`` flag of the first backend in every online status, in order."""
    out: list[bool] = []
    for m in list(recorder.messages):
        try:
            body = json.loads(m.payload)
        except ValueError:
            continue
        if body.get("state") == "online" and body.get("backends"):
            out.append(bool(body["backends"][0]["healthy"]))
    return out


def _went(values: list[bool], *pattern: bool) -> bool:
    """``pattern`` occurs in ``values`` as a subsequence (in order, gaps allowed)."""
    it = iter(values)
    return all(any(v == want for v in it) for want in pattern)


def llama_killed(env: Env, sizes: Sizes) -> Result:
    """llama-server SIGKILLed mid-stream, restarted on the same port; the bridge keeps running.

    Expected: every request in flight ends with exactly one retryable ``error`` (no
    hang); while the server is down, new requests are answered ``backend_unavailable``
    (retryable) before it comes back; once it is back, requests succeed without
    restarting the bridge; the retained status shows the backend healthy, unhealthy,
    healthy again.
    """
    n = sizes.llama_kill_streams
    res = Result("2. llama-server killed mid-stream, restarted",
                 f"{n} requests in flight on 2 slots, real model",
                 "SIGKILL llama-server mid-stream; restart on the same port")
    llama = env.make_llama(parallel=2, ctx=4096)
    bridge_id = "kill-llama"
    with ExitStack() as stack:
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        status = Recorder(broker.host, broker.port, topic_filter=f"llm/status/{bridge_id}")
        stack.callback(status.close)
        bridge = stack.enter_context(start_bridge(
            broker.host, broker.port, [llama.url], protocol="5", bridge_id=bridge_id,
            max_tokens_cap=2000, client_max_inflight=100, heartbeat_s=1.0,
            llama_settings={"health_interval_s": 0.5}))
        (dev,) = stack.enter_context(devices(broker.host, broker.port, ["kill-dev"]))
        sampler = stack.enter_context(ProcessSampler())
        ids = [f"k{i}" for i in range(n)]
        for i, rid in enumerate(ids):
            dev.request(chat_request(rid, prompt(i), 2000))
        res.sent = n
        streaming = wait_until(lambda: sum("chunk" in dev.view(dev.topic(r)).types()
                                           for r in ids) >= min(2, n))
        res.expect(streaming, "no stream started before the kill")
        llama.kill()
        killed_at = time.monotonic()
        for rid in ids:
            dev.wait_terminal(dev.topic(rid), 60)
        in_flight = [dev.view(dev.topic(r)) for r in ids]
        res.note(f"in-flight requests ended {time.monotonic() - killed_at:.1f} s after the kill")
        for view in in_flight:
            end = view.terminal or {}
            res.expect(view.complete, f"{view.topic}: incomplete: {view.types()}")
            res.expect(end.get("type") == "error" and end.get("retryable") is True,
                       f"{view.topic}: ended with {end} instead of one retryable error")
        codes = collections.Counter(str((v.terminal or {}).get("code")) for v in in_flight)
        res.note("in flight: " + ", ".join(f"{c} × {k}" for k, c in sorted(codes.items())))
        res.expect(wait_until(lambda: _went(_status_health(status), True, False), 30),
                   f"status never showed the backend unhealthy: {_status_health(status)}")

        # While it is down: answered at once, not after the server is back.
        down_ids = ["down-0", "down-1"]
        latencies = []
        for rid in down_ids:
            t0 = time.monotonic()
            dev.request(chat_request(rid, "Is anyone there?", 16))
            view = dev.wait_terminal(dev.topic(rid), 60)
            latencies.append(time.monotonic() - t0)
            end = view.terminal or {}
            res.expect(view.complete and end.get("code") == "backend_unavailable"
                       and end.get("retryable") is True,
                       f"{rid} while the server was down: {end}")
        res.expect(not llama.running(), "the server came back before the answers (test bug)")
        res.note("backend_unavailable answered in " +
                 ", ".join(f"{x * 1000:.0f} ms" for x in latencies))
        res.sent += len(down_ids)

        llama.restart()
        res.expect(wait_until(lambda: _went(_status_health(status), True, False, True), 60),
                   f"status never showed the backend healthy again: {_status_health(status)}")
        after: list[StreamView] = []
        for rid in ("back-0", "back-1"):
            dev.request(chat_request(rid, "Welcome back.", 16))
            view = dev.wait_terminal(dev.topic(rid))
            after.append(view)
            res.expect(view.complete and (view.terminal or {}).get("type") == "done",
                       f"{rid} after the restart: {view.terminal}")
        res.sent += 2
        sampler.stop()
        res.max_rss_mb = sampler.max_rss_mb
        views = [*in_flight, *(dev.view(dev.topic(r)) for r in down_ids), *after]
        tally(res, views)
        dead = bridge_threads_alive(bridge)
        res.expect(not dead, f"dead threads: {dead}")
        res.note("health seen on the status topic: " +
                 " → ".join("up" if h else "down" for h in _dedupe_runs(_status_health(status))))
    return res.check()


def _dedupe_runs(values: list[bool]) -> list[bool]:
    out: list[bool] = []
    for v in values:
        if not out or out[-1] != v:
            out.append(v)
    return out


def retry_same_id_after_backend_unavailable(env: Env, sizes: Sizes) -> Result:
    """A device retries a ``retryable`` error with the same request (same id) once the
    backend is back: it must be served, not answered with the old error again."""
    res = Result("2b. retry of a retryable error, same id",
                 "1 request, scripted backend", "backend unhealthy, then healthy again")
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama())
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        bridge = stack.enter_context(start_bridge(
            broker.host, broker.port, [fake.url], protocol="5",
            llama_settings={"health_interval_s": 0.2}))
        (dev,) = stack.enter_context(devices(broker.host, broker.port, ["retry-dev"]))
        fake.healthy = False
        res.expect(wait_until(lambda: not bridge.pool.backends[0].healthy, 30),
                   "the backend was never marked unhealthy")
        request = {"id": "again", "prompt": "Hello?", "max_tokens": 8}
        dev.request(request)
        first = dev.wait_terminal(dev.topic("again"))
        end = first.terminal or {}
        res.expect(end.get("code") == "backend_unavailable" and end.get("retryable") is True,
                   f"first answer: {end}")
        fake.healthy = True
        res.expect(wait_until(lambda: bridge.pool.backends[0].healthy, 30),
                   "the backend never came back")
        seen = len(dev.received)
        dev.request(request)  # what `retryable: true` invites
        dev.wait(lambda d: any(json.loads(p).get("type") in TERMINAL_TYPES
                               for _, p in d.received[seen:]), 60)
        again = [json.loads(p) for _, p in dev.received[seen:]]
        res.sent = 2
        res.terminal = 1 + any(m.get("type") in TERMINAL_TYPES for m in again)
        got = [f"{m.get('type')}:{m['code']}" if "code" in m else str(m.get("type"))
               for m in again]
        res.note(f"the retry got: {', '.join(got)}")
        res.expect(any(m.get("type") == "done" for m in again),
                   "the retry was answered with the old error instead of being served")
    return res.check()


# =========================================================================== 3. stalls


STALL_CASES: dict[str, tuple[str, str]] = {
    # prompt marker: (what the scripted server does, which timeout must fire)
    "stall-before-headers": ("accepts the request, sends nothing", "first_byte_timeout_s"),
    "stall-after-headers": ("sends SSE headers, then nothing", "idle_timeout_s"),
    "stall-mid-stream": ("streams two deltas, then nothing", "idle_timeout_s"),
    "pings-only": ("streams a delta, then only keep-alive pings", "idle_timeout_s"),
}


def _stall_script(path: str, body: dict[str, Any]) -> list[Action]:
    text = json.dumps(body)
    if "stall-before-headers" in text:
        return [Stall(60)]
    if "stall-after-headers" in text:
        return [SSEHeaders(), Stall(60)]
    if "stall-mid-stream" in text:
        return [SSEHeaders(), Send(event(chat_chunk("Hello"))), Send(event(chat_chunk(" world"))),
                Stall(60)]
    if "pings-only" in text:
        pings: list[Action] = [SSEHeaders(), Send(event(chat_chunk("Hi")))]
        for _ in range(120):
            pings += [Pause(0.25), Send(PING)]
        return pings
    return stream_script(path)


def llama_stalls(env: Env, sizes: Sizes) -> Result:
    """llama-server stalls before the first byte or mid-stream (scripted server).

    Expected: a ``timeout`` error (retryable) after the configured first-byte / idle
    timeout, text received before the stall delivered first, the HTTP connection
    closed by the bridge (so a real server would free the slot), and the bridge
    serving the next request normally.
    """
    timeout_s = 1.5
    res = Result("3. llama-server stalls", f"{len(STALL_CASES)} stalled requests + 1 normal, "
                 "scripted server", "no bytes / headers only / stall mid-stream / pings only")
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama(_stall_script))
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        stack.enter_context(start_bridge(
            broker.host, broker.port, [fake.url], protocol="5", heartbeat_s=0.5,
            llama_settings={"first_byte_timeout_s": timeout_s, "idle_timeout_s": timeout_s,
                            "retries": 1}))
        (dev,) = stack.enter_context(devices(broker.host, broker.port, ["stall-dev"]))
        views = []
        for i, (marker, (_, which)) in enumerate(STALL_CASES.items()):
            rid = f"st{i}"
            dev.request(chat_request(rid, f"please {marker}", 32))
            view = dev.wait_terminal(dev.topic(rid), 60)
            views.append(view)
            end = view.terminal or {}
            res.expect(view.complete, f"{marker}: incomplete {view.types()}")
            res.expect(end.get("code") == "timeout" and end.get("retryable") is True,
                       f"{marker}: ended with {end}")
            named = f"{which.split('_timeout')[0]}={timeout_s:g} s"  # e.g. "idle=1.5 s"
            res.expect(named in str(end.get("message")),
                       f"{marker}: the message does not say {named!r}: {end.get('message')}")
            gen = next((g for g in fake.generations if marker in json.dumps(g.json())), None)
            res.expect(gen is not None, f"{marker}: never reached the backend")
            if gen is not None:
                closed = gen.client_closed.wait(30)
                res.expect(closed, f"{marker}: the bridge did not close the HTTP connection")
                if closed and gen.client_closed_at is not None:
                    took = gen.client_closed_at - gen.received_at
                    res.note(f"{marker}: connection closed {took:.2f} s after the request "
                             f"({which} = {timeout_s:g} s)")
            if marker == "stall-mid-stream":
                res.expect(view.text == "Hello world", f"text before the stall: {view.text!r}")
        dev.request(chat_request("after", "a normal request", 16))
        view = dev.wait_terminal(dev.topic("after"), 60)
        views.append(view)
        res.expect(view.complete and (view.terminal or {}).get("type") == "done",
                   f"the next request: {view.terminal}")
        res.sent = len(views)
        tally(res, views, [1] * len(views))
    return res.check()


# =========================================================================== 4. broker paused


class _OutstandingProbe:
    """Samples ``bridge.link.outstanding`` every few ms (measurement, not waiting)."""

    def __init__(self, bridge: Bridge, interval: float = 0.005) -> None:
        self.bridge = bridge
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outstanding-probe", daemon=True)

    def __enter__(self) -> _OutstandingProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.bridge.link.outstanding)


MAX_QUEUED = 50  # [mqtt] max_queued for the pause scenarios (the minimum allowed is 10)
PAUSE_HOLD_S = 3.0  # how long the broker stays frozen once the bridge's window is full
RSS_GROWTH_BOUND_MB = 32.0


def broker_paused(env: Env, sizes: Sizes) -> Result:
    """Mosquitto frozen (SIGSTOP) while streams generate, then continued (SIGCONT).

    Phase 1, real model behind the tap: streams finish after SIGCONT, nothing lost,
    text identical to llama-server's. Phase 2, a scripted backend that offers every
    token at once (thousands per stream, far more than fit the window): the bridge
    stops reading from the backend instead of queueing.

    Expected, both phases: ``bridge.link.outstanding`` never exceeds ``max_queued`` plus
    the intake allowance (intake messages -- ``start``/``error`` -- and the status never
    wait, so at most one per request received and one per status publish), and the
    RSS of the process hosting the bridge grows by less than 32 MiB while the broker
    is frozen. Why 32 MiB: the window holds at most 50 messages of ≤ 128 bytes (paho
    keeps a ~1 KiB object per message), i.e. well under 1 MiB; the rest is headroom
    for allocator and thread-stack noise. Without flow control phase 2 would queue
    every offered token -- ~1 KiB × tokens × streams, over 60 MiB in the long form.
    """
    n = sizes.pause_streams
    fast_tokens = 4000
    res = Result("4. broker frozen (SIGSTOP) while generating",
                 f"{n} streams real model + {n} × {fast_tokens}-token scripted streams",
                 f"SIGSTOP until the window ({MAX_QUEUED}) is full, {PAUSE_HOLD_S:g} s more, "
                 "SIGCONT")
    views: list[StreamView] = []
    counts: list[int] = []
    growth: list[float] = []
    peaks: list[int] = []
    with ProcessSampler() as sampler:
        for phase in ("real", "fast"):
            with ExitStack() as stack:
                broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
                if phase == "real":
                    tap = stack.enter_context(HttpTap(env.llama_url()))
                    url, tokens = tap.url, sizes.stream_tokens
                else:
                    texts = [f" t{i}" for i in range(fast_tokens)]
                    fake = stack.enter_context(FakeLlama(
                        functools.partial(_fixed_stream, texts)))
                    url, tokens = fake.url, fast_tokens
                bridge = stack.enter_context(start_bridge(
                    broker.host, broker.port, [url], protocol="5", max_tokens_cap=tokens,
                    chunk_bytes=128, flush_ms=0, mqtt_settings={"max_queued": MAX_QUEUED}))
                probe = stack.enter_context(_OutstandingProbe(bridge))
                devs = stack.enter_context(devices(
                    broker.host, broker.port, [f"pause-{phase}-{i}" for i in range(n)]))
                for i, dev in enumerate(devs):
                    dev.request(chat_request("p1", prompt(i), tokens, chunk_bytes=128))
                res.sent += n
                res.expect(wait_until(functools.partial(_streaming, devs, "p1", min(2, n))),
                    f"{phase}: streams never started")
                sampler.take()
                first = len(sampler.samples) - 1
                broker.pause()
                try:
                    full = wait_until(functools.partial(_window_full, bridge), 60)
                    res.expect(full, f"{phase}: the window never filled (test too small)")
                    threading.Event().wait(PAUSE_HOLD_S)  # the fault's duration, not a wait
                    sampler.take()
                    frozen = sampler.samples[first:]
                    growth.append((max(s.rss for s in frozen) - frozen[0].rss) / 2**20)
                finally:
                    broker.resume()
                res.expect(wait_while_progressing(functools.partial(bridge_idle, bridge),
                                                  functools.partial(_published, bridge)),
                           f"{phase}: the bridge did not finish after SIGCONT: "
                           f"{bridge_state(bridge)}")
                for dev in devs:
                    dev.barrier()
                    dev.wait(lambda d: d.view(d.topic("p1")).complete, 30)
                phase_views = [d.view(d.topic("p1")) for d in devs]
                views += phase_views
                peaks.append(probe.peak)
                allowance = n + 2
                res.expect(probe.peak <= MAX_QUEUED + allowance,
                           f"{phase}: {probe.peak} outstanding > {MAX_QUEUED} + {allowance}")
                if phase == "real":
                    counts += compare_with_tap(res, tap, {prompt(i): v
                                                          for i, v in enumerate(phase_views)})
                else:
                    want = "".join(f" t{i}" for i in range(fast_tokens))
                    bad = sum(1 for v in phase_views if v.text != want)
                    res.expect(bad == 0, f"fast: {bad} streams with wrong text")
                    counts += [sum(1 for g in fake.generations if g.prompt_text() == prompt(i))
                               for i in range(n)]
                for view in phase_views:
                    res.expect(view.complete and (view.terminal or {}).get("type") == "done",
                               f"{view.topic}: {view.types()[-3:]}")
    res.max_rss_mb = sampler.max_rss_mb
    tally(res, views, counts)
    for g in growth:
        res.expect(g <= RSS_GROWTH_BOUND_MB, f"RSS grew {g:.1f} MiB while the broker was frozen")
    res.note(f"peak outstanding {peaks} (max_queued {MAX_QUEUED}); RSS growth while frozen "
             + ", ".join(f"{g:+.1f} MiB" for g in growth))
    return res.check()


def broker_paused_past_deadline(env: Env, sizes: Sizes) -> Result:
    """The broker stays frozen longer than ``max_generation_s``.

    Expected: every request still ends with exactly one terminal message (``done``, or
    ``error``/``timeout``) once the broker is back, with ``seq`` contiguous -- the
    device must never be left without an end, nor with a hole it cannot explain.
    """
    n = 2
    limit = 4.0
    res = Result("4b. broker frozen past max_generation_s",
                 f"{n} streams, scripted backend, max_generation_s {limit:g} s",
                 f"SIGSTOP for {limit + 3:g} s after the window filled")
    with ExitStack() as stack:
        texts = [f" t{i}" for i in range(3000)]
        fake = stack.enter_context(FakeLlama(
            lambda path, body: stream_script(path, texts, gap_s=0.0)))
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        bridge = stack.enter_context(start_bridge(
            broker.host, broker.port, [fake.url], protocol="5", max_tokens_cap=3000,
            chunk_bytes=128, flush_ms=0, max_generation_s=limit,
            mqtt_settings={"max_queued": MAX_QUEUED}))
        devs = stack.enter_context(devices(broker.host, broker.port,
                                           [f"late-{i}" for i in range(n)]))
        for i, dev in enumerate(devs):
            dev.request(chat_request("p1", prompt(i), 3000, chunk_bytes=128))
        res.sent = n
        res.expect(wait_until(lambda: all("chunk" in d.view(d.topic("p1")).types()
                                          for d in devs)), "streams never started")
        broker.pause()
        try:
            res.expect(wait_until(lambda: bridge.link.outstanding >= MAX_QUEUED, 60),
                       "the window never filled")
            threading.Event().wait(limit + 3)  # the fault's duration, not a wait
        finally:
            broker.resume()
        res.expect(wait_until(lambda: bridge_idle(bridge)), "the bridge did not finish")
        for dev in devs:
            dev.barrier()  # everything the bridge published has arrived after this
        views = [d.view(d.topic("p1")) for d in devs]
        tally(res, views, [1] * n)
        for view in views:
            res.note(f"{view.topic}: {len(view.by_seq)} messages, ends "
                     f"{[m.get('type') for m in view.messages[-2:]]}, {view.missing} missing")
            res.expect(view.complete, f"{view.topic}: no terminal message or a seq gap "
                       f"({view.missing} missing)")
    return res.check()


# =========================================================================== 5. burst


def burst(env: Env, sizes: Sizes) -> Result:
    """A burst of requests on 2 slots with a small queue (``queue_size`` 16).

    Expected: every request gets exactly one terminal message -- an answer or ``busy``
    (retryable, with ``retry_after_ms``) -- none silently dropped; the queue bound was
    reached (some ``busy``); the backend generated exactly the answered ones, once.
    """
    n = sizes.burst
    queue_size = 16
    res = Result("5. burst on 2 slots, queue 16", f"{n} requests at once from 5 devices, "
                 "scripted backend (4 tokens, 20 ms apart)", "queue overflow")
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama(
            lambda path, body: stream_script(path, ["a", "b", "c", "d"], gap_s=0.02), slots=2))
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        stack.enter_context(start_bridge(
            broker.host, broker.port, [fake.url], protocol="5", queue_size=queue_size,
            client_max_inflight=100_000, client_rate_per_min=10_000_000))
        devs = stack.enter_context(devices(broker.host, broker.port,
                                           [f"burst-{i}" for i in range(5)]))
        sampler = stack.enter_context(ProcessSampler())
        infos = []
        ids: list[tuple[Device, str]] = []
        for i in range(n):
            dev = devs[i % len(devs)]
            rid = f"b{i}"
            infos.append(dev.request({"id": rid, "prompt": f"burst {i}", "max_tokens": 4},
                                     wait=False))
            ids.append((dev, rid))
        for info in infos:
            info.wait_for_publish(60)
        res.sent = n
        for dev in devs:
            mine = [dev.topic(r) for d, r in ids if d is dev]
            dev.wait(functools.partial(_all_ended, mine))
        sampler.stop()
        views = [d.view(d.topic(r)) for d, r in ids]
        outcomes = collections.Counter(
            str((v.terminal or {}).get("code") or (v.terminal or {}).get("type")) for v in views)
        res.note("outcomes: " + ", ".join(f"{k} × {c}" for k, c in sorted(outcomes.items())))
        generated = collections.Counter(g.prompt_text() for g in fake.generations)
        counts = []
        for (_, rid), view in zip(ids, views, strict=True):
            end = view.terminal or {}
            res.expect(view.complete, f"{rid}: {view.types()}")
            if end.get("type") == "done":
                res.expect(view.text == "abcd", f"{rid}: text {view.text!r}")
                counts.append(generated.get(f"burst {rid[1:]}", 0))
            else:
                res.expect(end.get("code") == "busy" and end.get("retryable") is True
                           and bool(end.get("retry_after_ms")), f"{rid}: {end}")
                res.expect(generated.get(f"burst {rid[1:]}", 0) == 0,
                           f"{rid}: answered busy but generated")
        res.expect(outcomes.get("busy", 0) > 0, "the queue never filled (no busy)")
        res.expect(sum(generated.values()) == outcomes.get("done", 0),
                   f"backend generated {sum(generated.values())}, answered {outcomes.get('done')}")
        res.max_rss_mb = sampler.max_rss_mb
        tally(res, views, counts)
    return res.check()


# =========================================================================== 6. hostile input


@dataclass(frozen=True)
class Hostile:
    """One hostile message.

    Attributes:
        kind: what is wrong with it.
        payload: the bytes published.
        topic: where (None: the device's request topic).
        response_topic: an MQTT 5 Response Topic to set.
        code: the error code expected (None: any error; "ignored": no reply at all).
        request_id: the id the error must carry / the topic it must go to, if readable.
    """

    kind: str
    payload: bytes
    topic: str | None = None
    response_topic: str | None = None
    code: str | None = "bad_request"
    request_id: str | None = None


_WRONG_TYPES: list[dict[str, Any]] = [
    {"prompt": 5}, {"messages": "hi"}, {"messages": []}, {"messages": [{"role": "robot",
                                                                        "content": "x"}]},
    {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": 7}]},
    {"prompt": "x", "temperature": "hot"}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "max_tokens": "10"}, {"prompt": "x", "stream": "yes"},
    {"prompt": "x", "chunk_bytes": 0}, {"prompt": "x", "stop": 5}, {"prompt": "x", "seed": 1.5},
    {"prompt": "x", "top_p": 2}, {"prompt": None}, {"prompt": "x", "temperature": -1},
    {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, {},
    {"prompt": "x", "tools": "all"}, {"prompt": "x", "tools": [{"type": "function"}]},
    {"prompt": "x", "reasoning": 1}, {"prompt": ["x"]}, {"prompt": {"text": "x"}},
    {"prompt": "x", "top_k": -5}, {"prompt": "x", "max_tokens": -(10**30)},
    {"messages": [{"role": "user", "content": "x"}] * 300},
]
_UNKNOWN_FIELDS = ["colour", "__proto__", "constructor", "promt", "Prompt", "$where", "id ", "",
                   "\u0000", "x" * 300]
_BAD_IDS = ["a/b", "a+b", "#", "+", "a#b", "", "x" * 65, "../x", "$SYS", "a b", "é", "a\u0000b",
            "/", "llm/reply/x"]


def hostile_payloads(rng: random.Random, me: str, count: int) -> list[Hostile]:
    """``count`` hostile messages for device ``me``: random bytes, invalid UTF-8, deep and
    huge JSON, wrong types, unknown fields, bad ids, foreign Response Topics, empty
    payloads -- all answered with one error -- plus garbage cancels and requests on
    invalid client topics, which are ignored (no reply is possible or due)."""
    out: list[Hostile] = []
    for i in range(count):
        hid = f"h{i}"
        pick = rng.randrange(100)
        if pick < 15:  # random bytes, made invalid UTF-8 for sure
            noise = bytearray(rng.randbytes(rng.randint(0, 400)))
            noise.insert(rng.randint(0, len(noise)), 0xFF)
            out.append(Hostile("random bytes", bytes(noise)))
        elif pick < 22:
            bad = rng.choice([b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
            out.append(Hostile("invalid UTF-8 in JSON",
                               b'{"id": "' + hid.encode() + b'", "prompt": "' + bad + b'"}'))
        elif pick < 30:
            depth = rng.choice([1000, 3000, 10_000])
            if rng.random() < 0.5:
                raw = b'{"a":' * depth + b"1" + b"}" * depth
            else:
                raw = b'{"id":"' + hid.encode() + b'","prompt":' + b"[" * depth + b"]" * depth \
                    + b"}"
            out.append(Hostile("deep JSON", raw))
        elif pick < 32:
            size = rng.randint(65_537, 200_000)
            out.append(Hostile("huge JSON", b'{"prompt": "' + b"x" * size + b'"}',
                               code="too_large"))
        elif pick < 52:
            body = dict(rng.choice(_WRONG_TYPES))
            body["id"] = hid
            out.append(Hostile("wrong types", json.dumps(body).encode(), request_id=hid))
        elif pick < 62:
            body = {"id": hid, "prompt": "x",
                    rng.choice(_UNKNOWN_FIELDS): rng.choice([1, "x", None])}
            out.append(Hostile("unknown field", json.dumps(body).encode(), request_id=hid))
        elif pick < 72:
            body = {"id": rng.choice(_BAD_IDS), "prompt": "x"}
            out.append(Hostile("bad id", json.dumps(body).encode()))
        elif pick < 82:
            topic = rng.choice([f"llm/reply/other-dev/{hid}", f"llm/request/{me}",
                                f"llm/reply/{me}/+", f"llm/reply/{me}/#", f"llm/reply/{me}",
                                f"llm/reply/{me}/", "other/topic", "$SYS/broker/x",
                                "llm/status/fake", f"llm/reply/{me}x/{hid}", f"llm/cancel/{me}"])
            out.append(Hostile("foreign Response Topic",
                               json.dumps({"id": hid, "prompt": "x"}).encode(),
                               response_topic=topic, request_id=hid))
        elif pick < 86:
            out.append(Hostile("empty / blank", rng.choice([b"", b"   ", b"\n\t\r ", b"{}"])))
        elif pick < 90:
            raw = rng.choice([b'{"prompt": "x"} trailing', b'{"prompt": "x"', b"{", b"{{}}",
                              b'{"prompt": "x",}', b"{'prompt': 'x'}", b'{"prompt": "\\ud800"}'])
            out.append(Hostile("broken JSON", raw))
        elif pick < 95:
            raw = rng.choice([rng.randbytes(20), b"#", b'{"id": "#"}', b'{"id": 5}', b"",
                              b'{"id": "no-such-request"}', b"x" * 70_000, b"[" * 5000])
            out.append(Hostile("garbage cancel", raw, topic=f"llm/cancel/{me}", code="ignored"))
        else:
            topic = rng.choice(["llm/request/.hidden", "llm/request/-dash", "llm/request/" +
                                "x" * 65, "llm/request/", "llm/request/a b", "llm/request/é"])
            out.append(Hostile("invalid client topic", json.dumps({"prompt": "x"}).encode(),
                               topic=topic, code="ignored"))
    return out


@dataclass
class _HostileOutcome:
    sent: int = 0
    malformed: int = 0
    ignored: int = 0
    valid: int = 0
    views: list[StreamView] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def _hostile_phase(res: Result, env: Env, url: str, *, count: int, valid_every: int,
                   real: bool, seed: int, tap: HttpTap | None = None,
                   fake: FakeLlama | None = None) -> _HostileOutcome:
    me = "hostile-real" if real else "hostile"
    out = _HostileOutcome()
    rng = random.Random(seed)
    hostile = hostile_payloads(rng, me, count)
    with ExitStack() as stack:
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        watcher = Recorder(broker.host, broker.port, v5=True)
        stack.callback(watcher.close)
        bridge = stack.enter_context(start_bridge(
            broker.host, broker.port, [url], protocol="5", max_tokens_cap=16,
            client_max_inflight=100_000, client_rate_per_min=10_000_000, queue_size=10_000))
        (dev,) = stack.enter_context(devices(broker.host, broker.port, [me]))
        started_at = bridge.status.started_at
        published: set[str] = set()
        valid: list[tuple[str, str]] = []  # (id, prompt)
        infos = []
        for i, h in enumerate(hostile):
            if i % valid_every == 0:
                rid, text = f"ok{i}", f"valid request {i}: tell me about {prompt(i)}"
                body = chat_request(rid, text, 16) if real else \
                    {"id": rid, "prompt": text, "max_tokens": 8}
                infos.append(dev.request(body, wait=False))
                valid.append((rid, text))
            topic = h.topic or f"llm/request/{me}"
            published.add(topic)
            props = v5_props(response_topic=h.response_topic) if h.response_topic else None
            infos.append(dev.request(h.payload, topic=topic, props=props, wait=False))
        for info in infos:
            info.wait_for_publish(120)
        answered = [h for h in hostile if h.code != "ignored"]
        out.malformed, out.ignored, out.valid = len(answered), len(hostile) - len(answered), \
            len(valid)
        out.sent = len(answered) + len(valid)
        expected = len(answered) + len(valid)
        got_all = dev.wait(lambda d: len(d.terminal_topics) >= expected)
        res.expect(got_all, f"{me}: {len(dev.terminal_topics)} terminal messages, "
                   f"expected {expected}")
        dev.barrier()
        views = dev.views()
        valid_topics = {dev.topic(rid) for rid, _ in valid}
        error_views = [v for t, v in views.items() if t not in valid_topics]
        for v in error_views:
            msgs = v.messages
            res.expect(len(msgs) == 1 and msgs[0].get("type") == "error" and
                       msgs[0].get("seq") == 0 and v.deliveries - v.redelivered == 1,
                       f"{v.topic}: {[m.get('type') for m in msgs]} (one error expected)")
        res.expect(len(error_views) == len(answered),
                   f"{me}: {len(error_views)} errors for {len(answered)} malformed requests")
        for h in answered:
            if h.request_id is not None:
                found = views.get(dev.topic(h.request_id))
                end = (found.terminal if found else None) or {}
                res.expect(end.get("code") == (h.code or end.get("code")),
                           f"{h.kind} {h.payload[:60]!r}: got {end}")
        too_large = sum(1 for v in error_views if (v.terminal or {}).get("code") == "too_large")
        res.expect(too_large == sum(1 for h in answered if h.code == "too_large"),
                   f"{me}: {too_large} too_large errors")
        by_prompt = {}
        if tap is not None:
            by_prompt = {_generation_prompt(x): x for x in tap.generations()}
        for rid, text in valid:
            v = views.get(dev.topic(rid)) or StreamView(dev.topic(rid))
            out.views.append(v)
            res.expect(v.complete and (v.terminal or {}).get("type") == "done",
                       f"valid {rid}: {v.types()}")
            if real:
                gen = by_prompt.get(text)
                res.expect(gen is not None and v.text == gen.sse_text(),
                           f"valid {rid}: text differs from llama-server's")
            else:
                res.expect(v.text == "".join(DEFAULT_TEXTS), f"valid {rid}: {v.text!r}")
        generated = [g.prompt_text() for g in fake.generations] if fake else \
            [_generation_prompt(x) for x in tap.generations()] if tap else []
        res.expect(sorted(generated) == sorted(t for _, t in valid),
                   f"{me}: the backend saw {len(generated)} requests for {len(valid)} valid ones")
        out.counts = [generated.count(t) for _, t in valid]
        out.views += error_views
        # Nothing outside the allowed namespaces, ever.
        for m in list(watcher.messages):
            ok = m.topic in published or m.topic.startswith(
                (f"llm/reply/{me}/", "llm/status/"))
            res.expect(ok, f"{me}: something was published on {m.topic!r}")
        dead = bridge_threads_alive(bridge)
        res.expect(not dead, f"{me}: bridge threads died: {dead}")
        res.expect(bridge.link.connected and bridge.status.started_at == started_at,
                   f"{me}: the bridge's link or process restarted")
        connections = broker.log_path.read_text(errors="replace").count(
            f" as {bridge.cfg.mqtt_client_id} ")
        res.expect(connections == 1, f"{me}: the bridge connected {connections} times")
    return out


def hostile_input(env: Env, sizes: Sizes) -> Result:
    """Malformed and hostile payloads interleaved with valid requests.

    Phase 1 against a fast scripted backend (so thousands are feasible), phase 2 a
    smaller mix against real llama.cpp. Expected: every valid request answered
    correctly; every malformed request answered with exactly one ``error`` (on
    ``P/reply/{client}/{its id or a generated one}``); garbage cancels and requests on
    invalid client topics ignored (nothing to answer, nowhere safe to answer); the
    bridge never restarts (same process, same MQTT connection, every thread alive);
    and a ``#`` subscriber sees nothing published outside ``P/reply/{client}/`` and
    ``P/status/`` (besides what the device itself published).
    """
    res = Result("6. hostile payloads", f"{sizes.hostile} hostile + valid every "
                 f"{sizes.valid_every} (scripted); {sizes.hostile_real} + valid (real model)",
                 "random bytes, invalid UTF-8, deep/huge JSON, wrong types, unknown fields, "
                 "bad ids, foreign Response Topics, garbage cancels, bad client topics")
    with ProcessSampler() as sampler:
        with FakeLlama() as fake:
            fast = _hostile_phase(res, env, fake.url, count=sizes.hostile,
                                  valid_every=sizes.valid_every, real=False, seed=1, fake=fake)
        with HttpTap(env.llama_url()) as tap:
            real = _hostile_phase(res, env, tap.url, count=sizes.hostile_real,
                                  valid_every=max(1, sizes.hostile_real // 3), real=True,
                                  seed=2, tap=tap)
    res.sent = fast.sent + real.sent
    tally(res, fast.views + real.views, fast.counts + real.counts)
    res.max_rss_mb = sampler.max_rss_mb
    res.note(f"scripted: {fast.malformed} malformed, {fast.ignored} ignored by design, "
             f"{fast.valid} valid; real: {real.malformed} malformed, {real.ignored} ignored, "
             f"{real.valid} valid")
    return res.check()


# =========================================================================== 7. duplicates


def duplicate_ids(env: Env, sizes: Sizes) -> Result:
    """Requests repeated with the same id: a QoS 1 redelivery (same request again while it
    runs), a device re-sending after it reconnected (persistent session), and a re-send
    long after the answer.

    Expected: nothing generated twice (the scripted backend counts requests); while the
    first is running the repeat is ignored; once finished, the recorded answer is
    replayed byte for byte (so a device de-duplicating on ``seq`` sees the same stream).
    """
    n = sizes.duplicates
    res = Result("7. duplicate request ids", f"{n} requests × 3 sends + 1 reconnecting device, "
                 "scripted backend (8 tokens, 50 ms apart)",
                 "same id again while running, after a reconnect, after the answer")
    texts = [f" w{i}" for i in range(8)]
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama(
            lambda path, body: stream_script(path, texts, gap_s=0.05)))
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        stack.enter_context(start_bridge(
            broker.host, broker.port, [fake.url], protocol="5", client_max_inflight=1000,
            client_rate_per_min=1_000_000))
        (dev,) = stack.enter_context(devices(broker.host, broker.port, ["dup-dev"]))
        bodies = [{"id": f"d{i}", "prompt": f"duplicate {i}", "max_tokens": 8} for i in range(n)]
        for body in bodies:  # the "redelivery": the same request twice in a row
            dev.request(body)
            dev.request(body)
        topics = [dev.topic(str(b["id"])) for b in bodies]
        res.expect(dev.wait(lambda d: all(t in d.terminal_topics for t in topics)),
                   "not every request ended")
        dev.barrier()
        first = {t: list(dev.by_topic[t]) for t in topics}
        for body in bodies:  # the re-send after the answer: replayed
            dev.request(body)
        res.expect(dev.wait(lambda d: all(len(d.by_topic[t]) >= 2 * len(first[t])
                                          for t in topics)), "answers were not replayed")
        dev.barrier()
        replay_identical = 0
        for t in topics:
            got = dev.by_topic[t]
            original = first[t]
            # de-duplicated by seq, the original stream; the replay repeats it exactly
            if got[len(original):len(original) * 2] == original:
                replay_identical += 1
        res.expect(replay_identical == n, f"{n - replay_identical} replays differ")
        res.note(f"{replay_identical}/{n} replays byte-identical to the original stream")

        # A device that drops mid-stream, reconnects (same client id, persistent
        # session) and re-sends the same request: the broker delivers what it queued,
        # the bridge ignores the repeat of the running request.
        body = {"id": "r1", "prompt": "reconnecting device", "max_tokens": 8}
        mover = Device(broker.host, broker.port, "dup-mover").connect()
        stack.callback(mover.close)
        mover.request(body)
        mover.wait(lambda d: "chunk" in d.view(d.topic("r1")).types(), 60)
        mover.drop()
        early = list(mover.by_topic.get(mover.topic("r1"), []))
        back = Device(broker.host, broker.port, "dup-mover")
        stack.callback(back.close)
        back.connect()
        res.expect(back.session_present[-1], "the broker lost the device's session")
        back.request(body)
        back.wait(lambda d: d.topic("r1") in d.terminal_topics, 60)
        back.barrier()
        seen_again = StreamView(back.topic("r1"))
        for payload in early + back.by_topic.get(back.topic("r1"), []):
            seen_again.add(payload)
        res.expect(seen_again.complete, f"reconnecting device: {seen_again.types()}")
        res.expect(seen_again.text == "".join(texts), f"text {seen_again.text!r}")

        generated = collections.Counter(g.prompt_text() for g in fake.generations)
        counts = [generated[str(b["prompt"])] for b in [*bodies, body]]
        views = [dev.view(t) for t in topics] + [seen_again]
        res.sent = 3 * n + 2
        tally(res, views, counts, streams=len(views))
        res.expect(all(c == 1 for c in counts), f"generated more than once: {counts}")
        res.note(f"backend requests: {sum(counts)} for {len(counts)} distinct requests "
                 f"({res.sent} sends)")
        for v in views:
            res.expect(v.complete and v.conflicts == 0, f"{v.topic}: {v.types()}")
    return res.check()


# =========================================================================== 8. cancel, gone


def _slots(url: str) -> list[dict[str, Any]]:
    return list(requests.get(f"{url}/slots", timeout=10).json())


def _idle(url: str) -> bool:
    return not any(s.get("is_processing") for s in _slots(url))


def cancel_and_gone(env: Env, sizes: Sizes) -> Result:
    """Cancel (running and queued), a device that vanishes, and ``max_generation_s``,
    against real llama.cpp; after each, llama-server's ``/slots`` shows the slot free.

    "Device gone" -- the bridge does not watch devices' Last Wills (it cannot know
    which will belongs to which request). What it can mean here:

    * a device whose Last Will IS a cancel: will topic ``P/cancel/{client}``, payload
      ``{"id": ...}`` of the request it is about to send (the shipped ACL lets a device
      write its own cancel topic). When it vanishes, the broker publishes the will and
      the bridge cancels: the slot is freed at once.
    * a device with no such will: its request runs on until ``max_generation_s`` (or
      ``max_tokens``), which bounds every request; then the slot is freed.
    """
    res = Result("8. cancel, device gone, max_generation_s", "2-slot real server, "
                 "2000-token requests", "cancel running + queued; device vanishes with a "
                 "cancel will / without one (max_generation_s 8 s)")
    url = env.llama_url()
    res.expect(poll_until(lambda: _idle(url), bool, 60), "llama-server busy before the test")
    views: list[StreamView] = []
    with ExitStack() as stack:
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        watcher = Recorder(broker.host, broker.port, topic_filter="llm/reply/#")
        stack.callback(watcher.close)
        with start_bridge(broker.host, broker.port, [url], protocol="5", max_tokens_cap=2000,
                          max_generation_s=120, client_max_inflight=10):
            (dev,) = stack.enter_context(devices(broker.host, broker.port, ["cancel-dev"]))
            for rid in ("c1", "c2", "c3"):
                dev.request(chat_request(rid, f"Count to a thousand ({rid}): one, two,", 2000))
            res.expect(wait_until(lambda: "chunk" in dev.view(dev.topic("c1")).types()),
                       "c1 never streamed")
            start3 = dev.view(dev.topic("c3")).messages
            res.expect(bool(start3) and start3[0].get("queue", 0) > 0, f"c3 not queued: {start3}")
            dev.cancel("c3")  # queued
            dev.cancel("c1")  # running
            for rid in ("c1", "c3"):
                view = dev.wait_terminal(dev.topic(rid), 60)
                views.append(view)
                end = view.terminal or {}
                res.expect(view.complete and end.get("type") == "done"
                           and end.get("finish_reason") == "cancelled", f"{rid}: {end}")
            res.expect("chunk" not in dev.view(dev.topic("c3")).types(), "c3 ran anyway")

            # A device whose Last Will cancels its request, then vanishes mid-stream.
            gone = Device(broker.host, broker.port, "gone-will",
                          will=("llm/cancel/gone-will", b'{"id": "g1"}')).connect()
            stack.callback(gone.close)
            gone.request(chat_request("g1", "Count to a thousand (g1): one, two,", 2000))
            res.expect(gone.wait(lambda d: "chunk" in d.view(d.topic("g1")).types(), 60),
                       "g1 never streamed")
            gone.drop()
            res.expect(watcher.wait_for(lambda ms: _ended(ms, "llm/reply/gone-will/g1"), 60),
                       "the will did not cancel g1")
            g1 = _recorded_view(watcher, "llm/reply/gone-will/g1")
            views.append(g1)
            res.expect((g1.terminal or {}).get("finish_reason") == "cancelled",
                       f"g1 ended with {g1.terminal}")
            dev.cancel("c2")
            views.append(dev.wait_terminal(dev.topic("c2"), 60))
            freed = poll_until(lambda: _idle(url), bool, 30)
            res.expect(freed, f"slots still busy after cancels: {_slots(url)}")

        # No will: only max_generation_s ends it. Long enough for a first token on a
        # loaded two-core machine, where llama.cpp's first token has taken 7 s.
        limit = 8.0
        with start_bridge(broker.host, broker.port, [url], protocol="5", max_tokens_cap=2000,
                          max_generation_s=limit):
            lost = Device(broker.host, broker.port, "gone-silent").connect()
            stack.callback(lost.close)
            lost.request(chat_request("g2", "Count to a thousand (g2): one, two,", 2000))
            res.expect(lost.wait(lambda d: "chunk" in d.view(d.topic("g2")).types(), 60),
                       "g2 never streamed")
            lost.drop()
            res.expect(watcher.wait_for(lambda ms: _ended(ms, "llm/reply/gone-silent/g2"), 60),
                       "max_generation_s did not end g2")
            g2 = _recorded_view(watcher, "llm/reply/gone-silent/g2")
            views.append(g2)
            end = g2.terminal or {}
            res.expect(end.get("code") == "timeout" and "max_generation_s" in
                       str(end.get("message")), f"g2 ended with {end}")
            slots = poll_until(lambda: _slots(url), lambda s: not any(
                x.get("is_processing") for x in s), 30)
            res.expect(not any(x.get("is_processing") for x in slots),
                       f"slot still busy after max_generation_s: {slots}")
            completion = [m for m in g2.messages if m.get("type") == "chunk"]
            res.note(f"g2 streamed {len(completion)} chunks before max_generation_s "
                     f"({limit:g} s) stopped it; slot freed")
    res.sent = 5
    tally(res, views)
    for v in views:
        res.expect(v.complete, f"{v.topic}: {v.types()}")
    return res.check()


def _ended(messages: list[Any], topic: str) -> bool:
    for m in messages:
        if m.topic == topic:
            try:
                if json.loads(m.payload).get("type") in TERMINAL_TYPES:
                    return True
            except ValueError:
                continue
    return False


def _recorded_view(recorder: Recorder, topic: str) -> StreamView:
    view = StreamView(topic)
    for m in recorder.on_topic(topic):
        view.add(m.payload)
    return view


# =========================================================================== 9. security


def acl_bridges() -> list[tuple[str, str]]:
    """The bridge accounts of the shipped ACL: (account, the bridge_id whose status it may
    write -- its own name if the ACL does not say). Read from its ``user bridge@N``
    blocks, so the scenarios follow the shipped file."""
    out: list[tuple[str, str]] = []
    in_bridge = False  # inside a bridge's block (not another account's, an edge link's)
    for line in MOSQUITTO_ACL.read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "user":
            in_bridge = words[1].startswith("bridge@")
            if in_bridge:
                out.append((words[1], words[1]))
        elif in_bridge and len(words) == 3 and words[0] == "topic" and "write" in words[1] \
                and words[2].startswith("llm/status/") and not set("#+") & set(words[2]):
            out[-1] = (out[-1][0], words[2].removeprefix("llm/status/"))
    return out


def _refused(fn: Any) -> str | None:
    """Run ``fn``; the ConnectionError's message if it raised one, else None."""
    try:
        fn()
    except ConnectionError as exc:
        return str(exc)
    return None


def security(env: Env, sizes: Sizes) -> Result:
    """Mosquitto with TLS, a password file and the shipped ACL, with the real bridge.

    What tests/service/test_security.py and tests/mqtt/test_brokers.py do not cover yet:

    * the bridge refuses to run anonymously or with a wrong password (clear error, no
      thread left behind), and fails cleanly against a TLS listener without TLS or
      with the wrong CA;
    * the bridge itself over TLS (the other tests use the loopback listener) serves a
      TLS device end to end;
    * the bridge's own account can do only what it needs: it cannot publish a request
      or a cancel as a device, cannot publish outside ``llm/reply/`` and
      ``llm/status/``, cannot read replies or another prefix;
    * a device cannot read other devices' requests (their prompts) or cancels, cannot
      publish a request in another device's name, and subscribing to ``llm/reply/#`` or
      ``#`` (granted by the broker) yields none of another device's replies.
    """
    res = Result("9. security: TLS, passwords, shipped ACL", "1 TLS device request + "
                 "ACL probes", "anonymous / wrong password / no TLS / wrong CA bridges; "
                 "bridge account probing")
    with ExitStack() as stack:
        (account, bridge_id), (other_account, _) = acl_bridges()[:2]
        users = {"dev-a": "pw-dev-a", "dev-b": "pw-dev-b", account: "pw-bridge-a",
                 other_account: "pw-bridge-b"}
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto"), "secure",
                                                      users=users))
        url = env.llama_url()
        plain = broker.info("5", account)
        threads_before = {t.name for t in threading.enumerate()}

        def run(**mqtt: Any) -> None:
            port = mqtt.pop("port", plain.port)
            with start_bridge(broker.host, port, [url], protocol="5", bridge_id=bridge_id,
                              mqtt_settings={"connect_timeout_s": 5, **mqtt}):
                raise AssertionError("the bridge connected")

        for label, settings in [
            ("anonymous", {}),
            ("wrong password", {"username": account, "password": "wrong"}),
            ("unknown user", {"username": "mallory", "password": "x"}),
            ("no TLS on the TLS port", {"username": account, "password": plain.password,
                                        "port": broker.port}),
            ("wrong CA", {"username": account, "password": plain.password,
                          "port": broker.port, "tls": True,
                          "ca_file": str(broker.ca_file.parent / "client.crt")}),
        ]:
            message = _refused(lambda settings=settings: run(**settings))
            res.expect(message is not None, f"{label}: the bridge was not refused")
            res.note(f"{label}: refused ({(message or '')[:90]})")
        leaked = {t.name for t in threading.enumerate()} - threads_before
        res.expect(not {n for n in leaked if n.startswith("bridge-")},
                   f"threads left behind by refused bridges: {leaked}")

        # The bridge over TLS, serving a TLS device.
        tls = broker.info("5", account, tls=True)
        bridge = stack.enter_context(start_bridge(
            broker.host, tls.port, [url], protocol="5", bridge_id=bridge_id,
            mqtt_settings={"username": account, "password": tls.password, "tls": True,
                           "ca_file": str(broker.ca_file)}))
        dev_a = stack.enter_context(Device(broker.host, broker.port, "dev-a",
                                           username="dev-a", password=broker.users["dev-a"],
                                           ca_file=broker.ca_file))
        dev_b = stack.enter_context(Device(broker.host, broker.port, "dev-b",
                                           username="dev-b", password=broker.users["dev-b"],
                                           ca_file=broker.ca_file))
        for snoop in ("llm/request/#", "llm/cancel/#", "#", "llm/reply/#"):
            # Mosquitto grants the SUBACK and filters by the read ACL per message: the
            # grant is checked so that "nothing arrived" below means "filtered".
            codes = dev_b.subscribe(snoop)
            res.expect(bool(codes) and not any(getattr(c, "is_failure", False) for c in codes),
                       f"dev-b's subscription to {snoop} was refused ({codes}): the "
                       "snooping check below would prove nothing")
        # Device B cannot ask in A's name: the broker refuses the publish.
        forged = dev_b.request({"id": "as-a", "prompt": "forged", "max_tokens": 4},
                               topic="llm/request/dev-a")
        res.expect(dev_b.puback_reason(forged.mid) is not None
                   and dev_b.puback_reason(forged.mid).is_failure,
                   f"dev-b may publish as dev-a (PUBACK {dev_b.puback_reason(forged.mid)})")
        dev_a.request({"id": "secret-1", "prompt": "my secret prompt", "max_tokens": 8})
        dev_a.cancel("no-such-request")
        view = dev_a.wait_terminal(dev_a.topic("secret-1"))
        res.expect(view.complete and (view.terminal or {}).get("type") == "done",
                   f"TLS device through the TLS bridge: {view.types()}")
        dev_b.barrier()
        snooped = [t for t, _ in dev_b.received if not t.startswith("llm/status/")]
        res.expect(not snooped, f"dev-b read {snooped}")

        # Another bridge account (an ACL block like the first's; the first's own name
        # would take over the running bridge's client id): only what a bridge needs.
        probe = stack.enter_context(Device(broker.host, plain.port, other_account,
                                           username=other_account,
                                           password=users[other_account], replies=False))
        for topic in ("llm/reply/#", "llm2/#", "other/#"):
            probe.subscribe(topic)
        refused = {}
        for topic in ("llm/request/dev-a", "llm/cancel/dev-a", "other/x", "llm2/request/x",
                      "$SYS/broker/x", f"llm/status/{bridge_id}"):
            info = probe.client.publish(topic, b'{"id": "forged", "prompt": "forged"}', qos=1)
            info.wait_for_publish(10)
            refused[topic] = probe.puback_reason(info.mid)
        for topic, reason in refused.items():
            res.expect(reason is not None and reason.is_failure,
                       f"the bridge account may publish on {topic} (PUBACK {reason})")
        res.note("bridge account: PUBACK " + ", ".join(
            f"{t}: {r}" for t, r in refused.items()))
        dev_a.request({"id": "secret-2", "prompt": "another secret", "max_tokens": 4})
        dev_a.wait_terminal(dev_a.topic("secret-2"))
        probe.subscribe("llm/status/#")  # a round trip: anything routed to us came before
        leaks = [t for t, _ in probe.received if not t.startswith("llm/status/")]
        res.expect(not leaks, f"the bridge account read {leaks}")
        dev_b.barrier()
        res.expect(not any(t.startswith("llm/reply/dev-a/") for t, _ in dev_b.received),
                   "dev-b read dev-a's replies")
        res.expect(not dev_a.view(dev_a.topic("as-a")).messages,
                   "a request forged in dev-a's name was answered")
        res.expect(bridge.stats["accepted"] == 2,
                   f"the bridge accepted {bridge.stats['accepted']} requests (a forgery got in)")
        res.sent = 2
        tally(res, [view, dev_a.view(dev_a.topic("secret-2"))])
    return res.check()


# =========================================================================== 10. soak


def soak(env: Env, sizes: Sizes) -> Result:
    """Steady load with the real model on the bridge run as a child process
    (``python -m bridge run``), sampling its RSS and open file descriptors.

    Expected: every request answered with ``done``; after a warm-up (the first fifth
    of the run), RSS grows by at most 16 MiB and open descriptors by at most 4 --
    flat, not creeping (reported: first / last / max).
    """
    duration = sizes.soak_s
    k = sizes.soak_streams
    res = Result(f"10. soak ({duration / 60:g} min)" if duration >= 60 else
                 f"10. soak smoke ({duration:g} s)",
                 f"{k} devices back to back, 24-token answers, real model, bridge process",
                 "none (steady load)")
    settings = {"BRIDGE_MAX_TOKENS_CAP": "24", "BRIDGE_DEDUPE_TTL_S": "60"}
    if sizes.name == "short":
        # The smoke run must not flake on bug B7 (a probe on a stale keep-alive connection);
        # the long form keeps the default health_interval_s, which is how it was found.
        settings["BRIDGE_LLAMA__HEALTH_INTERVAL_S"] = "2"
    with ExitStack() as stack:
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        workdir = env.dir("soak")
        log_path = workdir / "bridge.log"
        proc = stack.enter_context(bridge_process(
            broker.host, broker.port, env.llama_url(), workdir, bridge_id="soak",
            protocol="auto", settings=settings))
        sampler = stack.enter_context(ProcessSampler(proc.pid, interval=min(5.0, duration / 20)))
        devs = stack.enter_context(devices(broker.host, broker.port,
                                           [f"soak-{i}" for i in range(k)]))
        stop_at = time.monotonic() + duration
        outcomes: list[tuple[str, StreamView]] = []
        lock = threading.Lock()
        errors: list[BaseException] = []

        def drive(dev: Device) -> None:
            i = 0
            try:
                while time.monotonic() < stop_at and proc.poll() is None:
                    rid = f"q{i}"
                    dev.request(chat_request(rid, f"{prompt(i)} ({dev.name})", 24))
                    view = dev.wait_terminal(dev.topic(rid), 120)
                    with lock:
                        outcomes.append((rid, view))
                    i += 1
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(d,), name=f"soak-{d.name}")
                   for d in devs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 300)
        sampler.stop()
        res.expect(not errors, f"device errors: {errors[:3]}")
        res.expect(proc.poll() is None, f"the bridge process exited ({proc.returncode})")
        views = [v for _, v in outcomes]
        res.sent = len(views)
        tally(res, views)
        ends = collections.Counter(str((v.terminal or {}).get("code") or
                                       (v.terminal or {}).get("type")) for v in views)
        res.note("outcomes: " + ", ".join(f"{k} × {c}" for k, c in sorted(ends.items())))
        bad = [(rid, v.terminal) for rid, v in outcomes
               if not (v.complete and (v.terminal or {}).get("type") == "done")]
        res.expect(not bad, f"{len(bad)} requests not answered with done, e.g. {bad[:2]}")
        if bad:
            warnings = [line for line in log_path.read_text(errors="replace").splitlines()
                        if "WARNING" in line or "ERROR" in line]
            res.note("bridge log: " + " | ".join(w[:300] for w in warnings[:5]))
        samples = sampler.samples
        warm = samples[max(1, len(samples) // 5)]
        last = samples[-1]
        mib = 2**20
        res.max_rss_mb = max(s.rss for s in samples) / mib
        res.note(f"{len(samples)} samples; RSS first/after warm-up/last/max "
                 f"{samples[0].rss / mib:.1f}/{warm.rss / mib:.1f}/{last.rss / mib:.1f}/"
                 f"{res.max_rss_mb:.1f} MiB; fds first/last/max {samples[0].fds}/{last.fds}/"
                 f"{max(s.fds for s in samples)}")
        res.note(f"{len(views)} requests in {duration:g} s "
                 f"({len(views) / duration * 60:.0f}/min)")
        res.expect(last.rss - warm.rss <= 16 * mib,
                   f"RSS crept {(last.rss - warm.rss) / mib:.1f} MiB after warm-up")
        res.expect(last.fds - warm.fds <= 4, f"open fds crept {warm.fds} → {last.fds}")
    return res.check()


def bridge_account_as_device(env: Env, sizes: Sizes) -> Result:
    """A bridge account must not be usable as a device: it has no business asking the
    LLM, and a leaked bridge password should not also be an LLM account.

    Uses the account names of the shipped ACL's ``user`` blocks (so renaming them there
    is enough for this to pass). Expected: a request published by the second bridge
    account in its own name is refused by the broker or ignored by the bridge.
    """
    bridges = acl_bridges()
    names = [name for name, _ in bridges]
    res = Result("9b. bridge account used as a device", "1 request",
                 f"bridge account {names[1]!r} asks in its own name")
    users = {name: f"pw-{i}" for i, name in enumerate(names)} | {"dev-a": "pw-dev-a"}
    with ExitStack() as stack:
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto"), "secure",
                                                      users=users))
        first = broker.info("5", names[0])
        fake = stack.enter_context(FakeLlama())
        bridge = stack.enter_context(start_bridge(
            broker.host, first.port, [fake.url], protocol="5", bridge_id=bridges[0][1],
            mqtt_settings={"username": names[0], "password": users[names[0]]}))
        other = stack.enter_context(Device(broker.host, first.port, names[1],
                                           username=names[1], password=users[names[1]]))
        dev = stack.enter_context(Device(broker.host, first.port, "dev-a", username="dev-a",
                                         password=users["dev-a"]))
        info = other.request({"id": "as-device", "prompt": "free tokens?", "max_tokens": 4})
        reason = other.puback_reason(info.mid)
        # A device's request published after that one was acknowledged reaches the bridge
        # after it: once it is answered, the bridge has dealt with the first.
        dev.request({"id": "marker", "prompt": "marker", "max_tokens": 4})
        dev.wait_terminal(dev.topic("marker"), 30)
        other.barrier()
        res.sent = 1
        served = [g for g in fake.generations if g.prompt_text() != "marker"]
        res.note(f"PUBACK {reason}; bridge accepted {bridge.stats['accepted'] - 1}; "
                 f"generations {len(served)}")
        res.terminal = len(other.terminal_topics)
        res.expect(bridge.stats["accepted"] == 1 and not served,
                   f"the bridge served {names[1]!r} as a device (the ACL's device patterns "
                   "apply to every account)")
    return res.check()


def oversized_correlation_data(env: Env, sizes: Sizes) -> Result:
    """One device sends MQTT 5 Correlation Data big enough that the bridge's replies, which
    echo it, exceed the broker's Maximum Packet Size.

    The bridge promises never to publish over the broker's limit (an oversized publish
    makes the broker disconnect it, and paho then reconnects and re-sends the same
    packet forever). Expected: that request gets one error it can receive (or its replies
    fit), and the bridge stays connected and keeps serving another device.
    """
    limit = 8192  # a broker configured with a modest max_packet_size
    res = Result("6b. oversized Correlation Data", "1 hostile + 1 victim request, scripted "
                 "backend", f"Correlation Data of 8000 bytes; broker max_packet_size {limit}")
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama())
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto"),
                                                      extra_conf=f"max_packet_size {limit}"))
        bridge = stack.enter_context(start_bridge(broker.host, broker.port, [fake.url],
                                                  protocol="5"))
        hostile, victim = stack.enter_context(devices(broker.host, broker.port,
                                                      ["corr-hostile", "corr-victim"]))
        hostile.request({"id": "big", "prompt": "x", "max_tokens": 4},
                        props=v5_props(correlation=b"c" * 8000))
        victim.request({"id": "v1", "prompt": "y", "max_tokens": 4})

        def oversize_kicks() -> int:
            return broker.log_path.read_text(errors="replace").count("oversize packet")

        # Served, or visibly stuck: the broker has kicked the bridge out three times.
        wait_until(lambda: victim.has_terminal(victim.topic("v1")) or oversize_kicks() >= 3, 60)
        served = victim.has_terminal(victim.topic("v1"))
        answered = served and hostile.wait(lambda d: bool(d.terminal_topics), 10)
        res.sent = 2
        connections = broker.log_path.read_text(errors="replace").count(
            f" as {bridge.cfg.mqtt_client_id} ")
        res.note(f"the bridge connected {connections} times; oversize disconnects: "
                 f"{oversize_kicks()}")
        res.expect(served, "the victim was not served: the bridge is stuck reconnecting")
        res.expect(connections == 1, f"the bridge was disconnected ({connections} connections)")
        res.expect(answered, "the hostile request got no terminal message")
        views = [*hostile.views().values(), victim.view(victim.topic("v1"))]
        tally(res, views, streams=2)
    return res.check()


class _RequestLog(logging.Handler):
    """Collects the bridge's request log lines (``bridge.requests``) of one scenario."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._logger = logging.getLogger("bridge.requests")

    def __enter__(self) -> _RequestLog:
        self._logger.addHandler(self)
        self._level = self._logger.level
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def of(self, request_id: str) -> str:
        return next((ln for ln in self.lines if f"id={request_id} " in ln), "")


def _poison_case(res: Result, env: Env, name: str, *, protocol: Literal["5", "3.1.1"],
                 broker_conf: str, request: dict[str, Any], props: Properties | None,
                 llama: FakeLlama, expect_code: str, **bridge_settings: Any) -> list[StreamView]:
    """One device sends a request whose replies the broker refuses; another device asks
    right after. Checks what each device receives, the bridge's connections and its log.

    Returns:
        what the other device and the hostile one received (on the default reply topic).
    """
    broker = MosquittoProcess(env.dir(f"mosquitto-{name}"), extra_conf=broker_conf)
    with ExitStack() as stack, _RequestLog() as requests_log:
        stack.enter_context(broker)
        bridge = stack.enter_context(start_bridge(broker.host, broker.port, [llama.url],
                                                  protocol=protocol, **bridge_settings))
        hostile, victim = stack.enter_context(devices(
            broker.host, broker.port, [f"{name}-h", f"{name}-v"], protocol=protocol))
        hostile.request(request, props=props)
        started = time.monotonic()
        victim.request({"id": "v1", "prompt": "y", "max_tokens": 4})
        served = victim.wait(lambda d: d.has_terminal(d.topic("v1")), 60)
        served_s = time.monotonic() - started
        answered = hostile.wait(lambda d: d.has_terminal(d.topic(request["id"])), 30)
        hostile_view = hostile.view(hostile.topic(request["id"]))
        # The request log line follows the terminal message by at most the confirm wait.
        wait_until(lambda: bool(requests_log.of(request["id"])), 10)
        line = requests_log.of(request["id"])
        connections = broker.log_path.read_text(errors="replace").count(
            f" as {bridge.cfg.mqtt_client_id} ")
        terminal = hostile_view.terminal or {}
        res.note(f"{name}: the bridge connected {connections} times; the other device was "
                 f"served {served_s:.1f} s after the refused request; the refused request "
                 f"ended with {terminal.get('type')}/{terminal.get('code')} after "
                 f"{hostile_view.missing} lost message(s); its log line: "
                 f"{line[line.find('outcome='):][:60]!r}")
        res.expect(served, f"{name}: the other device was not served: the bridge is stuck")
        res.expect(answered and terminal.get("code") == expect_code,
                   f"{name}: the refused request did not end with a {expect_code} error "
                   f"on its default reply topic: {hostile_view.messages}")
        res.expect(connections <= 4, f"{name}: {connections} connections: a reconnect loop")
        dead = bridge_threads_alive(bridge)
        res.expect(not dead, f"{name}: bridge threads died: {dead}")
        if expect_code == "internal":
            res.expect("outcome=publish_failed" in line,
                       f"{name}: the request log does not say publish_failed: {line!r}")
        return [victim.view(victim.topic("v1")), hostile_view]


def poison_publish(env: Env, sizes: Sizes) -> Result:
    """Publishes the broker answers by closing the connection (Mosquitto 2.0).

    Three cases, each with a second device asking right after the hostile request:

    * an MQTT 5 Response Topic of 202 levels (Mosquitto disconnects a client publishing
      more than 200): refused at intake with ``bad_request`` naming the limit, sent to
      the default reply topic; the bridge never publishes on the deep topic;
    * the same request with the intake's level limit lifted, standing for any refusal
      the intake does not know: the bridge must drop the refused stream after at most
      two reconnects, end the request with an ``error`` on its default reply topic, log
      ``outcome=publish_failed``, and serve the other device;
    * a payload the broker refuses (MQTT 3.1.1, so the broker's ``max_packet_size`` is
      not announced; a non-streamed reply bigger than it) on the default reply topic.
    """
    res = Result("6d. publish the broker refuses (poison message)",
                 "3 hostile + 3 victim requests, scripted backend, QoS 1",
                 "202-level Response Topic (with and without the intake check); reply over "
                 "an unannounced max_packet_size")
    deep = "llm/reply/{name}-h/" + "l/" * 198 + "l"
    views: list[StreamView] = []
    with FakeLlama() as fake:
        for name, lifted in (("deeprt", False), ("deeprt-lifted", True)):
            with ExitStack() as patches:
                if lifted:
                    patches.enter_context(_patched(bridge_topics, "MAX_TOPIC_LEVELS", 10_000))
                views += _poison_case(res, env, name, protocol="5", broker_conf="", llama=fake,
                                      request={"id": "deep", "prompt": "x", "max_tokens": 4},
                                      props=v5_props(response_topic=deep.format(name=name)),
                                      expect_code="internal" if lifted else "bad_request")

    def long_reply(path: str, body: dict[str, Any]) -> list[Action]:
        if body.get("stream"):
            return stream_script(path)
        choice = {"index": 0, "finish_reason": "stop", "text": "w" * 3000}
        return [Respond(200, {"choices": [choice],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 3000}})]

    with FakeLlama(long_reply) as fake:
        views += _poison_case(res, env, "oversize", protocol="3.1.1",
                              broker_conf="max_packet_size 2048", llama=fake,
                              request={"id": "big", "prompt": "x", "max_tokens": 4,
                                       "stream": False},
                              props=None, expect_code="internal")
    res.sent = len(views)
    # The refused messages of the hostile requests count as lost: they never arrived.
    tally(res, views)
    return res.check()


@contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def non_finite_numbers(env: Env, sizes: Sizes) -> Result:
    """``NaN`` / ``Infinity`` are not JSON, but Python's parser accepts them. Where the
    schema does not bound a number (``tools``, ``tool_choice``, message ``tool_calls``)
    they pass validation and are forwarded to llama-server as invalid JSON.

    Expected: ``bad_request`` from the bridge, nothing sent to the backend.
    """
    res = Result("6c. non-finite numbers in JSON", "3 requests, scripted backend",
                 "NaN / Infinity inside tools / tool_choice / tool_calls")
    bodies = [
        b'{"id": "n1", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
        b'"function", "function": {"name": "f", "parameters": {"x": NaN}}}]}',
        b'{"id": "n2", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
        b'"function", "function": {"name": "f"}}], "tool_choice": {"x": Infinity}}',
        b'{"id": "n3", "messages": [{"role": "assistant", "tool_calls": [{"x": -Infinity}]}, '
        b'{"role": "user", "content": "hi"}]}',
    ]
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama())
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        stack.enter_context(start_bridge(broker.host, broker.port, [fake.url], protocol="5"))
        (dev,) = stack.enter_context(devices(broker.host, broker.port, ["nan-dev"]))
        for body in bodies:
            dev.request(body)
        res.expect(dev.wait(lambda d: len(d.terminal_topics) >= len(bodies), 30),
                   f"{len(dev.terminal_topics)} answers for {len(bodies)} requests")
        dev.barrier()
        views = list(dev.views().values())  # errors of unreadable ids go to generated ids
        res.sent = len(bodies)
        tally(res, views)
        for view in views:
            end = view.terminal or {}
            res.note(f"{view.topic.rsplit('/', 1)[-1]}: {end.get('code') or end.get('type')}")
            res.expect(end.get("code") == "bad_request", f"{view.topic}: {end}")
        res.expect(not fake.generations,
                   f"{len(fake.generations)} requests with NaN/Infinity reached the backend")
    return res.check()


def retained_request(env: Env, sizes: Sizes) -> Result:
    """A device publishes its request with the retain flag (a UI checkbox, a Node-RED
    default...). The broker then hands it to the bridge again on every subscription --
    each time the bridge restarts -- and the bridge's duplicate cache lives in memory.

    Expected: the request is generated once, not once per bridge start.
    """
    res = Result("7b. retained request", "1 retained request, 3 bridge starts, scripted "
                 "backend", "bridge restarted twice (same id, persistent session)")
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama())
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        (dev,) = stack.enter_context(devices(broker.host, broker.port, ["retain-dev"]))
        for start in range(3):
            with start_bridge(broker.host, broker.port, [fake.url], protocol="5",
                              bridge_id="retain-bridge") as bridge:
                if start == 0:
                    dev.client.publish("llm/request/retain-dev",
                                       b'{"id": "r1", "prompt": "retained", "max_tokens": 4}',
                                       qos=1, retain=True).wait_for_publish(30)
                    dev.wait_terminal(dev.topic("r1"), 30)
                # A marker request after the bridge subscribed: the broker sent it any
                # retained request before the marker, so once the marker is answered and
                # the bridge is idle, a re-run of the retained one has finished too.
                dev.request({"id": f"m{start}", "prompt": "marker", "max_tokens": 4})
                dev.wait_terminal(dev.topic(f"m{start}"), 30)
                wait_until(functools.partial(bridge_idle, bridge), 30)
        dev.barrier()
        res.sent = 1
        gens = sum(1 for g in fake.generations if g.prompt_text() == "retained")
        view = dev.view(dev.topic("r1"))
        tally(res, [view], [gens])
        res.note(f"generated {gens} times; the device received {view.deliveries} messages "
                 f"for a {len(view.by_seq)}-message answer")
        res.expect(gens == 1, f"the retained request was generated {gens} times")
    return res.check()


def broker_stops_reading(env: Env, sizes: Sizes) -> Result:
    """The broker stops taking the bridge's packets (a one-way stall: a TCP relay holds
    what the bridge sends) while it keeps delivering requests, cancels -- and a flood of
    10,000 QoS 0 junk messages -- to the bridge. Then the stall ends.

    Nothing is acknowledged, so the publish window fills up. ``MqttLink.publish`` says
    intake messages never wait for it, because the intake thread must not depend on
    paho's network thread -- which blocks handing messages to intake once its queue
    (10,000) is full. The request sent during the stall waits behind the long one
    (one worker) and is cancelled while queued, so the intake thread itself answers it
    (``done``, ``cancelled``). The bridge runs as a child process: if it deadlocks, the
    test still ends. Expected: the cancel of the running request takes effect during
    the stall (the scripted backend sees its connection closed), and once the stall
    ends every request is answered.
    """
    flood = 10_000  # the intake queue's bound (bridge.service.admission.INTAKE_BOUND)
    res = Result("4c. broker stops reading (one-way stall) + flood",
                 f"1 long stream, 1 queued request, 2 cancels, {flood} QoS 0 junk messages, "
                 "scripted backend, bridge process", "bridge→broker direction held, released")
    texts = [f" t{i}" for i in range(3000)]
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama(
            lambda path, body: stream_script(path, texts, gap_s=0.005)
            if "long" in json.dumps(body) else stream_script(path)))
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        relay = stack.enter_context(TcpRelay(broker.host, broker.port))
        stack.enter_context(bridge_process(
            relay.host, relay.port, fake.url, env.dir("bridge"), bridge_id="stall-bridge",
            settings={"BRIDGE_MQTT__MAX_QUEUED": "10", "BRIDGE_MAX_CONCURRENT": "1",
                      "BRIDGE_FLUSH_MS": "0", "BRIDGE_MAX_TOKENS_CAP": "3000",
                      "BRIDGE_MAX_GENERATION_S": "120", "BRIDGE_CLIENT_MAX_INFLIGHT": "100",
                      "BRIDGE_CLIENT_RATE_PER_MIN": "1000000",
                      "BRIDGE_LLAMA__HEALTH_INTERVAL_S": "2"}))
        dev, spammer = stack.enter_context(devices(broker.host, broker.port,
                                                   ["stall-dev", "stall-spam"]))
        dev.request(chat_request("long", "a long answer please", 3000))
        res.expect(wait_until(lambda: "chunk" in dev.view(dev.topic("long")).types()),
                   "the long stream never started")
        relay.hold_upstream()
        cancelled = False
        try:
            # The backend keeps offering tokens; once the bridge has sent no PUBLISH for a
            # second, it is blocked on its full window (nothing is acknowledged).
            res.expect(wait_until(lambda: relay.last_held_publish is not None and
                                  time.monotonic() - relay.last_held_publish > 1.0, 30),
                       "the bridge did not fill its window")
            dev.request(chat_request("second", "a short one", 8))
            dev.cancel("second")
            dev.cancel("long")
            gen = fake.wait_generations(1, 10)[0]
            cancelled = gen.client_closed.wait(10)
            res.expect(cancelled, "a cancel received during the stall was not acted on: the "
                       "intake thread is waiting for the publish window")
            for i in range(flood):
                spammer.client.publish("llm/request/stall-spam", f"junk {i}".encode(), qos=0)
            spammer.barrier()
        finally:
            relay.release()
        ended = dev.wait(lambda d: {d.topic("long"), d.topic("second")} <= d.terminal_topics,
                         20)
        res.expect(ended, "after the stall, requests were not answered (deadlock)")
        views = [dev.view(dev.topic("long")), dev.view(dev.topic("second"))]
        res.sent = 2
        tally(res, views)
        res.note(f"held {relay.held_publishes} PUBLISH packets ({relay.held_bytes} bytes); "
                 "cancel acted on during the stall: "
                 f"{cancelled}; answered after it: {ended}")
        for view in views:
            res.expect(view.complete, f"{view.topic}: {view.types()[-3:]}")
        if ended:
            res.expect([m.get("finish_reason") for m in (views[1].terminal or {},)] ==
                       ["cancelled"], f"second: {views[1].terminal}")
    return res.check()


def _window_full_at(bridge: Bridge, limit: int) -> bool:
    return bridge.link.outstanding >= limit


def stop_while_broker_frozen(env: Env, sizes: Sizes) -> Result:
    """The operator stops the bridge (``Bridge.stop()``, what SIGTERM does) while the broker
    is frozen and the publish window is full, with requests running and queued.

    Expected: the bridge stops within a bounded time (it cannot tell devices anything
    while the broker is gone; it must not hang waiting for room that never comes).
    """
    res = Result("4d. stop while the broker is frozen", "1 running + 2 queued requests, "
                 "scripted backend, max_queued 10", "SIGSTOP broker, then Bridge.stop()")
    texts = [f" t{i}" for i in range(3000)]
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama(functools.partial(_fixed_stream, texts)))
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        bridge_cm = start_bridge(broker.host, broker.port, [fake.url], protocol="5",
                                 max_concurrent=1, max_tokens_cap=3000, flush_ms=0,
                                 client_max_inflight=10, mqtt_settings={"max_queued": 10})
        bridge = bridge_cm.__enter__()
        stopped = threading.Event()

        def stop_bridge() -> None:
            try:
                bridge_cm.__exit__(None, None, None)
            finally:
                stopped.set()

        (dev,) = stack.enter_context(devices(broker.host, broker.port, ["stop-dev"]))
        for rid in ("a", "b", "c"):
            dev.request(chat_request(rid, f"answer {rid}", 3000))
        res.sent = 3
        res.expect(wait_until(lambda: "chunk" in dev.view(dev.topic("a")).types()),
                   "nothing streamed")
        broker.pause()
        stopper = threading.Thread(target=stop_bridge, name="bridge-stopper", daemon=True)
        try:
            res.expect(wait_until(functools.partial(_window_full_at, bridge, 10), 30),
                       "the window never filled")
            started = time.monotonic()
            stopper.start()
            done = stopped.wait(30)
            res.note(f"Bridge.stop() returned: {done}, after {time.monotonic() - started:.1f} s")
            res.expect(done, "Bridge.stop() still blocked 30 s later")
        finally:
            broker.resume()  # lets a hung stop() finish, so nothing is left behind
            if stopper.ident is None:
                stop_bridge()
            else:
                stopper.join(120)
    return res.check()


def stale_keepalive_probe(env: Env, sizes: Sizes) -> Result:
    """A health probe sent on a pooled keep-alive connection that the server is closing.

    llama-server closes an idle keep-alive connection after 5 s -- the default
    ``health_interval_s`` -- so a probe can go out on a connection the server closes
    without answering (under load its keep-alive timer fires late; the soak hit it).
    The scripted server reproduces the outcome every time: it keeps probe connections
    open and closes one, unanswered, when the next request arrives on it. Expected:
    the probe tries a new connection (GET is idempotent; RFC 9112 §9.3.1 allows the
    retry), the backend stays healthy and requests are served throughout.
    """
    res = Result("2c. health probe on a stale keep-alive connection",
                 "probes every 0.2 s while idle, then 20 requests, scripted backend",
                 "server closes reused keep-alive connections unanswered")
    with ExitStack() as stack:
        fake = stack.enter_context(FakeLlama(stale_keepalive=True))
        broker = stack.enter_context(MosquittoProcess(env.dir("mosquitto")))
        bridge = stack.enter_context(start_bridge(
            broker.host, broker.port, [fake.url], protocol="5", client_max_inflight=100,
            llama_settings={"health_interval_s": 0.2}))
        (dev,) = stack.enter_context(devices(broker.host, broker.port, ["probe-dev"]))
        probes = _HealthWatch(bridge)
        stack.enter_context(probes)
        # Idle first: only the probes use the connection pool (a request would take, and
        # retry, the stale connection before the next probe gets it).
        res.expect(wait_until(lambda: fake.stale_closes >= 9, 60), "too few probes")
        views = []
        for i in range(20):
            dev.request({"id": f"p{i}", "prompt": "hello", "max_tokens": 4})
            views.append(dev.wait_terminal(dev.topic(f"p{i}"), 30))
        res.sent = 20
        tally(res, views)
        codes = collections.Counter(str((v.terminal or {}).get("code") or
                                        (v.terminal or {}).get("type")) for v in views)
        res.note(f"{fake.stale_closes} stale connections closed by the server; outcomes: "
                 + ", ".join(f"{k} × {c}" for k, c in sorted(codes.items())))
        res.note(f"the backend was marked unhealthy {probes.downs} times")
        res.expect(fake.stale_closes > 0, "the server never closed a reused connection")
        res.expect(probes.downs == 0, f"a healthy backend was marked unhealthy {probes.downs} "
                   "times by probes on stale keep-alive connections")
        res.expect(codes.get("done", 0) == 20, "requests failed while the backend was up")
    return res.check()


class _HealthWatch:
    """Counts how often the first backend goes from healthy to unhealthy (sampled)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.downs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler-health", daemon=True)

    def __enter__(self) -> _HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        was = True
        while not self._stop.wait(0.005):
            now = self.bridge.pool.backends[0].healthy
            self.downs += int(was and not now)
            was = now
