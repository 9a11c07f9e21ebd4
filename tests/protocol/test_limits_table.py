"""Every limit answered with an error is in one table of the protocol, and the table is the code.

``docs/protocol.md`` *Limits* lists each limit (name, value, config key or "fixed", error code).
For a setting the value must be the setting's default; for a fixed limit a checker
below plays the limit through the request parser (at the value: accepted; past it:
refused with the documented code) or compares it with the constant it is. A row
without a checker fails, so docs and code cannot drift apart.

Also here: ``chunk_bytes`` below the minimum is refused with a message naming it, and
what is JSON and what is plain text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from bridge.config.settings import DeploymentConfig, LlamaSettings, load_config
from bridge.llama.calls import MAX_ANSWER_BYTES
from bridge.llama.sse import DEFAULT_MAX_EVENT_BYTES
from bridge.mqtt.link import Inbound
from bridge.protocol.chunks import MIN_CHUNK_BYTES
from bridge.protocol.messages import ErrorCode
from bridge.service.intake import (
    MAX_CORRELATION_BYTES,
    MIN_REPLY_ROOM,
    Accepted,
    Rejected,
    parse_request,
)
from bridge.service.reply import _RECORD_LIMIT
from tests.support.processes import REPO as ROOT
from tests.support.prompts import HI

PROTOCOL = ROOT / "docs" / "protocol.md"
CFG = load_config(prefix="llm", bridge_id="limits", chunk_bytes=512, max_chunk_bytes=16384,
                  max_message_bytes=65536, max_request_bytes=65536, max_tokens_cap=1000)
MAX_PAYLOAD = 65536
CLIENT = "dev1"


def parse(payload: bytes | str | dict[str, Any], *, response_topic: str | None = None,
          correlation: bytes | None = None) -> Accepted | Rejected:
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    msg = Inbound(f"llm/request/{CLIENT}", payload, response_topic, correlation, None, 1.0)
    return parse_request(msg, CLIENT, CFG, MAX_PAYLOAD)


def accepted(payload: bytes | str | dict[str, Any], **kwargs: Any) -> Accepted:
    result = parse(payload, **kwargs)
    assert isinstance(result, Accepted), result
    return result


def refused(payload: bytes | str | dict[str, Any], code: ErrorCode, **kwargs: Any) -> Rejected:
    result = parse(payload, **kwargs)
    assert isinstance(result, Rejected), result
    assert result.code == code, result
    return result


# --------------------------------------------------------------------------- the table


def limits_table() -> list[tuple[str, str, str, str]]:
    """The rows of the protocol's *Limits*: (limit, value, config key, answered with)."""
    text = PROTOCOL.read_text(encoding="utf-8")
    section = text.split("\n## Limits\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| limit | value | config key | answered with |"), rows[0]
    out = []
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, line
        out.append((cells[0], cells[1], cells[2], cells[3]))
    return out


def numbers(value: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", value)]


def code_of(cell: str) -> ErrorCode:
    return ErrorCode(re.findall(r"`([a-z_]+)`", cell)[0])


def _range(field: str, lo: int, hi: int, code: ErrorCode, *, step: float = 1) -> None:
    for ok in (lo, hi):
        accepted({"messages": HI, field: ok})
    for bad in (lo - step, hi + step):
        assert field in refused({"messages": HI, field: bad}, code).message


def check_messages(value: str, code: ErrorCode) -> None:
    lo, hi = numbers(value)
    accepted({"messages": HI * hi})
    refused({"messages": HI * (hi + 1)}, code)
    assert lo == 1
    refused({"messages": []}, code)


def check_tools(value: str, code: ErrorCode) -> None:
    (hi,) = numbers(value)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    accepted({"messages": HI, "tools": [tool] * hi})
    assert "tools" in refused({"messages": HI, "tools": [tool] * (hi + 1)}, code).message


def check_stop(value: str, code: ErrorCode) -> None:
    (hi,) = numbers(value)
    accepted({"messages": HI, "stop": ["x"] * hi})
    assert "stop" in refused({"messages": HI, "stop": ["x"] * (hi + 1)}, code).message


def check_model(value: str, code: ErrorCode) -> None:
    (hi,) = numbers(value)
    accepted({"messages": HI, "model": "m" * hi})
    assert "model" in refused({"messages": HI, "model": "m" * (hi + 1)}, code).message


def check_names(value: str, code: ErrorCode) -> None:
    hi = numbers(value)[0]  # then the characters: [A-Za-z0-9_.-]
    for field in ("id", "session", "profile"):
        ok = {"messages": HI, field: "a" * hi}
        if field != "profile":  # an unknown profile is refused later, by the service
            accepted(ok)
        refused({"messages": HI, field: "a" * (hi + 1)}, code)
        refused({"messages": HI, field: "a/b"}, code)


def check_chunk_bytes(value: str, code: ErrorCode) -> None:
    (lo,) = numbers(value)
    assert lo == MIN_CHUNK_BYTES
    assert accepted({"messages": HI, "chunk_bytes": lo}).chunk_bytes == lo
    assert "chunk_bytes must be at least 128" in \
        refused({"messages": HI, "chunk_bytes": lo - 1}, code).message


def check_max_packet(value: str, code: ErrorCode) -> None:
    least, name_chars = numbers(value)[:2]
    client, request_id = "c" * name_chars, "i" * name_chars
    assert name_chars == 32

    def ask(max_packet: int) -> Accepted | Rejected:
        payload = json.dumps({"id": request_id, "messages": HI, "max_packet": max_packet})
        msg = Inbound(f"llm/request/{client}", payload.encode(), None, None, None, 1.0)
        return parse_request(msg, client, CFG, MAX_PAYLOAD)

    assert isinstance(ask(least), Accepted)
    result = ask(least - 1)
    assert isinstance(result, Rejected) and result.code == code, result
    assert result.message.startswith(f"max_packet>={least}: "), result.message


def check_max_tokens(value: str, code: ErrorCode) -> None:
    (lo,) = numbers(value)
    accepted({"messages": HI, "max_tokens": lo})
    refused({"messages": HI, "max_tokens": lo - 1}, code)


def check_correlation(value: str, code: ErrorCode) -> None:
    (hi,) = numbers(value)
    assert hi == MAX_CORRELATION_BYTES
    accepted({"messages": HI}, correlation=b"c" * hi)
    refused({"messages": HI}, code, correlation=b"c" * (hi + 1))


def check_response_topic(value: str, code: ErrorCode) -> None:
    (hi,) = numbers(value)
    head = f"llm/reply/{CLIENT}/"
    levels = "/".join(["x" * 60] * 20)  # few levels: only the total length is at stake
    at_limit = (head + levels)[:hi]
    at_limit = at_limit.rstrip("/") + "x" * (hi - len(at_limit.rstrip("/")))
    assert len(at_limit.encode()) == hi
    accepted({"messages": HI}, response_topic=at_limit)
    refused({"messages": HI}, code, response_topic=at_limit + "x")


def check_response_levels(value: str, code: ErrorCode) -> None:
    (hi,) = numbers(value)
    head = f"llm/reply/{CLIENT}/"  # 3 levels
    at_limit = head + "/".join(["l"] * (hi - 3))
    accepted({"messages": HI}, response_topic=at_limit)
    assert f"{hi + 1} topic levels" in refused({"messages": HI}, code,
                                               response_topic=at_limit + "/l").message


def check_reply_room(value: str, code: ErrorCode) -> None:
    (room,) = numbers(value)
    assert room == MIN_REPLY_ROOM
    topic = f"llm/reply/{CLIENT}/" + "x" * 200
    msg = Inbound(f"llm/request/{CLIENT}", json.dumps({"messages": HI}).encode(), topic, None,
                  None, 1.0)
    size = len(topic.encode())
    assert isinstance(parse_request(msg, CLIENT, CFG, size + room), Accepted)
    result = parse_request(msg, CLIENT, CFG, size + room - 1)
    assert isinstance(result, Rejected) and result.code == code, result


def check_nesting(value: str, code: ErrorCode) -> None:
    (limit,) = numbers(value)
    params: Any = {"type": "object"}
    for _ in range(limit // 2 - 4):  # 2 levels each, within the request's own 5 levels
        params = {"type": "object", "properties": {"p": params}}
    accepted({"messages": HI, "tools": [{"type": "function",
                                         "function": {"name": "f", "parameters": params}}]})
    # At the limit: refused for its unknown field only; one level deeper: for its depth.
    at_limit = refused('{"a":' * limit + "1" + "}" * limit, code).message
    assert "nested" not in at_limit and "unknown field" in at_limit, at_limit
    assert "nested" in refused('{"a":' * (limit + 1) + "1" + "}" * (limit + 1), code).message


def constant(actual: int) -> Callable[[str, ErrorCode], None]:
    def check(value: str, code: ErrorCode) -> None:
        assert numbers(value)[0] == actual, (value, actual)
    return check


FIXED: dict[str, Callable[[str, ErrorCode], None]] = {
    "MQTT 5 Correlation Data": check_correlation,
    "MQTT 5 Response Topic": check_response_topic,
    "MQTT 5 Response Topic levels": check_response_levels,
    "what a reply topic leaves of the largest reply message": check_reply_room,
    "`messages`": check_messages,
    "`tools`": check_tools,
    "`stop`": check_stop,
    "`model`": check_model,
    "`id`, `session`, `profile`": check_names,
    "`chunk_bytes`": check_chunk_bytes,
    "`max_packet`": check_max_packet,
    "`max_tokens`": check_max_tokens,
    "`temperature`": lambda v, c: _range("temperature", *numbers(v), c, step=0.5),
    "`top_p`": lambda v, c: _range("top_p", *numbers(v), c, step=0.5),
    "`min_p`": lambda v, c: _range("min_p", *numbers(v), c, step=0.5),
    "`top_k`": lambda v, c: _range("top_k", *numbers(v), c),
    "`repeat_penalty`": lambda v, c: _range("repeat_penalty", *numbers(v), c, step=0.5),
    "JSON nesting": check_nesting,
    "an answer kept to replay to a duplicate of its id": constant(_RECORD_LIMIT),
    "one event of llama-server's stream": constant(DEFAULT_MAX_EVENT_BYTES),
    "a non-streamed answer of llama-server": constant(MAX_ANSWER_BYTES),
}


def setting_default(key: str) -> Any:
    """The default of a config key as the table writes it (`name` or `[llama] name`)."""
    match = re.fullmatch(r"`(?:\[(\w+)\] )?(\w+)`", key)
    assert match, f"config key {key!r}: write `name` or `[section] name`, or 'fixed'"
    section, name = match.groups()
    model: Any = {None: DeploymentConfig, "llama": LlamaSettings}[section]
    assert name in model.model_fields, f"{key} is not a setting"
    return model.model_fields[name].default


def test_limits_table_is_the_code() -> None:
    rows = limits_table()
    assert len(rows) >= 25, rows
    names = [row[0] for row in rows]
    assert len(set(names)) == len(names), "a limit is listed twice"
    for name, value, key, answer in rows:
        if key == "llama-server's `-c`":
            assert code_of(answer) == ErrorCode.backend_error
            continue
        code = code_of(answer)
        if key == "fixed":
            assert name in FIXED, f"documented limit {name!r} has no check in this test: add one"
            FIXED[name](value, code)
        else:
            default = setting_default(key)
            assert numbers(value)[0] == default, (name, value, key, default)
    assert set(FIXED) <= set(names), set(FIXED) - set(names)


def test_limits_of_the_issue_are_listed() -> None:
    documented = {(name, value) for name, value, *_ in limits_table()}
    text = " ".join(f"{n} {v}" for n, v in documented)
    for words in ("Correlation Data 256 B", "Response Topic 1024 B", "`messages` 1 – 256",
                  "`tools` 128", "`stop` 16", "`model` 256 characters", "`chunk_bytes` 128 B"):
        assert words in text, words


# --------------------------------------------------------------------------- chunk_bytes


@pytest.mark.parametrize("asked", [-5, 0, 5, 127])
def test_chunk_bytes_below_the_minimum_is_refused_naming_it(asked: int) -> None:
    message = refused({"messages": HI, "chunk_bytes": asked}, ErrorCode.bad_request).message
    assert f"chunk_bytes must be at least {MIN_CHUNK_BYTES}" in message, message
    assert f"got {asked}" in message


@pytest.mark.parametrize(("asked", "used"), [(128, 128), (129, 129), (4096, 4096),
                                             (16384, 16384), (16385, 16384), (10**12, 16384)])
def test_chunk_bytes_at_or_above_the_minimum_is_served(asked: int, used: int) -> None:
    assert accepted({"messages": HI, "chunk_bytes": asked}).chunk_bytes == used


def test_chunk_bytes_docs_say_what_the_code_does() -> None:
    protocol = PROTOCOL.read_text(encoding="utf-8")
    assert "clamped" not in protocol
    assert "at least 128 (smaller is `bad_request`" in protocol
    example = (ROOT / "config" / "bridge.example.toml").read_text(encoding="utf-8")
    assert "clamped" not in example and "at least 128" in example
    field = DeploymentConfig.model_fields["chunk_bytes"]
    assert field.description and "at least 128" in field.description


# --------------------------------------------------------------------------- JSON or text


@pytest.mark.parametrize("payload", ['{"id":', ' {"a"', '\n\t{"messages": [', "{", "{}x",
                                     '{"a":1} trailing'])
def test_a_payload_starting_with_a_brace_must_be_a_json_object(payload: str) -> None:
    message = refused(payload, ErrorCode.bad_request).message
    assert "JSON" in message, message


@pytest.mark.parametrize("payload", ["[1]", "[1, 2]", '"hi"', "42", "null", "true",
                                     "hello {world}", "  spaced  "])
def test_anything_else_is_one_user_message_as_sent(payload: str) -> None:
    acc = accepted(payload)
    assert acc.request.messages is not None
    assert [(m.role, m.content) for m in acc.request.messages] == [("user", payload)]


def test_protocol_says_what_is_json_and_what_is_text() -> None:
    protocol = PROTOCOL.read_text(encoding="utf-8")
    assert "anything that is not a JSON object" not in protocol  # what it used to say
    assert "first character that is not whitespace" in protocol
    assert "`[1, 2]`, `\"hi\"`" in protocol and "`{\"id\":` is answered" in protocol
