"""The relay's fast paths (docs/performance.md): same results as the slow ways they replace."""

from __future__ import annotations

import http.client
import itertools
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.llama.dechunk import Dechunker
from bridge.llama.events import EventAccumulator, Kind, _decode_chunk
from bridge.llama.sse import SSEParser
from bridge.llama.types import Delta, TextDelta
from bridge.mqtt.link import _publish_props
from bridge.protocol.errors import BackendProtocolError, BridgeError


class _Pieces:
    """A reader whose ``read1`` returns the given pieces, then b"" (EOF)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def read1(self, size: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def _chunked(parts: list[bytes], *, ext: bool = False, trailer: bool = False) -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=1" if ext else b"", p) for p in parts if p)
    return out + b"0\r\n" + (b"Trailer: yes\r\n" if trailer else b"") + b"\r\n"


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _read_all(dechunker: Dechunker) -> bytes:
    out = b""
    while piece := dechunker.read(65536):
        out += piece
    return out


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.binary(max_size=40), max_size=8),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
       ext=st.booleans(), trailer=st.booleans())
def test_dechunker_decodes_any_split(parts: list[bytes], cuts: list[int], ext: bool,
                                     trailer: bool) -> None:
    wire = _chunked(parts, ext=ext, trailer=trailer) + b"ignored: next response"
    assert _read_all(Dechunker(_Pieces(_cut(wire, cuts)))) == b"".join(parts)


def test_dechunker_reads_many_chunks_at_once() -> None:
    events = [b"data: {\"n\": %d}\n\n" % i for i in range(100)]
    dechunker = Dechunker(_Pieces([_chunked(events)]))
    assert dechunker.read(65536) == b"".join(events)  # one call, not one per chunk
    assert dechunker.read(65536) == b""


def test_dechunker_eof_mid_body_is_incomplete_read() -> None:
    dechunker = Dechunker(_Pieces([b"5\r\nhel"]))
    assert dechunker.read(100) == b"hel"
    with pytest.raises(http.client.IncompleteRead):
        dechunker.read(100)


@pytest.mark.parametrize("wire", [b"zz\r\nabc\r\n", b"3\r\nabcXY", b"-3\r\nabc\r\n"])
def test_dechunker_bad_framing_is_protocol_error(wire: bytes) -> None:
    with pytest.raises(BackendProtocolError, match="malformed HTTP chunk"):
        _read_all(Dechunker(_Pieces([wire])))


@pytest.mark.parametrize("correlation", [None, b"", b"abc", bytes(range(256))])
def test_publish_properties_pack_like_fresh_ones(correlation: bytes | None) -> None:
    fresh = Properties(PacketTypes.PUBLISH)
    fresh.ContentType = "application/json"
    if correlation is not None:
        fresh.CorrelationData = correlation
    cached = _publish_props(correlation)
    assert cached.pack() == fresh.pack()
    assert cached is _publish_props(correlation)
    assert cached.ContentType == "application/json"


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(max_size=12), min_size=1, max_size=6),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
       crlf=st.booleans())
def test_sse_lf_fast_path_matches_crlf_path(texts: list[str], cuts: list[int],
                                            crlf: bool) -> None:
    # The same events with LF (fast path) and CRLF (regex path) line endings.
    def wire(eol: bytes) -> bytes:
        return b"".join(b"data: " + t.replace("\n", " ").replace("\r", " ").encode()
                        + eol + b":ping" + eol + eol for t in texts)

    def parse(data: bytes) -> list[object]:
        parser = SSEParser()
        items: list[object] = []
        for piece in _cut(data, cuts):
            items += parser.feed(piece)
        return items + parser.finish()

    assert parse(wire(b"\n")) == parse(wire(b"\r\n" if crlf else b"\r"))


# A value of any JSON type: the typed path must hand unusual ones to the lenient path.
_odd = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=4),
                 st.lists(st.integers(0, 2), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_call = st.fixed_dictionaries({}, optional={
    "index": st.one_of(st.integers(0, 3), _odd), "id": _odd,
    "function": st.one_of(st.fixed_dictionaries({}, optional={"name": _odd, "arguments": _odd}),
                          _odd)})
_delta = st.fixed_dictionaries({}, optional={
    "content": st.one_of(st.text(max_size=6), _odd),
    "reasoning_content": st.one_of(st.text(max_size=6), _odd),
    "tool_calls": st.one_of(st.lists(st.one_of(_call, _odd), max_size=2), _odd)})
_choice = st.fixed_dictionaries({"index": st.just(0)}, optional={
    "delta": st.one_of(_delta, _odd), "text": st.one_of(st.text(max_size=6), _odd),
    "finish_reason": st.one_of(st.sampled_from(["stop", "length", ""]), _odd)})
_chunk = st.fixed_dictionaries({"object": st.just("chat.completion.chunk")}, optional={
    "choices": st.one_of(st.lists(st.one_of(_choice, _odd), max_size=2), _odd),
    "usage": st.one_of(st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9),
                                              "completion_tokens": st.integers(0, 9)}), _odd),
    "timings": _odd, "error": _odd, "id": st.text(max_size=8)})


def _outcome(acc: EventAccumulator, run: Callable[[], list[Delta]]) -> tuple[object, ...]:
    try:
        result: object = run()
    except BridgeError as exc:
        result = (type(exc).__name__, str(exc))
    return result, acc.finish_reason, acc.usage, acc.timings, acc.done


@given(chunk=_chunk, kind=st.sampled_from(["chat", "completion"]))
@settings(max_examples=400, deadline=None)
def test_typed_event_decoding_matches_the_lenient_path(chunk: dict[str, object],
                                                       kind: Kind) -> None:
    data = json.dumps(chunk)
    typed, lenient = EventAccumulator(kind, "u"), EventAccumulator(kind, "u")
    assert _outcome(typed, lambda: typed.event(data, "message")) == \
        _outcome(lenient, lambda: lenient._lenient(data, "message"))


def test_usual_event_takes_the_typed_path() -> None:
    # llama-server's token event, as tests/support/fake_llama/fast.py writes it (xllamacpp 2026.10).
    data = ('{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" abcd"}}],'
            '"created":1764612345,"id":"chatcmpl-0123","model":"gemma-3-270m-it-Q4_K_M.gguf",'
            '"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}')
    acc = EventAccumulator("chat", "u")
    typed = acc._typed(_decode_chunk(data))  # raises if the typed decoder refuses it
    assert typed == [TextDelta(" abcd")] == acc.event(data, "message")
