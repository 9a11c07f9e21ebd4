"""The measuring and the tables of :mod:`bench.affinity`.

:class:`CpuWatch` tells the benchmark's CPU time from the rest of the machine's,
:func:`slot_choices` reads how llama-server picked slots from its log, and the tables
group turns by mode and turn number, as Markdown.

A row is one turn as :class:`bench.affinity.Turn` turned into a dict. The cache share of
a group is the share of its prompt tokens that llama-server took from its cache:
sum(cache_n) / sum(cache_n + prompt_n). "Moved" is the share of a group's turns (turn 2
on) that ran on another backend than the conversation's previous turn.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

Row = dict[str, Any]


class CpuWatch:
    """CPU time of the benchmark's processes and of everything else on the machine.

    Other sessions may share the machine: "others" (in % of one core, over the window)
    says how much of it they took, so a noisy phase can be told apart.
    """

    def __init__(self, pids: list[int]) -> None:
        self._procs = [psutil.Process(pid) for pid in pids]
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
        ours = 0.0
        for proc in self._procs:
            with contextlib.suppress(psutil.Error):
                c = proc.cpu_times()
                ours += c.user + c.system
        return time.monotonic(), float(busy), ours

    def stop(self) -> dict[str, float]:
        """CPU % of one core since construction: ``ours`` and ``others``."""
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._read()
        wall = max(t1 - t0, 1e-9)
        return {"ours": round(100 * (ours1 - ours0) / wall, 1),
                "others": round(100 * max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall, 1)}


def slot_choices(logs: list[Path], since: list[int]) -> dict[str, int]:
    """How llama-server picked slots since the given log offsets (its own words)."""
    out = {"by prompt similarity": 0, "by least recent use": 0}
    for path, offset in zip(logs, since, strict=True):
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        out["by prompt similarity"] += text.count("selected slot by LCP similarity")
        out["by least recent use"] += text.count("selected slot by LRU")
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _stats(rows: list[Row]) -> dict[str, float | None]:
    """TTFT median/mean/p90 (ms), mean cache_n and prompt_n, and the cache share."""
    ttft = sorted(r["ttft_ms"] for r in rows if r["ttft_ms"] is not None)
    counted = [r for r in rows if r["cache_n"] is not None and r["prompt_n"] is not None]
    cache = sum(r["cache_n"] for r in counted)
    total = cache + sum(r["prompt_n"] for r in counted)
    return {
        "median": statistics.median(ttft) if ttft else None,
        "mean": statistics.fmean(ttft) if ttft else None,
        "p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] if ttft else None,
        "cache_n": statistics.fmean(r["cache_n"] for r in counted) if counted else None,
        "prompt_n": statistics.fmean(r["prompt_n"] for r in counted) if counted else None,
        "share": cache / total if total else None,
    }


def _moved(rows: list[Row], all_rows: list[Row]) -> str:
    """Share of ``rows`` (turn >= 2) whose backend differs from the previous turn's."""
    where = {(r["mode"], r["round"], r["conversation"], r["turn"]): r["backend"]
             for r in all_rows}
    pairs = [(where.get((r["mode"], r["round"], r["conversation"], r["turn"] - 1)),
              r["backend"]) for r in rows if r["turn"] >= 2]
    known = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not known:
        return "-"
    moved = sum(a != b for a, b in known)
    return f"{moved}/{len(known)} ({100 * moved / len(known):.0f} %)"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def _groups(later_from: int) -> list[tuple[str, Callable[[int], bool]]]:
    return [(f"1-{later_from - 1}", lambda t: t < later_from),
            (f">= {later_from}", lambda t: t >= later_from)]


def _table(rows: list[Row], modes: list[str], later_from: int, first_col: str) -> list[str]:
    lines = [f"| turns | {first_col} | turns measured | TTFT median ms | TTFT mean ms | "
             "TTFT p90 ms | prompt_n mean | cache_n mean | cache share | moved |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, keep in _groups(later_from):
        for mode in modes:
            group = [r for r in rows if r["mode"] == mode and keep(r["turn"])
                     and r["error"] is None]
            s = _stats(group)
            share = "-" if s["share"] is None else f"{100 * s['share']:.0f} %"
            lines.append(
                f"| {label} | {mode} | {len(group)} | {_ms(s['median'])} | {_ms(s['mean'])} | "
                f"{_ms(s['p90'])} | {_ms(s['prompt_n'])} | {_ms(s['cache_n'])} | {share} | "
                f"{_moved(group, rows)} |")
    return lines


def _later(rows: list[Row], mode: str, later_from: int, rnd: int | None = None) -> list[Row]:
    return [r for r in rows if r["mode"] == mode and r["turn"] >= later_from
            and r["error"] is None and (rnd is None or r["round"] == rnd)]


def direct_table(all_rows: list[Row], later_from: int, cpu: dict[str, float]) -> str:
    """The direct section: pinned, alternating and uncached conversations."""
    rows = [r for r in all_rows if r["section"] == "direct"]
    routes = ["pinned", "alternating", "uncached"]
    lines = ["Direct to llama-server, one request at a time:", "",
             *_table(rows, routes, later_from, "route"), ""]
    pinned = _stats(_later(rows, "pinned", later_from))
    for other in routes[1:]:
        s = _stats(_later(rows, other, later_from))
        lines.append(f"- turns >= {later_from}, pinned / {other}: TTFT median "
                     f"{_ratio(pinned['median'], s['median'])}, mean "
                     f"{_ratio(pinned['mean'], s['mean'])}")
    if cpu:
        lines.append(f"- CPU % of one core meanwhile: benchmark {cpu['ours']:.0f}, others "
                     f"{cpu['others']:.0f}")
    return "\n".join([*lines, ""])


def phase_table(all_rows: list[Row], later_from: int, slots: dict[str, dict[str, float]],
                phases: dict[str, tuple[str, int]]) -> str:
    """The bridge phases: affinity against no affinity, with the ratios per round."""
    rows = [r for r in all_rows if r["section"] == "bridge"]
    on, off = "affinity", "no affinity"
    errors = sum(r["error"] is not None for r in rows)
    lines = ["Through the bridge, conversations at once:", "",
             *_table(rows, [on, off], later_from, "mode"), ""]
    a, b = _stats(_later(rows, on, later_from)), _stats(_later(rows, off, later_from))
    lines.append(f"- turns >= {later_from}, affinity / no affinity: TTFT median "
                 f"{_ratio(a['median'], b['median'])}, mean {_ratio(a['mean'], b['mean'])}")
    for rnd in sorted({r["round"] for r in rows}):
        a = _stats(_later(rows, on, later_from, rnd))
        b = _stats(_later(rows, off, later_from, rnd))
        lines.append(f"  - round {rnd}: median {_ratio(a['median'], b['median'])}, mean "
                     f"{_ratio(a['mean'], b['mean'])}")
    lines.append(f"- turns that failed: {errors}")
    if errors:
        lines += [f"  - {r['mode']} round {r['round']} conversation {r['conversation']} turn "
                  f"{r['turn']}: {r['error']}" for r in rows if r["error"]][:5]
    lines += ["", "| phase | mode | round | llama-server's slot choices: by prompt similarity "
              "/ by least recent use | CPU % of one core: benchmark / others |",
              "|---|---|---:|---:|---:|"]
    for phase, c in slots.items():
        mode, rnd = phases.get(phase, ("-", "-"))
        lines.append(f"| {phase} | {mode} | {rnd} | {c['by prompt similarity']:.0f} / "
                     f"{c['by least recent use']:.0f} | {c['cpu % ours']:.0f} / "
                     f"{c['cpu % others']:.0f} |")
    return "\n".join([*lines, ""])
