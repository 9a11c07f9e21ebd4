"""Where the bridge's time goes under relay load: py-spy on the bridge subprocess.

    .venv/bin/python -m bench.profile                       # per-token, 8 streams, QoS 1
    .venv/bin/python -m bench.profile --flush-ms 50 --streams 64
    .venv/bin/python -m bench.profile --rate 50 --streams 256 --flush-ms 50   # paced

Starts Mosquitto (shipped configuration), :mod:`bench.fake_llama` and the bridge
(``python -m bridge run``), drives it with :mod:`bench.device`, records the bridge
with ``py-spy record --gil`` (only the thread holding the GIL is sampled: Python
work, not threads waiting), and prints the functions with the most samples, self
and inclusive. The raw collapsed stacks are kept (``--out``) for a flame graph
(e.g. ``py-spy``'s speedscope format, or inferno/flamegraph.pl on the raw file).

Needs ptrace permission (root, or ``kernel.yama.ptrace_scope = 0``). With hundreds
of threads ``--nonblocking`` is used, so sampling does not stop the bridge.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import procs


def _key(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)".
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


def summarize(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_key(f) for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        for key in set(frames):
            incl[key] += n
        if frames:
            own[frames[-1]] += n
    if not total:
        return "no samples (is py-spy allowed to attach?)"
    lines = [f"{total} samples with the GIL held", "", "self:"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in incl.most_common(top + 15)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--broker", choices=["mosquitto", "amqtt"], default="mosquitto")
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--flush-ms", type=float, default=0.0)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.0, help="tokens/s per stream (0: unpaced)")
    p.add_argument("--tokens", type=int, default=1000, help="tokens per answer")
    p.add_argument("--seconds", type=float, default=6.0, help="how long py-spy records")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bridge-profile.txt")
    a = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: pip install 'llamacpp-mqtt-bridge[bench]'")
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp, \
            procs.fake_llama(slots=512) as fake, procs.broker(a.broker) as broker, \
            procs.bridge(broker, fake.url, bridge_id="profiled", max_concurrent=a.streams,
                         flush_ms=a.flush_ms, qos=a.qos, log_dir=Path(tmp)) as br:
        cmd = [spy, "record", "-p", str(br.pid), "-d", str(int(a.seconds)), "-r", "100",
               "-f", "raw", "-o", str(a.out), "--gil"]
        if a.streams > 16:
            cmd.append("--nonblocking")
        recorder: list[subprocess.CompletedProcess[bytes]] = []

        def record() -> None:
            time.sleep(1.5)  # past the ramp-up
            recorder.append(subprocess.run(cmd, capture_output=True, timeout=a.seconds + 30,
                                           check=False))

        th = threading.Thread(target=record)
        th.start()
        res = procs.run_json(
            [procs.PY, "-m", "bench.device", "--port", str(broker.port), "--qos", str(a.qos),
             "--streams", str(a.streams), "--prompt",
             f"fake: rate={a.rate:g} tokens={a.tokens}",
             "--duration", str(a.seconds + 3), "--warmup", "1.5",
             "--watch", f"bridge={br.pid}"], timeout=a.seconds + 60)
        th.join(a.seconds + 40)
    bridge = res["procs"].get("bridge", {})
    print(f"{a.broker} QoS {a.qos}, flush {a.flush_ms:g} ms, {a.streams} streams, "
          f"rate {a.rate or 'unpaced'}: {res['tokens_per_s']:.0f} tokens/s, "
          f"{res['msgs_per_s']:.0f} msgs/s, bridge CPU {bridge.get('cpu_pct')}% "
          f"({1e6 * bridge.get('cpu_s', 0) / max(res['tokens'], 1):.1f} µs/token, "
          "sampling included)\n")
    if recorder and recorder[0].returncode != 0:
        print(recorder[0].stderr.decode(errors="replace")[-1000:])
    print(summarize(a.out))
    print(f"\nraw stacks: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
