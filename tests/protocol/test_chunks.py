"""Tests of bridge.protocol.chunks: size bound, exact text, seq order, graphemes, batching."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Literal

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.protocol.chunks import (
    MAX_SEQ,
    MIN_CHUNK_BYTES,
    Chunker,
    SeqCounter,
    escaped_len,
    smallest_chunk_bytes,
    split_to_fit,
)
from bridge.protocol.fit import smallest_payload
from bridge.protocol.messages import ChunkMsg, decode_reply, json_text
from bridge.protocol.topics import ID_PATTERN
from tests.support.clock import FakeClock

PROPERTY = settings(max_examples=1000, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ZALGO = "Z" + "\u0300" * 70  # one grapheme of 141 escaped bytes: larger than small budgets
ATOMS = [
    "a", "Z", "0", " ", "hello", "\t", "\n", "\r", "\r\n", '"', "\\", '\\"', "\x00", "\x01",
    "\x1f", "\x7f", "\u2028", "\u2029", "é", "e\u0301", "\u0301", "\u0308\u0301", "漢", "字",
    "日本語", "한", "\u1100\u1161\u11a8", "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "\u200d",
    "🇫🇷", "🇺🇸", "🇦", "1\ufe0f\u20e3",
    "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # tag sequence flag
    "क्षि", "\u0600", "\ufeff", "\U0010ffff", ZALGO,
]
chars = st.characters(exclude_categories=["Cs"])
piece = st.one_of(st.sampled_from(ATOMS), chars, st.text(chars, max_size=6))
repeated = st.builds(lambda p, n: p * n, st.sampled_from(ATOMS[:-1]) | chars, st.integers(20, 150))
run = st.one_of(piece, piece, piece, repeated)
texts = st.lists(run, max_size=40).map("".join)


@st.composite
def streams(draw: st.DrawFn, text: st.SearchStrategy[str] = texts) -> list[str]:
    """A text cut into deltas at arbitrary code-point offsets (empty deltas included)."""
    s = draw(text)
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, len(s)), max_size=len(s) + 2)))
    else:  # token-like: mostly 1-6 chars
        cuts = list(accumulate(draw(st.lists(st.integers(0, 6), max_size=len(s) + 1))))
        cuts = [c for c in cuts if c <= len(s)]
    bounds = [0, *cuts, len(s)]
    return [s[a:b] for a, b in pairwise(bounds)]


ids = st.one_of(st.just("i" * 64), st.from_regex(ID_PATTERN, fullmatch=True))
seq_starts = st.one_of(st.sampled_from([0, 7, 98, 9_998, 10**9 - 2, 10**9]),
                       st.integers(0, 10**9))
chunk_sizes = st.one_of(st.integers(128, 300), st.integers(128, 4096))
fields = st.sampled_from(["text", "reasoning"])


def envelope(request_id: str, seq: int, fld: str) -> int:
    return len(json_text({"type": "chunk", "id": request_id, "seq": seq, fld: ""}).encode())


def grapheme_bounds(text: str) -> set[int]:
    return {0, *accumulate(map(len, regex.findall(r"\X", text)))}


@dataclass
class Recorder:
    """Checks every payload as it comes out and collects what the stream produced."""

    request_id: str
    fld: Literal["text", "reasoning"]
    chunk_bytes: int
    texts: list[str] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)

    def take(self, payloads: list[bytes]) -> str:
        got = []
        for p in payloads:
            assert len(p) <= self.chunk_bytes, (len(p), p)
            msg = decode_reply(p.decode("utf-8"))
            assert isinstance(msg, ChunkMsg)
            assert msg.id == self.request_id
            text = msg.text if self.fld == "text" else msg.reasoning
            other = msg.reasoning if self.fld == "text" else msg.text
            assert text and other is None
            # the exact compact format json.dumps(ensure_ascii=False) would write
            assert p == json_text({"type": "chunk", "id": msg.id, "seq": msg.seq,
                                   self.fld: text}).encode()
            self.texts.append(text)
            self.seqs.append(msg.seq)
            got.append(text)
        return "".join(got)

    def boundaries(self) -> list[int]:
        return list(accumulate(map(len, self.texts)))[:-1]


# ------------------------------------------------------------------- properties


@PROPERTY
@given(deltas=streams(), request_id=ids, start=seq_starts, chunk_bytes=chunk_sizes,
       fld=fields, flush_s=st.sampled_from([0.0, 0.05]), data=st.data())
def test_stream_invariants(deltas: list[str], request_id: str, start: int, chunk_bytes: int,
                           fld: Literal["text", "reasoning"], flush_s: float,
                           data: st.DataObject) -> None:
    """(1) bound, (2) valid ChunkMsg, (3) exact text, (4) contiguous seqs, (5) graphemes,
    first delta at once, (7) per-token mode; other messages take seqs in between."""
    seq = SeqCounter(start)
    clock = FakeClock()  # frozen: only the bound (and the first delta) may force output
    ch = Chunker(request_id, seq, chunk_bytes=chunk_bytes, flush_s=flush_s, field=fld, clock=clock)
    rec = Recorder(request_id, fld, chunk_bytes)
    others: list[int] = []
    first_end: int | None = None
    fed = 0
    for d in deltas:
        if data.draw(st.integers(0, 9)) == 0:
            others.append(seq.take())  # a progress message between chunks
        out = rec.take(ch.feed(d))
        fed += len(d)
        if d and first_end is None:
            first_end = fed
            assert out == d and not ch.pending  # first token latency
        elif d and flush_s == 0:
            assert out == d and not ch.pending  # per-token mode
        elif not d:
            assert out == ""
        assert ch.pending == (len("".join(rec.texts)) < fed)
        assert (ch.due() is None) == (not ch.pending)
    rec.take(ch.flush())
    assert not ch.pending and ch.due() is None and ch.flush() == []

    text = "".join(deltas)
    assert "".join(rec.texts) == text
    assert rec.seqs == sorted(rec.seqs)
    assert sorted(rec.seqs + others) == list(range(start, seq.next))

    # Graphemes: check wherever every grapheme fits the smallest budget the stream had.
    budget = chunk_bytes - envelope(request_id, seq.next, fld)
    if all(escaped_len(g) <= budget for g in regex.findall(r"\X", text)):
        good = grapheme_bounds(text)
        delta_ends = set(accumulate(map(len, deltas)))
        for b in rec.boundaries():
            # A cut the chunker chose (not forced by a delta boundary) is a grapheme boundary.
            assert b in good or b in delta_ends, (b, text)
            if flush_s > 0:
                # Frozen clock: every cut after the first delta's is chosen by the chunker.
                assert b in good or b == first_end, (b, text)


@PROPERTY
@given(deltas=streams(), request_id=ids, start=seq_starts, chunk_bytes=chunk_sizes,
       flush_s=st.sampled_from([0.001, 0.05, 1.0]), data=st.data())
def test_batching_timing(deltas: list[str], request_id: str, start: int, chunk_bytes: int,
                         flush_s: float, data: st.DataObject) -> None:
    """(6) Nothing but the first delta leaves early unless the bound forces it; due() and
    poll() follow flush_s from the first buffered delta."""
    seq = SeqCounter(start)
    clock = FakeClock()
    ch = Chunker(request_id, seq, chunk_bytes=chunk_bytes, flush_s=flush_s, clock=clock)
    rec = Recorder(request_id, "text", chunk_bytes)
    fed = ""
    fed_at: list[float] = []  # feed time of every code point fed
    started = False
    for d in deltas:
        clock.now += data.draw(st.sampled_from([0.0, 0.0, flush_s / 3, flush_s, 2 * flush_s]))
        if data.draw(st.booleans()):
            due = ch.due()
            out = rec.take(ch.poll())
            if due is not None and clock.now >= due:
                assert out and not ch.pending
            else:
                assert out == ""
        buffered = fed[len("".join(rec.texts)):]
        due_before = ch.due()
        budget = chunk_bytes - envelope(request_id, seq.next, "text")
        out = rec.take(ch.feed(d))
        fed += d
        fed_at += [clock.now] * len(d)
        if not d:
            assert out == "" and ch.due() == due_before  # ignored, even when overdue
            continue
        if not started:
            started = True
            assert out == d and not ch.pending
        elif due_before is not None and clock.now >= due_before:
            assert not ch.pending and out == buffered + d  # overdue: all of it goes
        elif escaped_len(buffered + d) > budget:
            assert out  # the bound forces a chunk out
        else:
            assert out == "" and ch.pending  # coalesced
        emitted = len("".join(rec.texts))
        assert ch.pending == (emitted < len(fed))
        due = ch.due()
        if ch.pending:
            assert due is not None
            assert clock.now < due <= fed_at[emitted] + flush_s
        else:
            assert due is None
    clock.now += flush_s  # every buffered delta is now at least flush_s old
    rec.take(ch.poll())
    assert not ch.pending and ch.flush() == []
    assert "".join(rec.texts) == fed
    assert rec.seqs == list(range(start, seq.next))


@PROPERTY
@given(text=texts, budget=st.integers(6, 400))
def test_split_to_fit(text: str, budget: int) -> None:
    head, tail = split_to_fit(text, budget)
    assert head + tail == text
    assert escaped_len(head) <= budget
    if not tail:
        return
    assert head
    first = regex.match(r"\X", text)
    assert first is not None
    if escaped_len(first[0]) <= budget:
        assert len(head) in grapheme_bounds(text)
        nxt = regex.match(r"\X", tail)  # tail starts at a boundary
        assert nxt is not None and escaped_len(head + nxt[0]) > budget  # maximal
    else:
        assert escaped_len(head + tail[0]) > budget  # cut inside the grapheme, maximal


@PROPERTY
@given(text=st.text(chars, max_size=50))
def test_escaped_len_matches_json(text: str) -> None:
    assert escaped_len(text) == len(json.dumps(text, ensure_ascii=False).encode()) - 2


# ------------------------------------------------------------------- examples


def payload(request_id: str, seq: int, text: str, fld: str = "text") -> bytes:
    return json_text({"type": "chunk", "id": request_id, "seq": seq, fld: text}).encode()


def test_exact_payloads_and_coalescing() -> None:
    clock = FakeClock(10.0)
    seq = SeqCounter()
    ch = Chunker("r1", seq, chunk_bytes=512, flush_s=0.05, clock=clock)
    assert ch.feed("Hi") == [b'{"type":"chunk","id":"r1","seq":0,"text":"Hi"}']
    assert ch.feed("") == [] and not ch.pending and ch.due() is None
    clock.now = 10.01
    assert ch.feed(" the") == [] and ch.due() == pytest.approx(10.06)
    clock.now = 10.03
    assert ch.feed("re \"x\"\n") == [] and ch.due() == pytest.approx(10.06)
    assert ch.poll() == []
    assert seq.take() == 1  # a progress message in between
    clock.now = 10.06
    assert ch.poll() == [b'{"type":"chunk","id":"r1","seq":2,"text":" there \\"x\\"\\n"}']
    assert ch.poll() == [] and ch.due() is None
    assert seq.next == 3


def test_reasoning_field() -> None:
    ch = Chunker("r", SeqCounter(), chunk_bytes=128, flush_s=0.05, field="reasoning")
    out = ch.feed("think")
    assert out == [b'{"type":"chunk","id":"r","seq":0,"reasoning":"think"}']
    msg = decode_reply(out[0])
    assert isinstance(msg, ChunkMsg) and msg.reasoning == "think" and msg.text is None


def test_bound_forces_buffer_out_and_new_delta_starts_buffer() -> None:
    clock = FakeClock()
    ch = Chunker("r", SeqCounter(), chunk_bytes=128, flush_s=1.0, clock=clock)
    budget = 128 - envelope("r", 1, "text")
    ch.feed("x")
    assert ch.feed("a" * (budget - 3)) == []
    assert ch.feed("bbbb") == [payload("r", 1, "a" * (budget - 3))]
    assert ch.pending and ch.flush() == [payload("r", 2, "bbbb")]


def test_oversized_delta_is_split_and_tail_buffered() -> None:
    ch = Chunker("r", SeqCounter(), chunk_bytes=128, flush_s=1.0, clock=FakeClock())
    ch.feed("x")
    out = ch.feed('"' * 200)  # 400 escaped bytes
    assert out and all(127 <= len(p) <= 128 for p in out)  # full: one more \" would not fit
    assert ch.pending
    texts = [m.text for m in map(decode_reply, out + ch.flush()) if isinstance(m, ChunkMsg)]
    assert "".join(t or "" for t in texts) == '"' * 200


def test_zwj_sequence_spanning_deltas_is_kept_together() -> None:
    ch = Chunker("r", SeqCounter(), chunk_bytes=128, flush_s=1.0, clock=FakeClock())
    budget = 128 - envelope("r", 1, "text")
    ch.feed("x")
    ch.feed("a" * (budget - 4))
    ch.feed("👨")  # exactly fills the buffer: held, the next delta may continue it
    out = ch.feed("\u200d👩\u200d👧")
    assert out == [payload("r", 1, "a" * (budget - 4))]
    assert ch.flush() == [payload("r", 2, "👨\u200d👩\u200d👧")]


def test_flag_pairs_across_per_token_deltas() -> None:
    """A delta that starts in the middle of a flag is cut in the context of the previous one."""
    rec = Recorder("r", "text", 128)
    ch = Chunker("r", SeqCounter(), chunk_bytes=128, flush_s=0.0)
    deltas = ["🇫", "🇷" + "🇫🇷" * 40]
    for d in deltas:
        assert rec.take(ch.feed(d)) == d
    good = grapheme_bounds("".join(deltas))
    assert len(rec.texts) > 3 and rec.boundaries()[0] == 1  # the first delta goes alone
    assert all(b in good for b in rec.boundaries()[1:])


def test_carried_grapheme_keeps_its_deadline() -> None:
    clock = FakeClock(0.0)
    ch = Chunker("r", SeqCounter(), chunk_bytes=128, flush_s=1.0, clock=clock)
    budget = 128 - envelope("r", 1, "text")
    ch.feed("x")
    clock.now = 0.5
    ch.feed("a" * (budget - 4))
    clock.now = 0.7
    ch.feed("👨")
    clock.now = 0.9
    assert ch.feed("\u200d👩") == [payload("r", 1, "a" * (budget - 4))]
    assert ch.due() == 1.5  # "👨" has been waiting since 0.5's buffer began: no later


def test_flags_not_split() -> None:
    head, tail = split_to_fit("🇫🇷🇫🇷🇫🇷", 10)
    assert (head, tail) == ("🇫🇷", "🇫🇷🇫🇷")


def test_oversized_grapheme_split_at_code_points() -> None:
    ch = Chunker("r", SeqCounter(), chunk_bytes=128, flush_s=0.0)
    out = ch.feed(ZALGO * 2)
    texts = [m.text or "" for m in map(decode_reply, out) if isinstance(m, ChunkMsg)]
    assert "".join(texts) == ZALGO * 2 and all(len(p) <= 128 for p in out)
    assert len(out) >= 3


def test_max_id_and_ten_digit_seq() -> None:
    rid = "i" * 64
    seq = SeqCounter(10**9)
    ch = Chunker(rid, seq, chunk_bytes=128, flush_s=0.0)
    out = ch.feed("\x01" * 10)  # 6 bytes each: barely one per chunk at this envelope
    assert out and all(len(p) <= 128 for p in out)
    assert [m.seq for m in map(decode_reply, out)] == list(range(10**9, 10**9 + len(out)))


def test_seq_digit_growth_between_buffering_and_flush() -> None:
    seq = SeqCounter(8)
    ch = Chunker("r", seq, chunk_bytes=128, flush_s=1.0, clock=FakeClock())
    ch.feed("x")  # seq 8
    budget = 128 - envelope("r", 9, "text")
    assert ch.feed("y" * budget) == []  # fits exactly with a 1-digit seq
    seq.take()  # seq 9 goes to another message; the chunk gets the 2-digit seq 10
    out = ch.flush()
    assert len(out) == 2 and all(len(p) <= 128 for p in out)


def test_lone_surrogate_becomes_replacement_char() -> None:
    ch = Chunker("r", SeqCounter(), chunk_bytes=128, flush_s=0.0)
    assert ch.feed("a\ud800b") == [payload("r", 0, "a\ufffdb")]


def test_escaped_len_examples() -> None:
    assert escaped_len('"') == 2
    assert escaped_len("\\") == 2
    assert escaped_len("\n") == 2
    assert escaped_len("\x01") == 6
    assert escaped_len("é") == 2
    assert escaped_len("😀") == 4
    assert escaped_len("\u2028") == 3
    assert escaped_len("\ud800") == 3


def test_seq_counter() -> None:
    s = SeqCounter(5)
    assert s.next == 5 and s.take() == 5 and s.take() == 6 and s.next == 7
    with pytest.raises(ValueError):
        SeqCounter(-1)


@pytest.mark.parametrize("kwargs", [
    {"chunk_bytes": smallest_chunk_bytes("r") - 1},
    {"chunk_bytes": 128, "request_id": "i" * 65},
    {"chunk_bytes": 128, "request_id": ""},
    {"chunk_bytes": 128, "request_id": "é" * 64},  # 128 bytes of id: no room left
    {"chunk_bytes": 512, "flush_s": -1.0},
    {"chunk_bytes": 512, "flush_s": float("nan")},
    {"chunk_bytes": 512, "field": "content"},
])
def test_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"request_id": "r", "flush_s": 0.05, **kwargs}
    rid = args.pop("request_id")
    with pytest.raises(ValueError):
        Chunker(rid, SeqCounter(), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["text", "reasoning"])
def test_smallest_chunk_a_device_can_ask_for_holds_any_character_at_any_seq(
        kind: Literal["text", "reasoning"]) -> None:
    """Below MIN_CHUNK_BYTES when a device's max_packet asks for it: down to the size
    bridge.protocol.fit.smallest_payload promises, one escaped character at a 10-digit seq."""
    least = smallest_chunk_bytes("r" * 64, kind)
    assert least < MIN_CHUNK_BYTES
    assert least <= smallest_payload("r" * 64, reasoning=kind == "reasoning")
    text = "\x01😀é\"a"
    ch = Chunker("r" * 64, SeqCounter(MAX_SEQ - 10), chunk_bytes=least, flush_s=0.0, field=kind)
    out = [p for c in text for p in ch.feed(c)]
    assert all(len(p) <= least for p in out) and len(out) == len(text)
    assert "".join(getattr(decode_reply(p), kind) for p in out) == text
    with pytest.raises(ValueError):
        Chunker("r" * 64, SeqCounter(), chunk_bytes=least - 1, flush_s=0.0, field=kind)


def test_large_delta_is_linear() -> None:
    ch = Chunker("r", SeqCounter(), chunk_bytes=128, flush_s=0.05)
    text = ("word é😀 " * 20_000)
    out = ch.feed(text) + ch.flush()
    msgs = [decode_reply(p) for p in out]
    assert "".join(m.text or "" for m in msgs if isinstance(m, ChunkMsg)) == text
