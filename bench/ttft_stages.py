"""Where a request's time to first token goes: timestamps at each stage inside the bridge.

    .venv/bin/python -m bench.ttft_stages              # fake llama-server, 40 pairs
    .venv/bin/python -m bench.ttft_stages --real       # llama.cpp + Gemma 3 270M
    .venv/bin/python -m bench.ttft_stages --before /tmp/old --passes 2   # A/B, alternating

Runs Mosquitto, a llama-server (the fake one or the real model, one slot) and the
bridge as a subprocess, whose functions on a request's path are wrapped to record
``time.perf_counter()`` (CLOCK_MONOTONIC, the same clock in every process); one
device sends requests one at a time, alternating with the direct client
(``LlamaCppClient``). Prints the median time of each stage after the device
published the request, the direct client's, and the added TTFT: plain (paired) and
net of llama-server's own prompt time of each request (the bridge logs it as
``llama_prompt_ms``; the direct client reads it from the stream), whose spread is
about a tenth of the plain difference's with the real model.

The wrappers are a measuring device: they cost a few µs each and name private
functions, so this tool follows the code, not the other way round.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["--traced-bridge"]:
    # The bridge subprocess: ``python bench/ttft_stages.py --traced-bridge run ...`` with
    # the checkout to measure as the working directory.
    import atexit
    import json
    import os
    import time
    from collections.abc import Callable
    from typing import Any

    sys.path.insert(0, os.getcwd())
    import http.client

    import urllib3.connection

    import bridge.service.admission
    import bridge.service.bridge
    import bridge.service.reply
    import bridge.service.runner
    import bridge.service.scheduler
    from bridge.cli import main

    marks: list[tuple[str, float]] = []

    def wrap(owner: Any, attr: str, name: str, *, after: bool = False) -> None:
        original: Callable[..., Any] = getattr(owner, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not after:
                marks.append((name, time.perf_counter()))
            result = original(*args, **kwargs)
            if after:
                marks.append((name, time.perf_counter()))
            return result

        setattr(owner, attr, wrapper)

    Bridge = bridge.service.bridge.Bridge
    wrap(Bridge, "_on_inbound", "a. paho thread has the request")
    wrap(bridge.service.admission.Admission, "_accept", "b. intake thread has it")
    wrap(bridge.service.admission, "parse_request", "c. validated", after=True)
    wrap(bridge.service.scheduler.FairQueue, "put", "d. queued")
    wrap(bridge.service.scheduler.FairQueue, "get", "e. a worker has it", after=True)
    wrap(bridge.service.runner.Runner, "_prepare", "f. HTTP call starts", after=True)
    wrap(urllib3.connection.HTTPConnection, "connect", "g. connecting")
    wrap(urllib3.connection.HTTPConnection, "request", "h. request sent", after=True)
    wrap(http.client.HTTPConnection, "getresponse", "i. response headers", after=True)
    wrap(bridge.service.reply.ReplyChannel, "text", "j. first text to the channel")
    wrap(bridge.service.reply.ReplyChannel, "text", "k. first chunk handed to paho", after=True)

    def dump(path: str = os.environ["TTFT_STAGES_OUT"]) -> None:
        with open(path, "w", encoding="utf-8") as out:
            out.write(json.dumps(marks))

    atexit.register(dump)
    raise SystemExit(main(sys.argv[2:]))

# The bench's own imports come after the traced bridge's branch above, which must not
# import the bench (the checkout under test may not have this version of it).
import argparse
import json
import os
import queue
import re
import statistics
import subprocess
import tempfile
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench import procs
from bench.run import LATENCY_PROMPT, SEED, no_delay

FAKE_PROMPT = "fake: rate=50 tokens=5"


def _direct_ttft(client: Any, prompt: str, max_tokens: int) -> tuple[float, float | None]:
    """The direct client's TTFT in ms and llama-server's prompt_ms for it."""
    from bridge.llama.client import StreamEnd, TextDelta

    t = time.perf_counter()
    first: float | None = None
    prompt_ms = None
    with client.stream_chat([{"role": "user", "content": prompt}], temperature=0,
                            seed=SEED, max_tokens=max_tokens) as stream:
        for delta in stream:
            if isinstance(delta, TextDelta) and first is None:
                first = time.perf_counter()
            elif isinstance(delta, StreamEnd):
                prompt_ms = (delta.timings or {}).get("prompt_ms")
    assert first is not None, "the direct client got no text"
    return (first - t) * 1000, prompt_ms


def measure(source: Path, llama_url: str, broker: procs.Broker, pairs: int, prompt: str,
            work: Path) -> dict[str, Any]:
    """One traced bridge from ``source`` against ``llama_url``: stage medians, added TTFT."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from bridge.llama.client import LlamaCppClient

    marks_file, log = work / "marks.json", work / "bridge.log"
    conf = work / "bridge.toml"
    conf.write_text("[mqtt]\nqos = 1\n", encoding="utf-8")
    cmd = [procs.PY, str(Path(__file__).resolve()), "--traced-bridge", "run", "--config",
           str(conf), "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
           "--llama-url", llama_url, "--max-concurrent", "1", "--flush-ms", "50",
           "--bridge-id", "ttft-stages", "--log-level", "INFO",
           "--sessions-db", str(work / "sessions.db"), "--mqtt-protocol", broker.protocol]
    env = {**os.environ, **procs.BENCH_ENV, "TTFT_STAGES_OUT": str(marks_file)}
    inbox: queue.Queue[tuple[float, bytes]] = queue.Queue()
    online, subscribed = threading.Event(), threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith("llm/status/"):
            if b'"online"' in msg.payload:
                online.set()
        else:
            inbox.put((time.perf_counter(), bytes(msg.payload)))

    dev = no_delay(mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ttft-stages-dev",
                               protocol=mqtt.MQTTv311))
    dev.on_connect = lambda c, *_: c.subscribe([("llm/reply/ttftdev/+", 1),
                                                ("llm/status/ttft-stages", 1)])
    dev.on_subscribe = lambda *_: subscribed.set()
    dev.on_message = on_message
    max_tokens = 8
    sent: list[float] = []
    first: list[float] = []
    direct: list[tuple[float, float | None]] = []

    def via_bridge(rid: str) -> tuple[float, float]:
        body = json.dumps({"id": rid, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "seed": SEED, "max_tokens": max_tokens})
        t0 = time.perf_counter()
        dev.publish("llm/request/ttftdev", body, qos=1)
        got: float | None = None
        while True:
            at, payload = inbox.get(timeout=60)
            m = json.loads(payload)
            if m["id"] != rid:
                continue
            if m["type"] == "chunk" and got is None:
                got = at
            if m["type"] in ("done", "error", "reply"):
                if m["type"] != "done" or got is None:
                    raise RuntimeError(f"the bridge answered {m}")
                return t0, got

    with open(log, "wb") as out:
        proc = procs._popen(cmd, cwd=source, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT)
    client = LlamaCppClient(llama_url)
    try:
        dev.connect(broker.host, broker.port, keepalive=60)
        dev.loop_start()
        if not (subscribed.wait(10) and online.wait(60)):
            raise RuntimeError(f"bridge not online:\n{log.read_text(errors='replace')[-2000:]}")
        via_bridge("warm")
        _direct_ttft(client, prompt, max_tokens)
        for i in range(pairs):  # ABBA
            order = ["d", "b"] if i % 4 in (0, 3) else ["b", "d"]
            for who in order:
                if who == "d":
                    direct.append(_direct_ttft(client, prompt, max_tokens))
                else:
                    t0, f = via_bridge(f"q{i}")
                    sent.append(t0)
                    first.append(f)
    finally:
        client.close()
        dev.disconnect()
        dev.loop_stop()
        procs._stop(proc)
    marks = json.loads(marks_file.read_text(encoding="utf-8"))
    logged = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"request id=(\S+) .* llama_prompt_ms=([0-9.]+)", log.read_text(errors="replace"))}
    stages: dict[str, list[float]] = {}
    for t0, f in zip(sent, first, strict=True):
        seen: dict[str, float] = {}
        for name, t in marks:
            if t0 <= t <= f and name not in seen:
                seen[name] = (t - t0) * 1000
        seen["l. device has the first chunk"] = (f - t0) * 1000
        for name, ms in seen.items():
            stages.setdefault(name, []).append(ms)
    added = [(f - t0) * 1000 - d[0] for t0, f, d in zip(sent, first, direct, strict=True)]
    net = [(f - t0) * 1000 - logged[f"q{i}"] - (d[0] - d[1])
           for i, (t0, f, d) in enumerate(zip(sent, first, direct, strict=True))
           if f"q{i}" in logged and isinstance(d[1], int | float)]
    return {"stages": {k: statistics.median(v) for k, v in sorted(stages.items())},
            "direct_ttft": statistics.median(d[0] for d in direct),
            "added": statistics.median(added), "added_sd": statistics.pstdev(added),
            "net": statistics.median(net) if net else None,
            "net_sd": statistics.pstdev(net) if net else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ttft_stages",
                                description=__doc__.split("\n")[0])
    p.add_argument("--real", action="store_true", help="llama.cpp + Gemma 3 270M")
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--before", type=Path, help="another checkout, measured alternately")
    p.add_argument("--passes", type=int, default=1, help="with --before: ABBA passes")
    a = p.parse_args(argv)
    from bridge.llama.embedded import EmbeddedLlama

    sources = [procs.REPO] if a.before is None else [a.before, procs.REPO]
    order = sources if a.before is None else \
        [s for _ in range(a.passes) for s in (sources + sources[::-1])]
    llama: AbstractContextManager[Any] = (
        # ChatML, as when docs/performance.md was measured (and as the test suite runs).
        EmbeddedLlama(parallel=1, ctx=2048, threads=1, chat_template="chatml") if a.real
        else procs.fake_llama())
    prompt = LATENCY_PROMPT if a.real else FAKE_PROMPT
    results: dict[Path, list[dict[str, Any]]] = {s: [] for s in sources}
    with llama as server, procs.mosquitto() as broker, \
            tempfile.TemporaryDirectory(prefix="ttft-stages-") as tmp:
        for n, source in enumerate(order):
            work = Path(tmp) / str(n)
            work.mkdir()
            print(f"-- {source} ({n + 1}/{len(order)})", file=sys.stderr)
            results[source].append(measure(source, server.url, broker, a.pairs, prompt, work))
    for source in sources:
        runs = results[source]
        print(f"\n{source} ({'real model' if a.real else 'fake server'}, "
              f"{a.pairs} pairs x {len(runs)}): ms after the device published the request")
        for name in runs[0]["stages"]:
            vals = [r["stages"][name] for r in runs if name in r["stages"]]
            print(f"  {name:34s} {statistics.mean(vals):7.2f}")
        print(f"  {'direct client: first text':34s} "
              f"{statistics.mean(r['direct_ttft'] for r in runs):7.2f}")
        for r in runs:
            net = "-" if r["net"] is None else f"{r['net']:+.2f} (sd {r['net_sd']:.1f})"
            print(f"  added TTFT: paired {r['added']:+.2f} (sd {r['added_sd']:.1f}); "
                  f"net of llama-server's prompt time {net}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
