"""Before/after: two versions of the bridge, cell by cell, alternating, in one run.

    .venv/bin/python -m bench.ab --before /path/to/old/checkout [--passes 2] [--cells a,b]

Runs each selected relay cell (:func:`bench.run.stream_cell`: the bridge as a
subprocess between the fake llama-server and closed-loop devices, Mosquitto) with
the ``bridge`` package of ``--before`` and of this checkout in turn, ABBA per pass,
so both see the same machine load; and the raw paho limit at QoS 0 and 1 before
and after. Prints one Markdown table: per cell the mean of each version and the
ratio after/before. A checkout of an older commit: ``git worktree add /tmp/old <commit>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import procs
from bench.run import (
    FULL,
    PER_TOKEN_BYTES,
    REPO,
    Ctx,
    _f,
    md_table,
    raw_cell,
    stream_cell,
)

# name: (qos, flush_ms, streams, tokens/s per stream (0 = unpaced), tokens per answer)
CELLS: dict[str, tuple[int, float, int, float, int]] = {
    "paced-pertoken-1": (1, 0.0, 1, 50.0, 200),
    "paced-batched-8": (1, 50.0, 8, 50.0, 200),
    "paced-batched-256": (1, 50.0, 256, 50.0, 200),
    "paced-batched-64": (1, 50.0, 64, 50.0, 200),
    "paced-pertoken-64": (1, 0.0, 64, 50.0, 200),
    "paced-pertoken-256": (1, 0.0, 256, 50.0, 200),
    "pertoken-qos0-1": (0, 0.0, 1, 0.0, 1000),
    "pertoken-qos0-8": (0, 0.0, 8, 0.0, 1000),
    "pertoken-qos0-64": (0, 0.0, 64, 0.0, 1000),
    "pertoken-qos1-8": (1, 0.0, 8, 0.0, 1000),
    "batched-qos1-64": (1, 50.0, 64, 0.0, 1000),
    "batched-qos1-256": (1, 50.0, 256, 0.0, 1000),
}
METRICS = [("tokens_per_s", "tok/s", ".0f"), ("bridge_us_per_token", "µs/token", ".1f"),
           ("rss_per_stream", "KiB/stream", ".0f"), ("token_latency_ms_p50", "lat p50 ms", ".1f"),
           ("ttft_ms_p50", "TTFT p50 ms", ".1f"),
           ("max_gap_s", "silence s", ".2f"), ("others_cpu_pct", "others %", ".0f")]


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return None
    return statistics.fmean(values) / (1024 if key == "rss_per_stream" else 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path, required=True,
                   help="a checkout whose bridge/ package is the 'before' version")
    p.add_argument("--passes", type=int, default=2, help="ABBA passes per cell (default 2)")
    p.add_argument("--cells", default=",".join(CELLS),
                   help=f"comma-separated, of: {', '.join(CELLS)}")
    a = p.parse_args(argv)
    if not (a.before / "bridge" / "__init__.py").is_file():
        p.error(f"{a.before} holds no bridge/ package")
    names = [n.strip() for n in a.cells.split(",") if n.strip()]
    unknown = [n for n in names if n not in CELLS]
    if unknown:
        p.error(f"unknown cells {unknown}; choose from {', '.join(CELLS)}")
    versions = {"before": a.before.resolve(), "after": REPO}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    raw: dict[int, list[float]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp, \
            procs.fake_llama(slots=512) as fake, procs.broker("mosquitto") as broker:
        ctx = Ctx(FULL, Path(tmp), fake=fake)

        def limit() -> None:
            for qos in raw:
                rate = raw_cell(ctx, broker, qos=qos, size=PER_TOKEN_BYTES)["msgs_per_s"]
                if rate:
                    raw[qos].append(rate)

        limit()
        for name in names:
            qos, flush, streams, rate, tokens = CELLS[name]
            for i in range(a.passes):
                order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
                for version in order:
                    results.setdefault((name, version), []).append(stream_cell(
                        ctx, broker, qos=qos, flush=flush, streams=streams,
                        prompt=f"fake: rate={rate:g} tokens={tokens}",
                        label=f"{version:<6} {name}", source=versions[version]))
        limit()
    headers = ["cell"] + [f"{label} before → after" for _, label, _ in METRICS] + ["of raw"]
    rows = []
    for name in names:
        qos, flush, *_ = CELLS[name]
        cells = [name]
        for key, _, spec in METRICS:
            before = _mean(results[(name, "before")], key)
            after = _mean(results[(name, "after")], key)
            cells.append(f"{_f(before, spec)} → {_f(after, spec)}")
        limit_rate = statistics.fmean(raw[qos]) if raw[qos] else 0.0
        if flush == 0 and limit_rate:
            b = _mean(results[(name, "before")], "msgs_per_s") or 0.0
            c = _mean(results[(name, "after")], "msgs_per_s") or 0.0
            cells.append(f"{100 * b / limit_rate:.0f}% → {100 * c / limit_rate:.0f}%")
        else:
            cells.append("-")
        rows.append(cells)
    print(f"raw paho limit (msg/s, {PER_TOKEN_BYTES} B, before and after the cells): "
          + "; ".join(f"QoS {q}: " + ", ".join(f"{v:.0f}" for v in vs) for q, vs in raw.items()))
    print(f"means of {a.passes} cell(s) per version, ABBA\n")
    print(md_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
