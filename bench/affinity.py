"""Cache-affine routing: multi-turn conversations over two llama.cpp servers, with and without.

    .venv/bin/python -m bench.affinity                   # ~6 min on 2 idle cores
    .venv/bin/python -m bench.affinity --conversations 2 --turns 8 --rounds 1 --direct-turns 0

Two llama.cpp servers (:class:`~bench.affinity_llama.TunedLlama`, Gemma 3 270M, one
thread, ``--parallel`` slots of ``--ctx-per-slot`` tokens each), Mosquitto and the
bridge as a subprocess in front of both servers (``[llama] session_affinity`` on or
off). ``--conversations`` devices each hold a server-side session of ``--turns`` turns
(a paragraph of ``--words`` words per user message, ``--max-tokens`` per answer, then a
pause of ``--think-s`` seconds, as a person reading and typing), all at once. The
bridge runs ``2 * --rounds`` phases, affinity on/off/off/on/..., each with a fresh
bridge and fresh session names, on the same servers: machine noise and the servers'
state fall on both modes alike.

Measured per turn: time to first token as the device sees it (its publish to the first
``chunk``), and llama-server's ``cache_n`` (prompt tokens taken from its cache) and
``prompt_n`` (prompt tokens evaluated) from ``done.timings``; which backend answered,
from the bridge's request log; how llama-server picked slots, from its log.

Before the bridge phases, the ``direct`` section sends conversations straight to the
servers, one request at a time: pinned to one server, alternating between the two, and
re-read in full every turn (``cache_prompt: false``) -- what to expect of each routing.

Prints Markdown tables (docs/performance.md, *Cache-affine routing*); ``--json`` keeps
every turn. Every process is stopped at the end, on Ctrl-C and on errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.affinity_llama import TunedLlama, chat, user_message
from bench.affinity_report import CpuWatch, direct_table, phase_table, slot_choices
from bench.device import no_delay

MODES = {True: "affinity", False: "no affinity"}
_REQUEST_LOG = re.compile(r"request id=(\S+) client=(\S+) outcome=\S+ backend=(\S+)")


@dataclass
class Turn:
    """One measured turn."""

    section: str  # "bridge" or "direct"
    mode: str  # MODES value, or the direct route
    round: int
    conversation: int
    turn: int
    ttft_ms: float | None = None
    cache_n: int | None = None
    prompt_n: int | None = None
    backend: str | None = None
    error: str | None = None


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================ servers


@contextlib.contextmanager
def llama_servers(a: argparse.Namespace, log_dir: Path) -> Iterator[list[TunedLlama]]:
    """The two llama.cpp servers, started together, stopped whatever happens."""
    servers = [TunedLlama(parallel=a.parallel, ctx=a.parallel * a.ctx_per_slot,
                          threads=a.threads, chat_template="chatml",
                          log_path=log_dir / f"llama-{i}.log", cache_ram_mib=a.cache_ram_mib,
                          slot_similarity=a.slot_similarity) for i in range(2)]
    try:
        for server in servers:
            server.start()
        for server in servers:  # the first request of a server costs ~1 s more
            chat(server.url, [{"role": "user", "content": "Warm up."}], 4)
        yield servers
    finally:
        for server in servers:
            server.stop()


# ============================================================================ direct


def run_direct(a: argparse.Namespace, servers: list[TunedLlama]) -> list[Turn]:
    """One conversation per route, sent straight to llama-server, turns interleaved.

    Routes: ``pinned`` (every turn on server 1), ``alternating`` (odd turns on server
    1, even on 2) and ``uncached`` (server 2, ``cache_prompt: false``). With 2 slots a
    server, each server sees two conversations: none evicts another's slot.
    """
    urls = [s.url for s in servers]
    routes = ["pinned", "alternating", "uncached"]
    history: dict[str, list[dict[str, str]]] = {r: [] for r in routes}
    out: list[Turn] = []
    for turn in range(1, a.direct_turns + 1):
        for conv, route in enumerate(routes):
            url = {"pinned": urls[0], "alternating": urls[(turn - 1) % 2]}.get(route, urls[1])
            cache = route != "uncached"
            history[route].append({"role": "user", "content": user_message(
                100 + conv, turn, a.words, f"Direct {route}")})
            answer = chat(url, history[route], a.max_tokens, cache_prompt=cache)
            history[route].append({"role": "assistant", "content": answer.text})
            out.append(Turn("direct", route, 0, conv, turn, answer.ttft_ms,
                            answer.timings.get("cache_n"), answer.timings.get("prompt_n"),
                            f"server-{urls.index(url) + 1}"))
        say(f"  direct turn {turn}: " + "  ".join(
            f"{t.mode} {t.ttft_ms:.0f} ms ({t.cache_n}+{t.prompt_n})" for t in out[-3:]))
    return out


# ============================================================================ bridge


class Devices:
    """One MQTT connection for every conversation; replies routed by client to a queue."""

    def __init__(self, broker: procs.Broker) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.inbox: dict[str, queue.Queue[tuple[float, dict[str, Any]]]] = {}
        self._subscribed = threading.Event()
        self.client = no_delay(mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-affinity-{os.getpid()}",
            protocol=mqtt.MQTTv5))
        self.client.on_connect = lambda c, *_: c.subscribe("llm/reply/+/+", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("the device could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.perf_counter()
        box = self.inbox.get(msg.topic.split("/")[2])
        if box is not None:
            box.put((now, json.loads(msg.payload)))

    def ask(self, client: str, body: dict[str, Any], timeout: float) -> tuple[
            float | None, dict[str, Any]]:
        """Publish one request; the time to its first chunk (ms) and its terminal message."""
        box = self.inbox.setdefault(client, queue.Queue())
        start = time.perf_counter()
        self.client.publish(f"llm/request/{client}", json.dumps(body), qos=1)
        first: float | None = None
        end = time.monotonic() + timeout
        while True:
            at, reply = box.get(timeout=max(0.01, end - time.monotonic()))
            if reply.get("id") != body["id"]:
                continue
            if reply["type"] == "chunk" and first is None:
                first = (at - start) * 1000
            if reply["type"] in ("done", "reply", "error"):
                return first, reply

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def conversation(a: argparse.Namespace, devices: Devices, *, phase: str, mode: str, rnd: int,
                 conv: int, out: list[Turn], stop: threading.Event) -> None:
    """One device's conversation through the bridge (run in its own thread)."""
    client = f"{phase}-c{conv}"
    think = random.Random(conv)  # the same pauses in every phase
    time.sleep(think.uniform(0, a.think_max))  # conversations start apart, as people do
    for turn in range(1, a.turns + 1):
        if stop.is_set():
            return
        rec = Turn("bridge", mode, rnd, conv, turn)
        body = {"id": f"t{turn}", "session": "chat", "max_tokens": a.max_tokens,
                "temperature": 0, "prompt": user_message(conv, turn, a.words, phase)}
        try:
            rec.ttft_ms, end = devices.ask(client, body, a.turn_timeout_s)
        except queue.Empty:
            rec.error = f"no terminal message in {a.turn_timeout_s:.0f} s"
            out.append(rec)
            return
        timings = end.get("timings") or {}
        rec.cache_n, rec.prompt_n = timings.get("cache_n"), timings.get("prompt_n")
        if end["type"] == "error":
            rec.error = f"{end.get('code')}: {end.get('message')}"
        out.append(rec)
        stop.wait(think.uniform(a.think_min, a.think_max))


def run_phase(a: argparse.Namespace, broker: procs.Broker, servers: list[TunedLlama], *,
              affinity: bool, rnd: int, index: int, log_dir: Path) -> tuple[list[Turn],
                                                                             dict[str, float]]:
    """One bridge, ``--conversations`` conversations at once; their turns, slot choices."""
    phase = f"p{index}"
    logs = [s.log_path for s in servers if s.log_path is not None]
    since = [p.stat().st_size for p in logs]
    out: list[Turn] = []
    stop = threading.Event()
    mode = MODES[affinity]
    env = {"BRIDGE_LLAMA__SESSION_AFFINITY": "true" if affinity else "false"}
    with procs.bridge(broker, [s.url for s in servers], bridge_id=phase,
                      max_concurrent=2 * a.parallel, flush_ms=50.0, qos=1, env=env,
                      log_dir=log_dir) as proc:
        log, pid = proc.log, proc.pid
        devices = Devices(broker)
        cpu = CpuWatch([pid, broker.pid, os.getpid(), *(s.pid for s in servers if s.pid)])
        try:
            threads = [threading.Thread(target=conversation, daemon=True, args=(
                a, devices), kwargs={"phase": phase, "mode": mode, "rnd": rnd, "conv": i,
                                     "out": out, "stop": stop})
                for i in range(a.conversations)]
            for t in threads:
                t.start()
            end = time.monotonic() + a.phase_timeout_s
            for t in threads:
                t.join(max(0.0, end - time.monotonic()))
            if any(t.is_alive() for t in threads):
                stop.set()
                say(f"  {phase}: not finished in {a.phase_timeout_s:.0f} s, stopped")
            usage = cpu.stop()
        finally:
            stop.set()
            devices.close()
        backends = {(m[2], m[1]): m[3]
                    for m in _REQUEST_LOG.finditer(log.read_text(errors="replace"))}
    for rec in out:
        rec.backend = backends.get((f"{phase}-c{rec.conversation}", f"t{rec.turn}"))
    return out, {**slot_choices(logs, since), **{f"cpu % {k}": v for k, v in usage.items()}}


# ============================================================================ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=4, help="at once (default 4)")
    p.add_argument("--turns", type=int, default=8, help="per conversation (default 8)")
    p.add_argument("--words", type=int, default=100, help="per user message (default 100)")
    p.add_argument("--max-tokens", type=int, default=32, help="per answer (default 32)")
    p.add_argument("--think-s", default="1,3", help="pause between turns, MIN,MAX seconds "
                                                    "(uniform, seeded; default 1,3)")
    p.add_argument("--rounds", type=int, default=2,
                   help="pairs of bridge phases, on/off then off/on (default 2)")
    p.add_argument("--parallel", type=int, default=2, help="slots per server (default 2)")
    p.add_argument("--ctx-per-slot", type=int, default=4096, help="(default 4096)")
    p.add_argument("--threads", type=int, default=1, help="per server (default 1)")
    p.add_argument("--cache-ram-mib", type=int, default=None,
                   help="llama-server --cache-ram (default: its own, 8192; 0: off)")
    p.add_argument("--slot-similarity", type=float, default=None,
                   help="llama-server --slot-prompt-similarity (default: its own, 0.1)")
    p.add_argument("--direct-turns", type=int, default=8,
                   help="turns of the direct section (0: skip it; default 8)")
    p.add_argument("--later-from", type=int, default=5, help="later turns: from this one")
    p.add_argument("--turn-timeout-s", type=float, default=180.0)
    p.add_argument("--phase-timeout-s", type=float, default=600.0)
    p.add_argument("--json", type=Path, help="write every turn here")
    p.add_argument("--log-dir", type=Path,
                   help="keep the logs of llama-server and the bridge here (default: a "
                        "temporary folder, removed at the end)")
    a = p.parse_args(argv)
    a.think_min, a.think_max = (float(x) for x in a.think_s.split(","))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    started = time.monotonic()
    turns: list[Turn] = []
    slots: dict[str, dict[str, float]] = {}
    phases: dict[str, tuple[str, int]] = {}
    direct_cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as tmp:
        log_dir = a.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        say(f"starting 2 llama.cpp servers ({a.parallel} slots x {a.ctx_per_slot} tokens, "
            f"{a.threads} thread each) and Mosquitto; logs in {log_dir}")
        with llama_servers(a, log_dir) as servers, procs.mosquitto() as broker:
            if a.direct_turns:
                say("direct: one request at a time, straight to llama-server")
                cpu = CpuWatch([os.getpid(), *(s.pid for s in servers if s.pid)])
                turns += run_direct(a, servers)
                direct_cpu = cpu.stop()
            index = 0
            for rnd in range(1, a.rounds + 1):
                for affinity in ((True, False) if rnd % 2 else (False, True)):
                    index += 1
                    say(f"bridge phase p{index}: {MODES[affinity]}, round {rnd}")
                    phases[f"p{index}"] = (MODES[affinity], rnd)
                    got, slots[f"p{index}"] = run_phase(a, broker, servers, affinity=affinity,
                                                        rnd=rnd, index=index, log_dir=log_dir)
                    turns += got
                    say(f"  {len(got)} turns, {sum(t.error is not None for t in got)} "
                        f"errors; {slots[f'p{index}']}")
    say(f"done in {time.monotonic() - started:.0f} s")
    setup = (f"{a.conversations} conversations x {a.turns} turns, {a.words}-word messages, "
             f"max_tokens {a.max_tokens}, pauses {a.think_min:g}-{a.think_max:g} s; 2 servers x "
             f"{a.parallel} slots x {a.ctx_per_slot} ctx, {a.threads} thread each; "
             f"cache_ram_mib {a.cache_ram_mib if a.cache_ram_mib is not None else 'default'}, "
             f"slot_prompt_similarity "
             f"{a.slot_similarity if a.slot_similarity is not None else 'default'}")
    print(f"Setup: {setup}\n")
    rows = [asdict(t) for t in turns]
    if a.direct_turns:
        print(direct_table(rows, a.later_from, direct_cpu))
    print(phase_table(rows, a.later_from, slots, phases))
    if a.json:
        args = {k: str(v) for k, v in vars(a).items()}
        a.json.write_text(json.dumps({"setup": setup, "args": args,
                                      "phases": {p: {"mode": m, "round": r, **slots[p]}
                                                 for p, (m, r) in phases.items()},
                                      "direct_cpu": direct_cpu,
                                      "turns": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
