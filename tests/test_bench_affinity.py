"""bench.affinity: its tables from known turns, and a tiny run against the real things.

The tiny run (2 conversations x 3 turns, one phase per mode, two llama.cpp servers,
Mosquitto, the bridge as a subprocess) checks what the benchmark relies on, not how fast
anything is: every turn is answered with llama-server's ``cache_n`` and ``prompt_n``,
and with affinity each turn runs where the previous one did and reuses its cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.affinity import main
from bench.affinity_llama import user_message
from bench.affinity_report import direct_table, phase_table
from tests.support.local_broker import require_mosquitto


def _row(mode: str, conv: int, turn: int, ttft: float, cache_n: int, prompt_n: int,
         backend: str, section: str = "bridge") -> dict[str, Any]:
    return {"section": section, "mode": mode, "round": 1, "conversation": conv, "turn": turn,
            "ttft_ms": ttft, "cache_n": cache_n, "prompt_n": prompt_n, "backend": backend,
            "error": None}


def test_user_messages_repeat_per_turn_and_differ_by_tag() -> None:
    assert user_message(1, 2, 50, "p1") == user_message(1, 2, 50, "p2")  # only turn 1 is tagged
    first_a, first_b = user_message(1, 1, 50, "p1"), user_message(1, 1, 50, "p2")
    assert first_a != first_b and first_a[:5] != first_b[:5]
    assert user_message(1, 2, 50, "x") != user_message(2, 2, 50, "x")
    assert len(user_message(0, 3, 100, "x").split()) >= 100


def test_phase_table_ratio_cache_share_and_moves() -> None:
    rows = [
        _row("affinity", 0, 1, 1000, 0, 100, "a"), _row("affinity", 0, 2, 500, 300, 100, "a"),
        _row("no affinity", 0, 1, 1000, 0, 100, "a"),
        _row("no affinity", 0, 2, 2000, 100, 300, "b"),
    ]
    slots: dict[str, dict[str, float]] = {"p1": {
        "by prompt similarity": 2, "by least recent use": 0, "cpu % ours": 150,
        "cpu % others": 5}}
    text = phase_table(rows, 2, slots, {"p1": ("affinity", 1)})
    assert "| >= 2 | affinity | 1 | 500 | 500 | 500 | 100 | 300 | 75 % | 0/1 (0 %) |" in text
    assert "| >= 2 | no affinity | 1 | 2,000 | 2,000 | 2,000 | 300 | 100 | 25 % | 1/1 (100 %) |" \
        in text
    assert "affinity / no affinity: TTFT median 0.25, mean 0.25" in text
    assert "| p1 | affinity | 1 | 2 / 0 | 150 / 5 |" in text


def test_direct_table_ratios() -> None:
    rows = [_row(route, i, 2, ttft, 0, 10, "s", section="direct")
            for i, (route, ttft) in enumerate([("pinned", 100), ("alternating", 200),
                                               ("uncached", 400)])]
    text = direct_table(rows, 2, {})
    assert "pinned / alternating: TTFT median 0.50" in text
    assert "pinned / uncached: TTFT median 0.25" in text


@pytest.mark.llama
@pytest.mark.mosquitto
@pytest.mark.timeout(600)
def test_tiny_run_affinity_keeps_conversations_on_their_backend(tmp_path: Path) -> None:
    require_mosquitto()
    out = tmp_path / "turns.json"
    assert main(["--conversations", "2", "--turns", "3", "--rounds", "1",
                 "--direct-turns", "0", "--words", "20", "--max-tokens", "4",
                 "--think-s", "0,0.2", "--parallel", "1", "--ctx-per-slot", "1024",
                 "--later-from", "2", "--json", str(out)]) == 0
    turns = json.loads(out.read_text())["turns"]
    assert len(turns) == 12, turns  # 2 phases x 2 conversations x 3 turns
    for t in turns:
        assert t["error"] is None, t
        assert isinstance(t["cache_n"], int) and isinstance(t["prompt_n"], int), t
        assert t["ttft_ms"] is not None and t["backend"] is not None, t
    affine = {(t["conversation"], t["turn"]): t for t in turns if t["mode"] == "affinity"}
    for (conv, turn), t in affine.items():
        if turn >= 2:
            assert t["backend"] == affine[(conv, turn - 1)]["backend"], affine
            assert t["cache_n"] > 0, t
