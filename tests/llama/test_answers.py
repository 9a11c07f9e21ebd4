"""The text API's shaping (bridge/llama/answers.py): pure functions, no server."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.llama.answers import (
    DEBUG_KEYS,
    StreamedAnswer,
    debug_record,
    delta_text,
    error_text,
    fill_debug_info,
    generation_answer,
    generation_debug,
    generation_text,
    join_tool_calls,
    usage_dict,
)
from bridge.llama.types import (
    Delta,
    Generation,
    ReasoningDelta,
    StreamEnd,
    TextDelta,
    ToolCallDelta,
)
from bridge.protocol.errors import IdleTimeout
from bridge.protocol.messages import Usage

CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}


@pytest.mark.parametrize(("delta", "text"), [
    (TextDelta("Hi"), "Hi"), (TextDelta(""), None), (ReasoningDelta("hmm"), None),
    (ToolCallDelta(0, "c1", "f", "{}"), None), (StreamEnd("stop"), None)])
def test_only_non_empty_text_deltas_are_answer_text(delta: Delta, text: str | None) -> None:
    assert delta_text(delta) == text


def test_tool_call_fragments_join_by_index() -> None:
    fragments = [ToolCallDelta(0, id="a", name="get_weather", arguments='{"ci'),
                 ToolCallDelta(1, id="b", name="get_time"),
                 ToolCallDelta(0, arguments='ty": "Paris"}'),
                 ToolCallDelta(1, arguments="{}"),
                 ToolCallDelta(0, id="ignored", name="ignored")]
    assert join_tool_calls(fragments) == [
        {"id": "a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert join_tool_calls([ToolCallDelta(3, arguments="{}")]) == [
        {"id": None, "type": "function", "function": {"name": None, "arguments": "{}"}}]
    assert join_tool_calls([]) == []


def test_generation_answer_is_the_tool_calls_else_the_text() -> None:
    with_calls = Generation(content=None, tool_calls=[CALL], finish_reason="tool_calls")
    assert generation_answer(with_calls) == [CALL]
    text = Generation(content="Hello", tool_calls=None, finish_reason="stop")
    assert generation_answer(text) == "Hello" == generation_text(text)
    empty = Generation(content=None, tool_calls=[], finish_reason="stop")
    assert generation_answer(empty) == "" == generation_text(empty)


def test_usage_dict_adds_the_total() -> None:
    assert usage_dict(Usage(prompt_tokens=7, completion_tokens=5)) == {
        "prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert usage_dict(None) is None


def test_debug_record_has_every_key() -> None:
    record = debug_record("http://h:1", started_at=10.0, ended_at=12.5, finish_reason="length",
                          usage=Usage(prompt_tokens=1, completion_tokens=2),
                          timings={"predicted_n": 2}, first_token_at=10.25,
                          tool_calls=[CALL], reasoning="r", error=IdleTimeout("quiet"))
    assert record == {
        "backend": "http://h:1", "finish_reason": "length",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "timings": {"predicted_n": 2}, "ttft_s": 0.25, "elapsed_s": 2.5,
        "tool_calls": [CALL], "reasoning": "r", "error": "IdleTimeout: quiet"}
    assert tuple(record) == DEBUG_KEYS
    bare = debug_record("http://h:1", started_at=1.0, ended_at=1.0, tool_calls=[], reasoning="")
    assert bare == {**dict.fromkeys(DEBUG_KEYS), "backend": "http://h:1", "elapsed_s": 0.0}


def test_generation_debug_of_an_answer_and_of_a_failure() -> None:
    gen = Generation(content=None, tool_calls=[CALL], finish_reason="tool_calls",
                     usage=Usage(prompt_tokens=7, completion_tokens=5),
                     timings={"predicted_n": 5}, reasoning="hmm")
    record = generation_debug(gen, "http://h:1", 1.0, 3.0)
    assert record["finish_reason"] == "tool_calls" and record["tool_calls"] == [CALL]
    assert record["reasoning"] == "hmm" and record["ttft_s"] is None
    assert record["usage"]["total_tokens"] == 12 and record["elapsed_s"] == 2.0
    failed = generation_debug(None, "http://h:1", 1.0, 1.5, ValueError("no"))
    assert failed["error"] == error_text(ValueError("no")) == "ValueError: no"
    assert failed["finish_reason"] is None and failed["usage"] is None


def test_fill_debug_info_replaces_its_keys_and_keeps_the_callers() -> None:
    info: dict[str, Any] = {"mine": 1, "error": "stale", "tool_calls": ["stale"]}
    fill_debug_info(info, {"backend": "http://h:1", "elapsed_s": 0.5})
    assert info == {"mine": 1, **dict.fromkeys(DEBUG_KEYS), "backend": "http://h:1",
                    "elapsed_s": 0.5}
    fill_debug_info(None, {"backend": "x"})  # nothing to fill: no error


def test_streamed_answer_yields_text_and_notes_the_rest() -> None:
    answer = StreamedAnswer("http://h:1", started_at=100.0)
    deltas: list[tuple[Delta, float]] = [
        (ReasoningDelta("think "), 100.5), (ReasoningDelta("more"), 100.6),
        (TextDelta("Hel"), 101.0), (TextDelta(""), 101.1),
        (ToolCallDelta(0, id="c1", name="f"), 101.2),
        (ToolCallDelta(0, arguments='{"a": 1}'), 101.3),
        (TextDelta("lo"), 101.4),
        (StreamEnd("tool_calls", Usage(prompt_tokens=3, completion_tokens=6), {"x": 1}), 102.0)]
    texts = [answer.text(delta, now) for delta, now in deltas]
    assert texts == [None, None, "Hel", None, None, None, "lo", None]
    assert answer.first_token_at == 100.5 and answer.end is deltas[-1][0]
    record = answer.debug(103.0, usage_so_far=Usage(completion_tokens=99))
    assert record == {
        "backend": "http://h:1", "finish_reason": "tool_calls",
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
        "timings": {"x": 1}, "ttft_s": 0.5, "elapsed_s": 3.0, "tool_calls": [CALL],
        "reasoning": "think more", "error": None}


def test_streamed_answer_that_did_not_end_reports_usage_so_far_and_the_error() -> None:
    answer = StreamedAnswer("http://h:1", started_at=0.0)
    assert answer.text(TextDelta("a"), 0.25) == "a"
    record = answer.debug(1.0, usage_so_far=Usage(prompt_tokens=2, completion_tokens=1),
                          error=IdleTimeout("stalled"))
    assert record["finish_reason"] is None and record["timings"] is None
    assert record["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    assert record["error"] == "IdleTimeout: stalled" and record["ttft_s"] == 0.25
    # an end without usage (a server that sends none): the count so far stands in
    answer.text(StreamEnd("stop"), 0.5)
    assert answer.debug(1.0, usage_so_far=Usage(completion_tokens=1))["usage"][
        "completion_tokens"] == 1
