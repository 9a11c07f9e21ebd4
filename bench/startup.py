"""How long ``llamacpp-mqtt-bridge run`` takes from start to "ready", model load excluded.

``run --llama-url URL`` is started against an llama-server that already runs (the
embedded llama.cpp of the package, started once), so what is measured is the Python
start-up, the local broker, the backend probe and the MQTT connect. Each run goes from
spawning the process to its "ready" line, then SIGTERM.

    python -m bench.startup [--runs 7] [--root DIR]

``--root`` runs the ``bridge`` package found in DIR (e.g. an export of an older commit)
to compare. Prints the median and the range per local broker.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bridge.llama.embedded import EmbeddedLlama
from bridge.mqtt.brokers.mosquitto import MOSQUITTO_ENV

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_to_ready(root: Path, llama_url: str, kind: str, workdir: Path) -> float:
    """Seconds from spawning ``run`` to its "ready" line (one run)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if kind == "amqtt":
        env[MOSQUITTO_ENV] = "none"
    else:
        env.pop(MOSQUITTO_ENV, None)
    cmd = [sys.executable, "-m", "bridge", "run", "--mqtt-port", str(_free_port()),
           "--llama-url", llama_url, "--sessions-db", str(workdir / "s.db")]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if " ready: " in line:
                return time.monotonic() - started
        raise RuntimeError("run exited before it was ready:\n" + "".join(lines))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--root", type=Path, default=REPO)
    args = parser.parse_args()
    llama = EmbeddedLlama(parallel=2, ctx=4096)
    url = llama.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("mosquitto", "amqtt"):
                times = [start_to_ready(args.root, url, kind, Path(tmp))
                         for _ in range(args.runs)]
                print(f"{kind:9s} median {statistics.median(times):.2f} s, "
                      f"range {min(times):.2f}-{max(times):.2f} s over {len(times)} runs: "
                      + " ".join(f"{t:.2f}" for t in times), flush=True)
    finally:
        llama.stop()


if __name__ == "__main__":
    main()
