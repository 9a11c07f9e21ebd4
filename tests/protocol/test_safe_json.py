"""bridge.protocol.safe_json: nesting measured without recursion, brackets in strings ignored."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol import safe_json


def nest(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("as_bytes", [False, True])
def test_depth_limit_is_exact(as_bytes: bool) -> None:
    for depth, deep in ((64, False), (65, True)):
        text = nest(depth)
        assert safe_json.too_deep(text.encode() if as_bytes else text) is deep
    assert safe_json.too_deep('{"a": ' * 65 + "1" + "}" * 65)


@pytest.mark.parametrize("as_bytes", [False, True])
def test_brackets_in_strings_do_not_count(as_bytes: bool) -> None:
    text = json.dumps({"text": "[[[{{{" * 100, "escaped": '\\"[[[' * 50, "list": [1, [2]]})
    assert not safe_json.too_deep(text.encode() if as_bytes else text)
    assert safe_json.loads(text.encode() if as_bytes else text)["list"] == [1, [2]]


def test_loads_refuses_deep_and_malformed_json_with_value_error() -> None:
    with pytest.raises(ValueError, match="nested more than 64 levels"):
        safe_json.loads("[" * 100_000)
    with pytest.raises(ValueError):
        safe_json.loads("{")


@given(st.recursive(st.none() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=30))
def test_agrees_with_json_within_the_limit(value: object) -> None:
    text = json.dumps(value)
    assert safe_json.loads(text) == json.loads(text)
