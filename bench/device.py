"""The MQTT side of a benchmark cell, in its own process: devices and a counting subscriber.

``streams`` mode: ``N`` devices (distinct client names, so the bridge's per-client
limits do not throttle them) each keep one request in flight: when its terminal
message arrives the device asks again, until ``duration`` is up (closed loop). One
paho client subscribed to ``P/reply/#`` counts every reply message, its bytes and
its tokens (:mod:`bench.fake_llama` tokens: one per space), checks ``seq``
(contiguous, no duplicates), and measures each request's time to first chunk and
each token's latency from the fake server's write to its receipt here.

``count`` mode: only subscribe to a topic and count what arrives (the raw
publisher's limit, :mod:`bench.rawpub`).

Rates are measured over a window that skips the ramp-up (``warmup``), and the
same window is used to read the CPU time and RSS of the processes named with
``--watch NAME=PID`` (psutil), so "bridge CPU per token" divides the bridge's CPU
time by the tokens that arrived in the same interval.

Protocol with the parent: one JSON line ``{"ready": true}`` on stdout once
subscribed, one JSON line with the results at the end. Everything is bounded by
``duration + drain`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.fake_llama.fast import STAMP_MASK, token_latencies_ms

_LAT_CAP = 200_000  # latencies kept (a stride sample beyond that)
_STALL_S = 3.0  # a running request silent this long counts as stalled (starved)


def no_delay(client: mqtt.Client) -> mqtt.Client:
    """Turn Nagle's algorithm off on ``client``'s socket, as the bridge does (paho leaves it
    on, and a small publish then waits up to 40 ms for the broker's delayed ACK)."""
    def opened(c: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = opened
    return client


def pct(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank), or None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


class Watch:
    """CPU time and RSS of other processes over the measurement window."""

    def __init__(self, specs: list[str]) -> None:
        self.procs: dict[str, psutil.Process] = {}
        for spec in specs:
            name, _, pid = spec.partition("=")
            with contextlib.suppress(psutil.Error, ValueError):
                self.procs[name] = psutil.Process(int(pid))
        self.procs["device"] = psutil.Process()
        self.cpu0: dict[str, float] = {}
        self.cpu1: dict[str, float] = {}
        self.rss_peak: dict[str, int] = {}
        self.rss0: dict[str, int] = {}

    def _cpu(self) -> dict[str, float]:
        t = psutil.cpu_times()  # the whole machine, to tell others' load from ours
        out = {"machine": t.user + t.nice + t.system + getattr(t, "irq", 0)
               + getattr(t, "softirq", 0) + getattr(t, "steal", 0)}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def rss(self) -> dict[str, int]:
        out = {}
        for name, p in self.procs.items():
            with contextlib.suppress(psutil.Error):
                out[name] = p.memory_info().rss
        return out

    def start(self) -> None:
        self.rss0 = self.rss()
        self.cpu0 = self._cpu()

    def sample(self) -> None:
        for name, value in self.rss().items():
            self.rss_peak[name] = max(self.rss_peak.get(name, 0), value)

    def stop(self) -> None:
        self.cpu1 = self._cpu()
        self.sample()

    def report(self, seconds: float) -> dict[str, Any]:
        """CPU seconds and % of one core per process over the window; ``machine`` is all
        processes together and ``others`` the machine minus the watched ones."""
        out = {name: {"cpu_s": round(self.cpu1[name] - self.cpu0[name], 4),
                       "cpu_pct": round(100 * (self.cpu1[name] - self.cpu0[name]) / seconds, 1),
                       "rss_start": self.rss0.get(name), "rss_peak": self.rss_peak.get(name)}
               for name in self.cpu1 if name in self.cpu0}
        if "machine" in out:
            ours = sum(v["cpu_s"] for k, v in out.items() if k != "machine")
            others = max(0.0, out["machine"]["cpu_s"] - ours)
            out["others"] = {"cpu_s": round(others, 4), "cpu_pct": round(100 * others / seconds, 1),
                             "rss_start": None, "rss_peak": None}
        return out


class _Req:
    __slots__ = ("first", "last", "next_seq", "sent", "stalled", "tokens")

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.first: float | None = None
        self.last = sent
        self.next_seq = 0
        self.tokens = 0
        self.stalled = False


class Devices:
    """The closed-loop devices and the counting subscriber (``streams`` mode)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.reply_prefix = f"{a.prefix}/reply/"
        self.names = [f"{a.cell}d{i}" for i in range(a.streams)]
        self.counter = dict.fromkeys(self.names, 0)
        self.reqs: dict[tuple[str, str], _Req] = {}
        self.lock = threading.Lock()
        self.t_stop = float("inf")
        self.w0 = self.w1 = float("inf")
        self.in_window = False
        self.msgs = self.bytes = self.tokens = 0  # in the window
        self.all_msgs = self.all_tokens = 0
        self.kinds: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.seq_gaps = self.seq_dups = 0
        self.completed = self.stalled = 0
        self.max_gap = 0.0  # longest silence of a streaming request in the window
        self.ttft: list[float] = []
        self.total_ms: list[float] = []
        self.lat: list[float] = []
        self.lat_stride = 1
        self.lat_skip = 0
        self.chunk_payload_bytes: list[int] = []
        self.ready = threading.Event()
        self.c = no_delay(mqtt.Client(CallbackAPIVersion.VERSION2,
                                      client_id=f"bench-dev-{a.cell}", protocol=mqtt.MQTTv311))
        self.c.max_inflight_messages_set(1000)
        self.c.on_connect = lambda c, *_: c.subscribe(self.reply_prefix + "#", qos=a.qos)
        self.c.on_subscribe = lambda *_: self.ready.set()
        self.c.on_message = self.on_message

    def send(self, name: str, now: float) -> None:
        k = self.counter[name]
        self.counter[name] = k + 1
        rid = f"r{k}"
        self.reqs[(name, rid)] = _Req(now)
        body = {"id": rid, "messages": [{"role": "user", "content": self.a.prompt}],
                "max_tokens": self.a.max_tokens}
        self.c.publish(f"{self.a.prefix}/request/{name}", json.dumps(body), qos=1)

    def on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        topic = msg.topic
        if not topic.startswith(self.reply_prefix):
            return
        rest = topic[len(self.reply_prefix):]
        name, _, rid = rest.partition("/")
        payload = msg.payload
        try:
            m = json.loads(payload)
        except ValueError:
            self.errors["undecodable"] = self.errors.get("undecodable", 0) + 1
            return
        kind = m.get("type")
        with self.lock:
            req = self.reqs.get((name, rid))
            if req is None:
                return  # another cell's leftovers
            seq = m.get("seq")
            if seq != req.next_seq:
                if isinstance(seq, int) and seq > req.next_seq:
                    self.seq_gaps += seq - req.next_seq
                else:
                    self.seq_dups += 1
                    return
            req.next_seq = (seq if isinstance(seq, int) else req.next_seq) + 1
            if req.first is not None and self.w0 <= now < self.w1:
                self.max_gap = max(self.max_gap, now - req.last)
            req.last = now
            self.all_msgs += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            win = self.w0 <= now < self.w1
            if win:
                self.msgs += 1
                self.bytes += len(payload)
            if kind == "chunk":
                text = m.get("text") or ""
                n = text.count(" ")
                req.tokens += n
                self.all_tokens += n
                if req.first is None:
                    req.first = now
                    self.ttft.append((now - req.sent) * 1000)
                if win:
                    self.tokens += n
                    if len(self.chunk_payload_bytes) < 50_000:
                        self.chunk_payload_bytes.append(len(payload))
                    self.lat_skip += 1
                    if self.lat_skip >= self.lat_stride:
                        self.lat_skip = 0
                        units = (time.monotonic_ns() // 100_000) & STAMP_MASK
                        self.lat += token_latencies_ms(text, units)
                        if len(self.lat) > _LAT_CAP:
                            self.lat = self.lat[::2]
                            self.lat_stride *= 2
            elif kind in ("done", "reply", "error"):
                if kind == "error":
                    code = str(m.get("code"))
                    self.errors[code] = self.errors.get(code, 0) + 1
                else:
                    self.completed += 1
                    self.total_ms.append((now - req.sent) * 1000)
                del self.reqs[(name, rid)]
                if now < self.t_stop:
                    self.send(name, now)

    def run(self) -> dict[str, Any]:
        a = self.a
        watch = Watch(a.watch)
        self.c.connect(a.host, a.port, keepalive=60)
        self.c.loop_start()
        try:
            if not self.ready.wait(10):
                raise SystemExit("device: no SUBACK within 10 s")
            print(json.dumps({"ready": True}), flush=True)
            t0 = time.monotonic()
            self.w0, self.w1 = t0 + a.warmup, t0 + a.duration
            self.t_stop = self.w1
            with self.lock:
                for name in self.names:
                    self.send(name, time.monotonic())
            while time.monotonic() < self.w0:
                time.sleep(0.005)
            watch.start()
            while (now := time.monotonic()) < self.w1:
                time.sleep(min(0.25, self.w1 - now))
                watch.sample()
                self._unstall(time.monotonic())
            watch.stop()
            window = self.w1 - self.w0
            end = time.monotonic() + a.drain
            while self.reqs and time.monotonic() < end:
                time.sleep(0.05)
        finally:
            self.c.disconnect()
            self.c.loop_stop()
        sizes = self.chunk_payload_bytes
        return {
            "mode": "streams", "cell": a.cell, "streams": a.streams, "window_s": round(window, 3),
            "msgs": self.msgs, "bytes": self.bytes, "tokens": self.tokens,
            "msgs_per_s": self.msgs / window, "tokens_per_s": self.tokens / window,
            "all_msgs": self.all_msgs, "all_tokens": self.all_tokens, "kinds": self.kinds,
            "completed": self.completed, "unfinished": len(self.reqs), "stalled": self.stalled,
            "max_gap_s": round(self.max_gap, 3),
            "errors": self.errors, "seq_gaps": self.seq_gaps, "seq_dups": self.seq_dups,
            "chunk_bytes_mean": statistics.fmean(sizes) if sizes else None,
            "ttft_ms": {"n": len(self.ttft), "p50": pct(self.ttft, 50), "p95": pct(self.ttft, 95)},
            "total_ms": {"n": len(self.total_ms), "p50": pct(self.total_ms, 50),
                         "p95": pct(self.total_ms, 95)},
            "token_latency_ms": {"n": len(self.lat), "p50": pct(self.lat, 50),
                                 "p95": pct(self.lat, 95), "p99": pct(self.lat, 99)},
            "procs": watch.report(window),
        }

    def _unstall(self, now: float) -> None:
        """Count requests starved for ``_STALL_S`` (they are not re-sent: that would add
        streams to the cell; a QoS 0 stream whose terminal message is lost just ends)."""
        with self.lock:
            for req in self.reqs.values():
                if not req.stalled and now - req.last > _STALL_S:
                    req.stalled = True
                    self.stalled += 1


def count_mode(a: argparse.Namespace) -> dict[str, Any]:
    """Count messages on ``a.topic`` until ``a.duration`` passes or ``a.idle`` of silence."""
    ready = threading.Event()
    lock = threading.Lock()
    st = {"n": 0, "bytes": 0, "first": 0.0, "last": 0.0}

    def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        with lock:
            if st["n"] == 0:
                st["first"] = now
            st["n"] += 1
            st["bytes"] += len(msg.payload)
            st["last"] = now

    c = no_delay(mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-count-{a.cell}",
                             protocol=mqtt.MQTTv311))
    c.on_connect = lambda cl, *_: cl.subscribe(a.topic, qos=a.qos)
    c.on_subscribe = lambda *_: ready.set()
    c.on_message = on_message
    watch = Watch(a.watch)
    watched = 0.0
    w0 = 0.0
    c.connect(a.host, a.port, keepalive=60)
    c.loop_start()
    try:
        if not ready.wait(10):
            raise SystemExit("count: no SUBACK within 10 s")
        print(json.dumps({"ready": True}), flush=True)
        t0 = time.monotonic()
        end = t0 + a.duration
        started = False
        while time.monotonic() < end:
            time.sleep(0.05)
            with lock:
                n, last = st["n"], st["last"]
            if n and not started:
                started = True
                watch.start()
                w0 = time.monotonic()
            if n and time.monotonic() - last > a.idle:
                break
        if started:
            watch.stop()
            watched = time.monotonic() - w0
    finally:
        c.disconnect()
        c.loop_stop()
    span = st["last"] - st["first"]
    return {"mode": "count", "cell": a.cell, "msgs": st["n"], "bytes": st["bytes"],
            "span_s": round(span, 4),
            "msgs_per_s": (st["n"] - 1) / span if span > 0 else None,
            "procs": watch.report(max(watched, 1e-3)) if started else {}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device")
    p.add_argument("--mode", choices=["streams", "count"], default="streams")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--prefix", default="llm")
    p.add_argument("--cell", default="c0", help="client-name prefix (distinct per cell)")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--prompt", default="fake: rate=0 tokens=200")
    p.add_argument("--max-tokens", type=int, default=100_000)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--drain", type=float, default=1.0)
    p.add_argument("--topic", default="bench/raw")
    p.add_argument("--idle", type=float, default=1.0)
    p.add_argument("--watch", action="append", default=[], metavar="NAME=PID")
    a = p.parse_args(argv)
    result = Devices(a).run() if a.mode == "streams" else count_mode(a)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
