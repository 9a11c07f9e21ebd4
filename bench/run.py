"""The benchmark: every measurement side by side in one run, as ratios (docs/performance.md).

    .venv/bin/python -m bench.run            # the full matrix (~7 min on 2 cores)
    .venv/bin/python -m bench.run --quick    # a reduced matrix (~2 min)

Sections (docs/performance.md explains each and records a run):

1. **latency** -- real llama.cpp (Gemma 3 270M, :class:`bridge.llama.embedded.EmbeddedLlama`)
   behind Mosquitto: time to first token and total time seen by an MQTT device
   through the bridge vs. a direct HTTP SSE client (``LlamaCppClient.stream_chat``),
   same prompt and seed, runs interleaved (ABBA), paired differences and ratios.
2. **limit** -- one plain paho publisher through the same broker, same QoS and
   payload size, a subscriber counting (:mod:`bench.rawpub`).
3. **relay** -- the bridge as a subprocess between :mod:`bench.fake_llama` (unpaced:
   as fast as the bridge reads) and a counting subscriber (:mod:`bench.device`), at
   1..256 concurrent streams, per-token chunks (``flush_ms 0``) and batching (50 ms),
   QoS 0 and 1, amqtt and Mosquitto: tokens/s and messages/s delivered, bridge CPU
   per token, RSS, and each figure as a fraction of the limit from section 2.
4. **scaling** -- paced streams (50 tokens/s each, like a fast model) at 1..256
   streams: added per-token latency, CPU per token and RSS per stream; and answer
   length at a fixed concurrency.

Every process runs on 127.0.0.1, every load is bounded in count and time, and
everything started is stopped. The machine's other load is measured during every
cell ("others", CPU % of one core not used by the benchmark's processes) so a
noisy number can be recognised as such.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import procs
from bench.device import no_delay, pct

REPO = procs.REPO
PY = procs.PY
MiB = 1024 * 1024

# Section 1: the request both paths send (greedy, fixed seed: the same answer each time).
LATENCY_PROMPT = "Write a short story about a lighthouse keeper and a storm."
SEED = 42

# Token payloads of the raw publisher: a per-token chunk is ~51 bytes
# ({"type":"chunk","id":"r12","seq":345,"text":" abcd"}), a full batched chunk 512.
PER_TOKEN_BYTES = 51
BATCH_BYTES = 512


@dataclass
class Plan:
    name: str
    cell_s: float
    warmup_s: float
    latency_n: int
    latency_tokens: int
    brokers: list[str]
    qos: list[int]
    flush: list[float]
    streams: list[int]
    relay_tokens: int
    raw_sizes: list[int]
    paced_streams: list[int]
    paced_flush: list[float]
    paced_rate: float
    paced_tokens: int
    lengths: list[int]
    length_streams: int
    length_flush: list[float]


FULL = Plan("full", cell_s=4.0, warmup_s=1.0, latency_n=40, latency_tokens=48,
            brokers=["mosquitto", "amqtt"], qos=[0, 1], flush=[0.0, 50.0],
            streams=[1, 8, 64, 256], relay_tokens=1000, raw_sizes=[PER_TOKEN_BYTES, BATCH_BYTES],
            paced_streams=[1, 8, 64, 256], paced_flush=[0.0, 50.0], paced_rate=50.0,
            paced_tokens=200, lengths=[16, 128, 1024, 8192], length_streams=8,
            length_flush=[0.0, 50.0])
QUICK = Plan("quick", cell_s=3.0, warmup_s=0.75, latency_n=20, latency_tokens=32,
             brokers=["mosquitto"], qos=[1], flush=[0.0, 50.0], streams=[1, 64, 256],
             relay_tokens=1000, raw_sizes=[PER_TOKEN_BYTES, BATCH_BYTES],
             paced_streams=[8, 256], paced_flush=[0.0, 50.0], paced_rate=50.0,
             paced_tokens=200, lengths=[16, 1024], length_streams=8, length_flush=[50.0])


@dataclass
class Ctx:
    plan: Plan
    logs: Path
    fake: procs.Fake | None = None
    ids: Any = field(default_factory=lambda: itertools.count(1))
    results: dict[str, Any] = field(default_factory=dict)

    def next_id(self) -> str:
        return f"b{next(self.ids)}"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _busy_cpu() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
                 + getattr(t, "steal", 0))


# ============================================================================ cells


def stream_cell(ctx: Ctx, broker: procs.Broker, *, qos: int, flush: float, streams: int,
                prompt: str, label: str, env: dict[str, str] | None = None,
                source: Path | None = None) -> dict[str, Any]:
    """One bridge subprocess, ``streams`` closed-loop devices, measured over a window.

    ``source``: run the ``bridge`` package of another checkout (see :mod:`bench.ab`).
    """
    assert ctx.fake is not None
    plan = ctx.plan
    bid = ctx.next_id()
    with procs.bridge(broker, ctx.fake.url, bridge_id=bid, max_concurrent=streams,
                      flush_ms=flush, qos=qos, env=env, log_dir=ctx.logs, source=source) as br:
        warm_up(broker, qos)
        bridge_proc = psutil.Process(br.pid)
        rss_idle = bridge_proc.memory_info().rss
        threads_idle = bridge_proc.num_threads()
        dev = procs.run_json(
            [PY, "-m", "bench.device", "--port", str(broker.port), "--qos", str(qos),
             "--cell", bid, "--streams", str(streams), "--prompt", prompt,
             "--duration", str(plan.cell_s), "--warmup", str(plan.warmup_s), "--drain", "0.5",
             "--watch", f"bridge={br.pid}", "--watch", f"broker={broker.pid}",
             "--watch", f"fake={ctx.fake.pid}"],
            timeout=plan.cell_s + 60)
        log_text = br.log.read_text(errors="replace")
    p = dev["procs"]
    bridge_p = p.get("bridge", {})
    others_pct = p.get("others", {}).get("cpu_pct", 0.0)
    tokens = dev["tokens"]
    row = {
        "label": label, "broker": broker.kind, "qos": qos, "flush_ms": flush,
        "streams": streams, "prompt": prompt,
        "tokens_per_s": dev["tokens_per_s"], "msgs_per_s": dev["msgs_per_s"],
        "chunk_bytes_mean": dev["chunk_bytes_mean"],
        "bridge_cpu_pct": bridge_p.get("cpu_pct"),
        "bridge_us_per_token": (1e6 * bridge_p["cpu_s"] / tokens) if tokens and bridge_p
        else None,
        "bridge_us_per_msg": (1e6 * bridge_p["cpu_s"] / dev["msgs"]) if dev["msgs"] and bridge_p
        else None,
        "rss_idle": rss_idle, "rss_peak": bridge_p.get("rss_peak"),
        "rss_per_stream": ((bridge_p["rss_peak"] - rss_idle) / streams)
        if bridge_p.get("rss_peak") else None,
        "threads_idle": threads_idle,
        "ttft_ms_p50": dev["ttft_ms"]["p50"], "ttft_ms_p95": dev["ttft_ms"]["p95"],
        "token_latency_ms_p50": dev["token_latency_ms"]["p50"],
        "token_latency_ms_p95": dev["token_latency_ms"]["p95"],
        "seq_gaps": dev["seq_gaps"], "seq_dups": dev["seq_dups"], "errors": dev["errors"],
        "completed": dev["completed"], "stalled": dev["stalled"], "max_gap_s": dev["max_gap_s"],
        "procs_cpu_pct": {k: v["cpu_pct"] for k, v in p.items()},
        "others_cpu_pct": others_pct,
        "bridge_log_warnings": log_text.count(" WARNING ") + log_text.count(" ERROR "),
        "bridge_log_top": collections.Counter(
            line.split(" ", 3)[-1][:100] for line in log_text.splitlines()
            if " WARNING " in line or " ERROR " in line).most_common(3),
    }
    say(f"  {label:<44} {row['tokens_per_s']:>9.0f} tok/s {row['msgs_per_s']:>8.0f} msg/s "
        f"bridge {row['bridge_cpu_pct'] or 0:>5.1f}% "
        f"{row['bridge_us_per_token'] or 0:>7.1f} us/tok  others {others_pct:>4.0f}%")
    return row


def warm_up(broker: procs.Broker, qos: int) -> None:
    """One request through a fresh bridge, so that "idle" RSS includes one-time costs
    (lazy imports, first-use caches, paho's buffers) and RSS growth is per stream."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    c = no_delay(mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=f"bench-warm-{time.time_ns()}", protocol=mqtt.MQTTv311))
    c.on_connect = lambda cl, *_: cl.subscribe("llm/reply/warmdev/#", qos=qos)
    c.on_subscribe = lambda cl, *_: cl.publish(
        "llm/request/warmdev", json.dumps({"messages": [
            {"role": "user", "content": "fake: rate=0 tokens=2000"}]}), qos=1)
    c.on_message = lambda cl, u, m: done.set() if b'"type":"done"' in m.payload else None
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    try:
        if not done.wait(30):
            say("  (warm-up request got no answer within 30 s)")
    finally:
        c.disconnect()
        c.loop_stop()
    time.sleep(0.2)


def raw_cell(ctx: Ctx, broker: procs.Broker, *, qos: int, size: int) -> dict[str, Any]:
    """One paho publisher -> broker -> counting subscriber, ``cell_s`` seconds."""
    topic = "llm/reply/rawdev0/r1"  # as long as a bridge's reply topics
    pub: dict[str, Any] = {}
    threads: list[threading.Thread] = []

    def start_pub() -> None:
        def run() -> None:
            cmd = [PY, "-m", "bench.rawpub", "--port", str(broker.port), "--qos", str(qos),
                   "--size", str(size), "--topic", topic, "--duration", str(ctx.plan.cell_s)]
            if broker.protocol == "5":
                cmd.append("--v5")  # the protocol the bridge speaks with this broker
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=ctx.plan.cell_s + 30,
                                 check=False)
            if out.returncode == 0:
                pub.update(json.loads(out.stdout))
        th = threading.Thread(target=run, daemon=True)
        th.start()
        threads.append(th)

    busy0, t0 = _busy_cpu(), time.monotonic()
    res = procs.run_json(
        [PY, "-m", "bench.device", "--mode", "count", "--port", str(broker.port), "--qos",
         str(qos), "--cell", ctx.next_id(), "--topic", topic,
         "--duration", str(ctx.plan.cell_s + 20), "--idle", "1.0",
         "--watch", f"broker={broker.pid}"],
        timeout=ctx.plan.cell_s + 60, on_ready=start_pub)
    for th in threads:
        th.join(ctx.plan.cell_s + 30)
    busy1, t1 = _busy_cpu(), time.monotonic()
    row = {"broker": broker.kind, "qos": qos, "size": size, "msgs_per_s": res["msgs_per_s"],
           "received": res["msgs"], "sent": pub.get("sent"), "pub_per_s": pub.get("pub_per_s"),
           "pub_cpu_pct": pub.get("cpu_pct"), "pub_us_per_msg": pub.get("us_per_msg"),
           "procs_cpu_pct": {k: v["cpu_pct"] for k, v in res["procs"].items()},
           "busy_cpu_pct": round(100 * (busy1 - busy0) / (t1 - t0), 1)}
    say(f"  raw paho {broker.kind} QoS {qos} {size:>4} B: {row['msgs_per_s'] or 0:>8.0f} msg/s "
        f"received ({row['received']} of {row['sent']})")
    return row


# ============================================================================ sections


def section_latency(ctx: Ctx) -> dict[str, Any]:
    """Real model: device through the bridge vs direct SSE client, interleaved."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from bridge.llama.client import LlamaCppClient, StreamEnd, TextDelta
    from bridge.llama.embedded import EmbeddedLlama

    plan = ctx.plan
    say(f"== 1. added latency, real model: {plan.latency_n} interleaved pairs, "
        f"{plan.latency_tokens} tokens")
    messages = [{"role": "user", "content": LATENCY_PROMPT}]
    inbox: queue.Queue[tuple[float, bytes]] = queue.Queue()
    busy0, t0 = _busy_cpu(), time.monotonic()
    # Probing /health every 2 s, not 5: llama-server closes idle keep-alive connections
    # after 5 s, and a probe that reuses one at that moment fails ("Remote end closed
    # connection without response") and marks the backend unhealthy for 5 s.
    env = {"BRIDGE_LLAMA__HEALTH_INTERVAL_S": "2"}
    # One llama.cpp thread: on a shared 2-core machine two threads spin-wait on each
    # other whenever another process takes a core (seen: 1 token/s instead of 50).
    # ChatML, as when docs/performance.md was measured: the base model never ends its turn,
    # so every answer runs to latency_tokens (the quick-start template stops after a line).
    with EmbeddedLlama(parallel=1, ctx=2048, threads=1, chat_template="chatml") as llama, \
            procs.mosquitto() as broker, \
            procs.bridge(broker, llama.url, bridge_id=ctx.next_id(), max_concurrent=1,
                         flush_ms=50, qos=1, log_dir=ctx.logs, env=env) as br:
        direct = LlamaCppClient(llama.url)
        # TCP_NODELAY like the direct client's urllib3 socket (paho leaves Nagle on).
        dev = no_delay(mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-latency-dev",
                                   protocol=mqtt.MQTTv311))
        subscribed = threading.Event()
        dev.on_connect = lambda c, *_: c.subscribe("llm/reply/latdev/+", qos=1)
        dev.on_subscribe = lambda *_: subscribed.set()
        dev.on_message = lambda c, u, m: inbox.put((time.perf_counter(), bytes(m.payload)))
        dev.connect(broker.host, broker.port, keepalive=60)
        dev.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("latency device: no SUBACK")
        counter = itertools.count()

        def via_direct() -> tuple[float, float, str]:
            t = time.perf_counter()
            first = end = None
            text = []
            with direct.stream_chat(messages, temperature=0, seed=SEED,
                                    max_tokens=plan.latency_tokens) as s:
                for d in s:
                    if isinstance(d, TextDelta):
                        if first is None:
                            first = time.perf_counter()
                        text.append(d.text)
                    elif isinstance(d, StreamEnd):
                        end = time.perf_counter()
                        direct_prompt_ms.append((d.timings or {}).get("prompt_ms"))
            assert first is not None and end is not None
            return (first - t) * 1000, (end - t) * 1000, "".join(text)

        def via_bridge() -> tuple[float, float, str]:
            rid = f"q{next(counter)}"
            body = json.dumps({"id": rid, "messages": messages, "temperature": 0, "seed": SEED,
                               "max_tokens": plan.latency_tokens})
            t = time.perf_counter()
            dev.publish("llm/request/latdev", body, qos=1)
            first = None
            text = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                at, payload = inbox.get(timeout=120)
                m = json.loads(payload)
                if m.get("id") != rid:
                    continue
                if m["type"] == "chunk":
                    if first is None:
                        first = at
                    text.append(m.get("text") or "")
                elif m["type"] in ("done", "error", "reply"):
                    if m["type"] != "done" or first is None:
                        raise RuntimeError(f"bridge answered {m}")
                    internal.append(m.get("timings", {}).get("ttft_ms"))
                    bridge_ids.append(rid)
                    return (first - t) * 1000, (at - t) * 1000, "".join(text)
            raise RuntimeError("bridge: no answer within 120 s")

        internal: list[float | None] = []  # the bridge's own TTFT (request received ->
        # first text from llama-server), from its done message
        # llama-server's own prompt time per request: the direct client reads it from the
        # stream's timings, the bridge logs it (llama_prompt_ms=) in its request log line
        direct_prompt_ms: list[float | None] = []
        bridge_ids: list[str] = []
        via_direct()
        via_bridge()  # warm both paths (connections, prompt cache)
        pairs = []
        failures: list[str] = []
        same = True
        for i in range(plan.latency_n + 5):
            if len(pairs) >= plan.latency_n:
                break
            order: list[Callable[[], tuple[float, float, str]]] = \
                [via_direct, via_bridge] if i % 4 in (0, 3) else [via_bridge, via_direct]
            try:
                got = {fn.__name__: fn() for fn in order}
            except (RuntimeError, queue.Empty) as exc:  # counted, reported, not fatal
                failures.append(str(exc)[:300])
                say(f"  pair {i} failed: {str(exc)[:200]}")
                continue
            d, b = got["via_direct"], got["via_bridge"]
            same = same and d[2] == b[2]
            pairs.append({"direct_ttft": d[0], "direct_total": d[1],
                          "bridge_ttft": b[0], "bridge_total": b[1],
                          "bridge_internal_ttft": internal[-1],
                          "direct_prompt_ms": direct_prompt_ms[-1], "bridge_id": bridge_ids[-1]})
            say(f"  pair {len(pairs):>2}: TTFT direct {d[0]:7.1f} bridge {b[0]:7.1f} ms, "
                f"total direct {d[1]:7.1f} bridge {b[1]:7.1f} ms")
        dev.disconnect()
        dev.loop_stop()
        direct.close()
        bridge_cpu = psutil.Process(br.pid).cpu_times()
    busy1, t1 = _busy_cpu(), time.monotonic()
    logged = _llama_prompt_ms(br.log)  # read once the bridge has stopped: every line is in
    for p in pairs:
        p["bridge_prompt_ms"] = logged.get(p["bridge_id"])

    def col(key: str) -> list[float]:
        return [p[key] for p in pairs]

    ttft_diff = [p["bridge_ttft"] - p["direct_ttft"] for p in pairs]
    # Where the added TTFT is spent: MQTT hops (device -> broker -> bridge, and the first
    # chunk back) vs inside the bridge (intake, queue, worker, HTTP call setup).
    hops = [p["bridge_ttft"] - p["bridge_internal_ttft"] for p in pairs
            if p["bridge_internal_ttft"] is not None]
    inside = [p["bridge_internal_ttft"] - p["direct_ttft"] for p in pairs
              if p["bridge_internal_ttft"] is not None]
    # The same difference net of llama-server's own prompt time of each request: the
    # model's time to first token varies by 8-25 ms (sd) from request to request, which
    # no pairing removes; what is left varies by 2-8 ms. Older bridges do not log it.
    net = [(p["bridge_ttft"] - p["bridge_prompt_ms"]) - (p["direct_ttft"] - p["direct_prompt_ms"])
           for p in pairs if p["bridge_prompt_ms"] is not None
           and isinstance(p["direct_prompt_ms"], int | float)]
    total_diff = [p["bridge_total"] - p["direct_total"] for p in pairs]
    ttft_ratio = [p["bridge_ttft"] / p["direct_ttft"] for p in pairs]
    total_ratio = [p["bridge_total"] / p["direct_total"] for p in pairs]
    out = {
        "n": len(pairs), "tokens": plan.latency_tokens, "same_text": same, "pairs": pairs,
        "failures": failures,
        "direct_ttft": {"p50": pct(col("direct_ttft"), 50), "p95": pct(col("direct_ttft"), 95)},
        "bridge_ttft": {"p50": pct(col("bridge_ttft"), 50), "p95": pct(col("bridge_ttft"), 95)},
        "direct_total": {"p50": pct(col("direct_total"), 50),
                         "p95": pct(col("direct_total"), 95)},
        "bridge_total": {"p50": pct(col("bridge_total"), 50),
                         "p95": pct(col("bridge_total"), 95)},
        "ttft_diff": {"p50": statistics.median(ttft_diff), "p95": pct(ttft_diff, 95)},
        "ttft_diff_net": {"p50": pct(net, 50), "p95": pct(net, 95), "n": len(net),
                          "sd": statistics.pstdev(net) if net else None},
        "ttft_diff_sd": statistics.pstdev(ttft_diff),
        "ttft_mqtt_hops": {"p50": pct(hops, 50), "p95": pct(hops, 95)},
        "ttft_inside_bridge": {"p50": pct(inside, 50), "p95": pct(inside, 95)},
        "total_diff": {"p50": statistics.median(total_diff), "p95": pct(total_diff, 95)},
        "ttft_ratio": {"p50": statistics.median(ttft_ratio), "p95": pct(ttft_ratio, 95)},
        "total_ratio": {"p50": statistics.median(total_ratio), "p95": pct(total_ratio, 95)},
        "bridge_cpu_s": bridge_cpu.user + bridge_cpu.system,
        "machine_busy_cpu_pct": round(100 * (busy1 - busy0) / (t1 - t0), 1),
    }
    say(f"  TTFT direct {out['direct_ttft']['p50']:.1f} ms, bridge {out['bridge_ttft']['p50']:.1f}"
        f" ms: added {out['ttft_diff']['p50']:+.1f} ms (p95 {out['ttft_diff']['p95']:+.1f}); "
        f"total ratio {out['total_ratio']['p50']:.3f} (p95 {out['total_ratio']['p95']:.3f});"
        f" same text: {same}")
    return out


def _llama_prompt_ms(log: Path) -> dict[str, float]:
    """``id -> llama_prompt_ms`` from the bridge's request log lines."""
    found: dict[str, float] = {}
    for m in re.finditer(r"request id=(\S+) .* llama_prompt_ms=([0-9.]+)",
                         log.read_text(errors="replace")):
        found[m.group(1)] = float(m.group(2))
    return found


def section_broker(ctx: Ctx, kind: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Limit (raw paho) and relay cells for one broker, side by side."""
    plan = ctx.plan
    raw_rows: list[dict[str, Any]] = []
    relay_rows: list[dict[str, Any]] = []
    with procs.broker(kind) as broker:
        for qos in plan.qos:
            # The limit is measured before and after the bridge's cells at this QoS (the
            # machine's load drifts): the bridge is compared with the mean of the two.
            say(f"== 2. limit: one paho publisher through {kind}, QoS {qos}")
            for size in plan.raw_sizes:
                raw_rows.append({**raw_cell(ctx, broker, qos=qos, size=size), "pass": 1})
            say(f"== 3. relay through {kind}, QoS {qos}: unpaced fake llama-server, "
                f"{plan.relay_tokens} tokens per answer")
            for flush in plan.flush:
                for n in plan.streams:
                    mode = "per-token" if flush == 0 else f"batched {flush:g} ms"
                    relay_rows.append(stream_cell(
                        ctx, broker, qos=qos, flush=flush, streams=n,
                        prompt=f"fake: rate=0 tokens={plan.relay_tokens}",
                        label=f"{kind} QoS {qos} {mode} x{n}"))
            say(f"== 2. limit again, {kind}, QoS {qos}")
            for size in plan.raw_sizes:
                raw_rows.append({**raw_cell(ctx, broker, qos=qos, size=size), "pass": 2})
    return raw_rows, relay_rows


def section_scaling(ctx: Ctx) -> dict[str, list[dict[str, Any]]]:
    plan = ctx.plan
    paced: list[dict[str, Any]] = []
    lengths: list[dict[str, Any]] = []
    with procs.broker("mosquitto") as broker:
        say(f"== 4a. scaling with concurrency: paced streams, {plan.paced_rate:g} tokens/s "
            f"each, {plan.paced_tokens} tokens per answer (Mosquitto, QoS 1)")
        for flush in plan.paced_flush:
            for n in plan.paced_streams:
                mode = "per-token" if flush == 0 else f"batched {flush:g} ms"
                row = stream_cell(
                    ctx, broker, qos=1, flush=flush, streams=n,
                    prompt=f"fake: rate={plan.paced_rate:g} tokens={plan.paced_tokens}",
                    label=f"paced {mode} x{n}")
                row["offered_tokens_per_s"] = n * plan.paced_rate
                paced.append(row)
        say(f"== 4b. scaling with answer length: unpaced, {plan.length_streams} streams "
            "(Mosquitto, QoS 1)")
        for flush in plan.length_flush:
            for length in plan.lengths:
                mode = "per-token" if flush == 0 else f"batched {flush:g} ms"
                row = stream_cell(ctx, broker, qos=1, flush=flush, streams=plan.length_streams,
                                  prompt=f"fake: rate=0 tokens={length}",
                                  label=f"length {length} {mode} x{plan.length_streams}")
                row["answer_tokens"] = length
                lengths.append(row)
    return {"paced": paced, "lengths": lengths}


# ============================================================================ report


def _f(value: Any, spec: str = ".0f", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def _mode(flush: float) -> str:
    return "per-token" if flush == 0 else f"batched {flush:g} ms"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in rows]
    return "\n".join([line, sep, *body])


def raw_limit(raw: list[dict[str, Any]], broker: str, qos: int, size: int) -> float | None:
    """The mean of the raw publisher's passes at this broker, QoS and payload size."""
    rates = [r["msgs_per_s"] for r in raw if r["broker"] == broker and r["qos"] == qos
             and r["size"] == size and r["msgs_per_s"]]
    return statistics.fmean(rates) if rates else None


def report(res: dict[str, Any]) -> str:
    out: list[str] = []
    env = res["env"]
    out.append(f"# bench.run --{res['plan']['name']} -- {env['date']}\n")
    out.append(f"{env['cpus']} CPUs ({env['cpu_model']}), Python {env['python']}, "
               f"paho-mqtt {env['paho']}, {env['mosquitto']}, amqtt {env['amqtt']}; "
               f"load average before {env['loadavg_before']}, after {env.get('loadavg_after')}; "
               f"run took {res.get('elapsed_s', 0):.0f} s.\n")
    lat = res.get("latency")
    if lat:
        out.append(f"## 1. Added latency with the real model ({lat['n']} interleaved pairs, "
                   f"{lat['tokens']} tokens, Mosquitto, QoS 1, flush 50 ms)\n")
        rows = []
        for what in ("ttft", "total"):
            rows.append([
                "time to first token" if what == "ttft" else "total time",
                f"{lat['direct_' + what]['p50']:.1f} / {lat['direct_' + what]['p95']:.1f}",
                f"{lat['bridge_' + what]['p50']:.1f} / {lat['bridge_' + what]['p95']:.1f}",
                f"{lat[what + '_diff']['p50']:+.1f} / {lat[what + '_diff']['p95']:+.1f}",
                f"{lat[what + '_ratio']['p50']:.3f} / {lat[what + '_ratio']['p95']:.3f}"])
        out.append(md_table(["ms (median / p95)", "direct HTTP SSE", "device via bridge",
                             "added (paired)", "ratio bridge/direct"], rows))
        if lat.get("failures"):
            out.append(f"\n{len(lat['failures'])} pair(s) failed and were left out: "
                       f"{lat['failures'][0][:200]}")
        net = lat.get("ttft_diff_net", {})
        if net.get("p50") is not None:
            out.append(f"\nThe added TTFT net of llama-server's own prompt time (its "
                       f"`timings.prompt_ms` for each request; the bridge logs it as "
                       f"`llama_prompt_ms`): {net['p50']:+.1f} ms median (p95 {net['p95']:+.1f}, "
                       f"sd {net['sd']:.1f}, {net['n']} pairs), against sd "
                       f"{lat['ttft_diff_sd']:.1f} ms for the plain paired difference, whose "
                       "spread is the model's.")
        if lat.get("ttft_mqtt_hops", {}).get("p50") is not None:
            out.append(f"\nThe added TTFT split by the bridge's own `timings.ttft_ms` (request "
                       f"received -> first text): MQTT hops and the first chunk's way back "
                       f"{lat['ttft_mqtt_hops']['p50']:.1f} ms median "
                       f"(p95 {lat['ttft_mqtt_hops']['p95']:.1f}); inside the bridge, minus the "
                       f"direct client's TTFT, {lat['ttft_inside_bridge']['p50']:+.1f} ms "
                       f"(p95 {lat['ttft_inside_bridge']['p95']:+.1f}).")
        out.append(f"\nSame generated text on both paths: {lat['same_text']}. Machine busy "
                   f"{lat['machine_busy_cpu_pct']:.0f}% of one core during the section "
                   "(llama.cpp included).\n")
    raw = res.get("raw", [])
    if raw:
        out.append("## 2. The limit: one paho publisher -> broker -> one subscriber\n")
        out.append(md_table(
            ["broker", "QoS", "payload B", "pass", "delivered msg/s", "published msg/s",
             "publisher CPU %", "publisher µs/msg", "broker CPU %", "subscriber CPU %"],
            [[r["broker"], str(r["qos"]), str(r["size"]), str(r.get("pass", 1)),
              _f(r["msgs_per_s"]),
              _f(r["pub_per_s"]), _f(r["pub_cpu_pct"]), _f(r["pub_us_per_msg"], ".1f"),
              _f(r["procs_cpu_pct"].get("broker")),
              _f(r["procs_cpu_pct"].get("device"))] for r in raw]))
        out.append("")
    relay = res.get("relay", [])
    if relay:
        out.append("## 3. Relay capacity (unpaced fake llama-server, one bridge process)\n")
        rows = []
        for r in relay:
            size = PER_TOKEN_BYTES if r["flush_ms"] == 0 else BATCH_BYTES
            limit = raw_limit(raw, r["broker"], r["qos"], size)
            frac = r["msgs_per_s"] / limit if limit else None
            rows.append([r["broker"], str(r["qos"]), _mode(r["flush_ms"]), str(r["streams"]),
                         _f(r["tokens_per_s"]), _f(r["msgs_per_s"]), _f(limit),
                         _f(frac, ".0%"), _f(r["bridge_cpu_pct"]),
                         _f(r["bridge_us_per_token"], ".1f"),
                         _f(r["rss_idle"] / MiB, ".1f"),
                         _f(r["rss_per_stream"] / 1024 if r["rss_per_stream"] else None, ".0f"),
                         _f(r["token_latency_ms_p50"]), _f(r["max_gap_s"], ".1f"),
                         str(r["seq_gaps"]), _f(r["others_cpu_pct"])])
        out.append(md_table(
            ["broker", "QoS", "mode", "streams", "tokens/s", "msgs/s", "raw msgs/s",
             "of raw", "bridge CPU %", "µs/token", "RSS idle MiB", "KiB/stream",
             "token lat. p50 ms", "longest silence s", "seq gaps", "others %"], rows))
        out.append("\n\"raw msgs/s\": section 2 (mean of its two passes) at the same broker "
                   "and QoS, payload "
                   f"{PER_TOKEN_BYTES} B for per-token cells, {BATCH_BYTES} B for batched ones. "
                   "\"longest silence\": the longest time a streaming request went without a "
                   "message (threads starved under saturation). "
                   "\"others %\": CPU (% of one core) used by processes outside the benchmark "
                   "during the cell.\n")
    sc = res.get("scaling")
    if sc:
        out.append("## 4. Scaling\n")
        out.append(f"### With concurrency: paced streams ({res['plan']['paced_rate']:g} tokens/s "
                   f"each), Mosquitto, QoS 1\n")
        out.append(md_table(
            ["mode", "streams", "offered tok/s", "delivered tok/s", "token lat. p50 ms",
             "p95 ms", "TTFT p50 ms", "bridge CPU %", "µs/token", "KiB/stream", "others %"],
            [[_mode(r["flush_ms"]), str(r["streams"]), _f(r["offered_tokens_per_s"]),
              _f(r["tokens_per_s"]), _f(r["token_latency_ms_p50"], ".1f"),
              _f(r["token_latency_ms_p95"], ".1f"), _f(r["ttft_ms_p50"], ".1f"),
              _f(r["bridge_cpu_pct"]), _f(r["bridge_us_per_token"], ".1f"),
              _f(r["rss_per_stream"] / 1024 if r["rss_per_stream"] else None, ".0f"),
              _f(r["others_cpu_pct"])] for r in sc["paced"]]))
        out.append(f"\n### With answer length: unpaced, {res['plan']['length_streams']} streams, "
                   "Mosquitto, QoS 1\n")
        out.append(md_table(
            ["mode", "tokens/answer", "tokens/s", "msgs/s", "µs/token", "TTFT p50 ms",
             "KiB/stream", "others %"],
            [[_mode(r["flush_ms"]), str(r["answer_tokens"]), _f(r["tokens_per_s"]),
              _f(r["msgs_per_s"]), _f(r["bridge_us_per_token"], ".1f"),
              _f(r["ttft_ms_p50"], ".1f"),
              _f(r["rss_per_stream"] / 1024 if r["rss_per_stream"] else None, ".0f"),
              _f(r["others_cpu_pct"])] for r in sc["lengths"]]))
        out.append("")
    goals = res.get("goals")
    if goals:
        out.append("## Goals\n")
        out.append(md_table(["goal", "target", "measured", "met"],
                            [[g["goal"], g["target"], g["measured"],
                              {True: "yes", False: "NO", None: "n/a"}[g["met"]]]
                             for g in goals]))
        out.append("")
    return "\n".join(out)


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(goal: str, target: str, value: float | None, ok: bool | None, fmt: str) -> None:
        out.append({"goal": goal, "target": target,
                    "measured": "-" if value is None else format(value, fmt), "met": ok,
                    "value": value})

    lat = res.get("latency")
    if lat:
        v = lat["ttft_diff"]["p50"]
        add("added median TTFT (real model)", "<= 5 ms", v, v <= 5, "+.1f")
        v = lat.get("ttft_diff_net", {}).get("p50")
        add("the same, net of llama-server's prompt time", "<= 5 ms", v,
            None if v is None else v <= 5, "+.1f")
        v = lat["total_ratio"]["p50"]
        add("total time ratio bridge/direct (median)", "<= 1.02", v, v <= 1.02, ".3f")
    relay = res.get("relay", [])
    raw = res.get("raw", [])
    for qos in sorted({r["qos"] for r in relay}):
        cells = [r for r in relay if r["broker"] == "mosquitto" and r["qos"] == qos
                 and r["flush_ms"] == 0]
        limit = raw_limit(raw, "mosquitto", qos, PER_TOKEN_BYTES)
        if cells and limit:
            best = max(r["msgs_per_s"] for r in cells)
            add(f"per-token msgs/s vs raw paho (Mosquitto, QoS {qos}, best cell)", ">= 80%",
                best / limit, best / limit >= 0.8, ".0%")
    batched = [r for r in relay if r["broker"] == "mosquitto" and r["flush_ms"] > 0]
    if batched:
        best = max(r["tokens_per_s"] for r in batched)
        add("batched tokens/s, one bridge -> Mosquitto (best cell)", ">= 50,000", best,
            best >= 50_000, ",.0f")
        v = min(r["bridge_us_per_token"] for r in batched if r["bridge_us_per_token"])
        add("bridge CPU per token (batched, best cell)", "<= 20 µs", v, v <= 20, ".1f")
    per_tok = [r for r in relay if r["broker"] == "mosquitto" and r["flush_ms"] == 0]
    if per_tok:
        v = min(r["bridge_us_per_token"] for r in per_tok if r["bridge_us_per_token"])
        add("bridge CPU per token (per-token, best cell)", "<= 20 µs", v, v <= 20, ".1f")
    paced = (res.get("scaling") or {}).get("paced", [])
    for r in paced:
        if r["streams"] == max(x["streams"] for x in paced) and r["flush_ms"] > 0:
            v = r["bridge_us_per_token"]
            add(f"bridge CPU per token (paced, batched, {r['streams']} streams)", "<= 20 µs", v,
                None if v is None else v <= 20, ".1f")
    at256 = [r for r in relay + paced if r["streams"] == 256 and r["rss_per_stream"]]
    if at256:
        v = max(r["rss_per_stream"] for r in at256) / 1024
        add("RSS per active stream at 256 streams (worst cell)", "<= 64 KiB", v, v <= 64, ".0f")
    return out


def plots(res: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    relay = res.get("relay", [])
    if relay:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        series: dict[str, list[dict[str, Any]]] = {}
        for r in relay:
            series.setdefault(f"{r['broker']} QoS{r['qos']} {_mode(r['flush_ms'])}",
                              []).append(r)
        for name, rows in series.items():
            xs = [r["streams"] for r in rows]
            style = "-" if "batched" in name else "--"
            axes[0].plot(xs, [r["tokens_per_s"] for r in rows], style, marker="o", label=name)
            axes[1].plot(xs, [r["bridge_us_per_token"] for r in rows], style, marker="o",
                         label=name)
            axes[2].plot(xs, [(r["rss_per_stream"] or 0) / 1024 for r in rows], style,
                         marker="o", label=name)
        for ax, title in zip(axes, ("tokens/s delivered", "bridge CPU µs per token",
                                    "bridge RSS per stream (KiB)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent streams")
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
        for ax in axes:
            ax.set_yscale("log")
        axes[0].axhline(50_000, color="grey", lw=0.8, ls=":")
        axes[1].axhline(20, color="grey", lw=0.8, ls=":")
        axes[2].axhline(64, color="grey", lw=0.8, ls=":")
        axes[0].legend(fontsize=7)
        fig.suptitle("Relay capacity (unpaced fake llama-server)")
        fig.tight_layout()
        path = out_dir / "bench-relay.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    sc = res.get("scaling")
    if sc:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for flush in sorted({r["flush_ms"] for r in sc["paced"]}):
            rows = [r for r in sc["paced"] if r["flush_ms"] == flush]
            xs = [r["streams"] for r in rows]
            label = _mode(flush)
            axes[0].plot(xs, [r["token_latency_ms_p50"] for r in rows], marker="o",
                         label=f"{label} p50")
            axes[0].plot(xs, [r["token_latency_ms_p95"] for r in rows], marker="x", ls="--",
                         label=f"{label} p95")
            axes[1].plot(xs, [r["bridge_us_per_token"] for r in rows], marker="o", label=label)
            axes[1].plot(xs, [(r["rss_per_stream"] or 0) / 1024 for r in rows], marker="s",
                         ls=":", label=f"{label}: RSS KiB/stream")
        for flush in sorted({r["flush_ms"] for r in sc["lengths"]}):
            rows = [r for r in sc["lengths"] if r["flush_ms"] == flush]
            xs = [r["answer_tokens"] for r in rows]
            axes[2].plot(xs, [r["bridge_us_per_token"] for r in rows], marker="o",
                         label=f"{_mode(flush)}: µs/token")
            axes[2].plot(xs, [r["ttft_ms_p50"] for r in rows], marker="x", ls="--",
                         label=f"{_mode(flush)}: TTFT p50 ms")
        axes[0].set_title("token latency fake server -> device (ms)")
        axes[1].set_title("bridge CPU µs/token and RSS KiB/stream")
        axes[2].set_title(f"answer length ({res['plan']['length_streams']} streams, unpaced)")
        for ax in axes[:2]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"concurrent streams ({res['plan']['paced_rate']:g} tokens/s each)")
        axes[2].set_xscale("log")
        axes[2].set_xlabel("tokens per answer")
        for ax in axes:
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "bench-scaling.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    lat = res.get("latency")
    if lat:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, what in zip(axes, ("ttft", "total"), strict=True):
            data = [[p[f"direct_{what}"] for p in lat["pairs"]],
                    [p[f"bridge_{what}"] for p in lat["pairs"]]]
            ax.boxplot(data)
            ax.set_xticks([1, 2], ["direct HTTP SSE", "device via bridge"])
            ax.set_ylabel("ms")
            ax.set_title("time to first token" if what == "ttft" else
                         f"total time ({lat['tokens']} tokens)")
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"Real model (Gemma 3 270M), {lat['n']} interleaved pairs")
        fig.tight_layout()
        path = out_dir / "bench-latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True,
                              timeout=5).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        mosq = "mosquitto ?"
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "paho": md.version("paho-mqtt"),
            "amqtt": md.version("amqtt"), "mosquitto": mosq,
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced matrix (~2 min)")
    p.add_argument("--only", action="append", choices=["latency", "relay", "scaling"],
                   help="run only these sections (repeatable; default all)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img",
                   help="where the PNG plots and bench.json go")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    # SIGTERM ends the run like Ctrl-C: every context manager stops what it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sections = set(a.only or ["latency", "relay", "scaling"])
    a.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    res: dict[str, Any] = {"plan": asdict(plan), "env": environment()}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        ctx = Ctx(plan, Path(tmp))
        try:
            if "latency" in sections:
                res["latency"] = section_latency(ctx)
            if sections & {"relay", "scaling"}:
                with procs.fake_llama(slots=512) as fake:
                    ctx.fake = fake
                    if "relay" in sections:
                        res["raw"], res["relay"] = [], []
                        for kind in plan.brokers:
                            raw, relay = section_broker(ctx, kind)
                            res["raw"] += raw
                            res["relay"] += relay
                    if "scaling" in sections:
                        res["scaling"] = section_scaling(ctx)
        except KeyboardInterrupt:
            say("interrupted: reporting what was measured")
    res["elapsed_s"] = time.monotonic() - started
    res["env"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    res["goals"] = goals(res)
    text = report(res)
    print(text)
    (a.out / "bench.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    (a.out / "bench.md").write_text(text, encoding="utf-8")
    if not a.no_plots:
        for path in plots(res, a.out):
            say(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
