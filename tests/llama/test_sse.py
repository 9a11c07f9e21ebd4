"""Unit and property tests of the incremental SSE parser (bridge.llama.sse)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.llama.sse import SSEComment, SSEEvent, SSEItem, SSEParser
from bridge.protocol.errors import BackendProtocolError


def parse(*chunks: bytes, max_event_bytes: int = 1 << 20) -> list[SSEItem]:
    """Feed the chunks in order, then finish."""
    parser = SSEParser(max_event_bytes)
    items: list[SSEItem] = []
    for chunk in chunks:
        items += parser.feed(chunk)
    return items + parser.finish()


# --------------------------------------------------------------------------- basics


def test_data_with_and_without_space_after_colon() -> None:
    assert parse(b"data: a\n\ndata:b\n\ndata:  c\n\n") == [
        SSEEvent("a"), SSEEvent("b"), SSEEvent(" c")]


def test_multi_line_data_joined_with_newline() -> None:
    assert parse(b"data: one\ndata: two\ndata:\n\n") == [SSEEvent("one\ntwo\n")]


def test_comment_frames_are_reported_and_do_not_make_events() -> None:
    assert parse(b":\n\n: keep-alive\n\ndata: x\n\n") == [
        SSEComment(""), SSEComment(" keep-alive"), SSEEvent("x")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings(eol: bytes) -> None:
    stream = (b"data: a" + eol + b"data: b" + eol + eol + b":" + eol + eol
              + b"data: [DONE]" + eol + eol)
    assert parse(stream) == [SSEEvent("a\nb"), SSEComment(""), SSEEvent("[DONE]")]


def test_crlf_split_between_cr_and_lf_is_one_line_ending() -> None:
    # If the LF after a chunk-final CR were taken as an empty line, "a" would be
    # dispatched on its own.
    assert parse(b"data: a\r", b"\n", b"data: b\r", b"\n\r", b"\n") == [SSEEvent("a\nb")]


def test_lone_cr_at_chunk_end_then_other_text() -> None:
    assert parse(b"data: a\r", b"\r", b"data: b\r\r") == [SSEEvent("a"), SSEEvent("b")]


def test_legacy_error_line_becomes_error_event() -> None:
    payload = b'{"code":500,"message":"boom","type":"server_error"}'
    assert parse(b"error: " + payload + b"\n\n") == [SSEEvent(payload.decode(), "error")]


def test_event_field_sets_type_and_resets_after_dispatch() -> None:
    assert parse(b"event: error\ndata: {}\n\ndata: x\n\n") == [
        SSEEvent("{}", "error"), SSEEvent("x")]


def test_unknown_fields_id_and_retry_are_ignored() -> None:
    assert parse(b"id: 7\nretry: 10\nfoo: bar\ndata: x\n\n") == [SSEEvent("x")]


def test_field_without_colon_is_an_empty_value() -> None:
    assert parse(b"data\n\n") == [SSEEvent("")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert parse(b"\n\n\r\n\n") == []


def test_byte_order_mark_at_stream_start_is_skipped() -> None:
    assert parse(b"\xef\xbb", b"\xbfdata: x\n\n") == [SSEEvent("x")]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert parse(b"data: a\xffb\n\n") == [SSEEvent("a\ufffdb")]


def test_multibyte_character_split_inside_code_point() -> None:
    raw = "data: h\u00e9llo \U0001f642 \u4e16\u754c\n\n".encode()
    chunks = [raw[i:i + 1] for i in range(len(raw))]
    assert parse(*chunks) == [SSEEvent("h\u00e9llo \U0001f642 \u4e16\u754c")]


def test_events_are_returned_as_soon_as_complete() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\ndata: b") == [SSEEvent("a")]
    assert parser.buffered_bytes == len(b"data: b")
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\n") == [SSEEvent("b")]
    assert parser.buffered_bytes == 0


def test_finish_flushes_an_unterminated_last_event() -> None:
    assert parse(b"data: [DONE]") == [SSEEvent("[DONE]")]
    assert parse(b"data: x\n") == [SSEEvent("x")]


# --------------------------------------------------------------------------- bounds


def test_oversized_line_without_terminator_raises() -> None:
    parser = SSEParser(max_event_bytes=100)
    parser.feed(b"data: " + b"x" * 90)
    with pytest.raises(BackendProtocolError, match="exceeds 100 bytes"):
        parser.feed(b"x" * 10)


def test_oversized_multi_line_event_raises() -> None:
    parser = SSEParser(max_event_bytes=100)
    with pytest.raises(BackendProtocolError):
        for _ in range(20):
            parser.feed(b"data: 0123456789\n")


def test_bound_is_per_event_not_per_stream() -> None:
    parser = SSEParser(max_event_bytes=64)
    items: list[SSEItem] = []
    for i in range(1000):
        items += parser.feed(b"data: %d\n\n" % i)
    assert len(items) == 1000
    assert parser.buffered_bytes == 0


def test_event_at_exactly_the_bound_is_accepted() -> None:
    line = b"data: " + b"y" * 50  # 56 bytes + 1 for the line feed = 57 counted
    assert parse(line + b"\n\n", max_event_bytes=57) == [SSEEvent("y" * 50)]


def test_max_event_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SSEParser(0)


# --------------------------------------------------------------------------- properties

line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
eols = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[SSEItem]]:
    """A valid SSE byte stream (mixed line endings, comments, UTF-8) and its items.

    One line ending per event: "CR" then "LF" for a blank line would read as one CRLF
    (the format itself is ambiguous there), and a real server never mixes them so.
    """
    raw = b""
    expected: list[SSEItem] = []
    for _ in range(draw(st.integers(1, 6))):
        eol = draw(eols)
        if draw(st.booleans()):
            comment = draw(line_text)
            raw += b":" + comment.encode() + eol
            expected.append(SSEComment(comment))
        lines = draw(st.lists(line_text, min_size=1, max_size=3))
        for value in lines:
            raw += b"data: " + value.encode() + eol
        raw += eol
        expected.append(SSEEvent("\n".join(lines)))
    return raw, expected


@settings(max_examples=300, deadline=None)
@given(streams(), st.data())
def test_any_split_yields_the_same_items(stream: tuple[bytes, list[SSEItem]],
                                         data: st.DataObject) -> None:
    raw, expected = stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert parse(*chunks) == expected


@settings(max_examples=100, deadline=None)
@given(streams())
def test_byte_by_byte_equals_one_piece(stream: tuple[bytes, list[SSEItem]]) -> None:
    raw, expected = stream
    assert parse(*(raw[i:i + 1] for i in range(len(raw)))) == parse(raw) == expected
