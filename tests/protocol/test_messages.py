"""Tests of the wire contract (bridge/protocol/messages.py) and topic rules (topics.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from bridge.protocol.messages import (
    TERMINAL_TYPES,
    BridgeRequest,
    ChunkMsg,
    DoneMsg,
    ErrorCode,
    ErrorMsg,
    ProgressMsg,
    ReplyMsg,
    StartMsg,
    Timings,
    Usage,
    decode_reply,
    encode,
    json_text,
)
from bridge.protocol.topics import (
    CLIENT_PATTERN,
    CLIENT_RULE,
    ID_PATTERN,
    ID_RULE,
    Topics,
    is_valid_client,
    is_valid_id,
)
from tests.support.prompts import HI


def parse(obj: dict[str, Any]) -> BridgeRequest:
    """Validate the way the bridge does: from the JSON payload bytes."""
    return BridgeRequest.model_validate_json(json.dumps(obj))


def rejection(obj: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        parse(obj)
    return str(info.value)


# ------------------------------------------------------------------- requests


def test_minimal_messages_request() -> None:
    req = parse({"messages": HI})
    assert req.messages is not None and req.messages[0].content == "hi"
    assert req.prompt is None and req.id is None and req.stream is True
    assert not req.wants_single_reply


def test_minimal_prompt_request() -> None:
    req = parse({"prompt": "x"})
    assert req.prompt == "x" and req.messages is None


def test_python_dict_input_also_validates() -> None:
    assert BridgeRequest.model_validate({"messages": HI}).messages is not None


@pytest.mark.parametrize("name", ["temprature", "foo", "Messages"])
def test_unknown_field_is_rejected_by_name(name: str) -> None:
    err = rejection({"prompt": "x", name: 1})
    assert name in err and "Extra inputs are not permitted" in err


def test_unknown_field_in_message_is_rejected_by_name() -> None:
    err = rejection({"messages": [{"role": "user", "content": "hi", "colour": "red"}]})
    assert "colour" in err


@pytest.mark.parametrize("obj", [
    {"prompt": "x", "messages": HI},  # both
    {},  # neither
    {"temperature": 0.5},  # neither, with sampling
    {"session": "s1"},  # a session alone is not a request
])
def test_exactly_one_of_messages_or_prompt(obj: dict[str, Any]) -> None:
    assert "exactly one of 'messages' or 'prompt'" in rejection(obj)


@pytest.mark.parametrize("bad_id", ["a/b", "a+b", "a#b", "", "x" * 65, "a b", "a\n", "é"])
def test_bad_ids_rejected(bad_id: str) -> None:
    assert "id" in rejection({"prompt": "x", "id": bad_id})
    assert "session" in rejection({"prompt": "x", "session": bad_id})


@pytest.mark.parametrize("good_id", ["a", "x" * 64, "req-1.2_3", "A9"])
def test_good_ids_accepted(good_id: str) -> None:
    assert parse({"prompt": "x", "id": good_id}).id == good_id


@pytest.mark.parametrize(("name", "value"), [
    ("temperature", "hot"),
    ("stream", "yes"),
    ("stream", 1),
    ("max_tokens", 1.5),
    ("max_tokens", "10"),
    ("prompt", 5),
    ("messages", "hi"),
    ("clear", "true"),
    ("temperature", 6),  # out of range
    ("top_p", 1.5),
    ("max_tokens", 0),
])
def test_wrong_types_and_ranges_name_the_field(name: str, value: Any) -> None:
    obj: dict[str, Any] = {"prompt": "x"} if name not in ("prompt", "messages") else {}
    obj[name] = value
    assert name in rejection(obj)


def test_clear_needs_session() -> None:
    assert "'clear' needs 'session'" in rejection({"clear": True})
    req = parse({"clear": True, "session": "s1"})
    assert req.clear and req.session == "s1"


def test_tools_need_messages() -> None:
    assert "'tools' needs 'messages'" in rejection({"prompt": "x", "tools": [{"type": "function"}]})


def test_message_needs_content_or_tool_calls() -> None:
    assert "content" in rejection({"messages": [{"role": "assistant"}]})
    req = parse({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1"}]}]})
    assert req.messages is not None and req.messages[0].tool_calls == [{"id": "c1"}]


def test_bad_role_rejected() -> None:
    assert "role" in rejection({"messages": [{"role": "robot", "content": "hi"}]})


def test_wants_single_reply() -> None:
    assert parse({"messages": HI, "tools": [{"type": "function"}]}).wants_single_reply
    assert parse({"prompt": "x", "stream": False}).wants_single_reply
    assert not parse({"prompt": "x", "stream": True}).wants_single_reply


def test_sampling_omits_unset() -> None:
    assert parse({"prompt": "x"}).sampling() == {}
    req = parse({"prompt": "x", "temperature": 0.0, "max_tokens": 5, "stop": ["\n"], "seed": 0})
    # 0 and 0.0 are set values, not "unset"
    assert req.sampling() == {"temperature": 0.0, "max_tokens": 5, "stop": ["\n"], "seed": 0}


# ------------------------------------------------------------------- replies

REPLIES: list[BaseModel] = [
    StartMsg(id="r1", seq=0, model="gemma", queue=2),
    StartMsg(id="r1", seq=0),
    ChunkMsg(id="r1", seq=1, text='he said "hi"\n\u2028😀'),
    ChunkMsg(id="r1", seq=2, reasoning="hmm"),
    ProgressMsg(id="r1", seq=3, queued_ms=12.5),
    ProgressMsg(id="r1", seq=3, prompt_progress={"processed": 10, "total": 20}),
    DoneMsg(id="r1", seq=4, finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=9),
            timings=Timings(queue_ms=1.0, ttft_ms=20.0, total_ms=100.0, tokens_per_s=90.0)),
    ReplyMsg(id="r2", seq=1, content="ok", finish_reason="stop"),
    ReplyMsg(id="r2", seq=1, tool_calls=[{"id": "c1", "function": {"name": "f"}}],
             finish_reason="tool_calls"),
    ErrorMsg(id="r3", seq=0, code=ErrorCode.busy, message="queue full", retryable=True,
             retry_after_ms=500),
    ErrorMsg(id="r3", seq=1, code=ErrorCode.backend_error, message="too long",
             backend_type="exceed_context_size_error"),
]


@pytest.mark.parametrize("msg", REPLIES, ids=lambda m: type(m).__name__)
def test_reply_round_trip(msg: BaseModel) -> None:
    payload = encode(msg)
    assert isinstance(payload, bytes)
    back = decode_reply(payload)
    assert back == msg and type(back) is type(msg)
    assert decode_reply(payload.decode()) == msg
    obj = json.loads(payload)
    assert obj["type"] == msg.type
    assert None not in obj.values()  # encode omits None fields


def test_encode_omits_none_and_is_compact_utf8() -> None:
    payload = encode(ChunkMsg(id="r", seq=0, text="é"))
    assert json.loads(payload) == {"id": "r", "seq": 0, "type": "chunk", "text": "é"}
    assert b"reasoning" not in payload and b" " not in payload
    assert "é".encode() in payload  # not ASCII-escaped


@pytest.mark.parametrize("payload", [
    b'{"type":"chunk","id":"r","seq":-1,"text":"x"}',  # negative seq
    b'{"type":"chunk","id":"r","seq":0,"text":"x","extra":1}',  # unknown field
    b'{"type":"nope","id":"r","seq":0}',  # unknown type
    b'{"type":"done","id":"r","seq":0}',  # missing finish_reason
    b'{"type":"error","id":"r","seq":0,"code":"oops","message":"m"}',  # unknown code
    b"not json",
])
def test_decode_reply_rejects(payload: bytes) -> None:
    with pytest.raises(ValidationError):
        decode_reply(payload)


def test_terminal_types() -> None:
    assert frozenset({"done", "reply", "error"}) == TERMINAL_TYPES


def test_json_text_compact_unescaped() -> None:
    assert json_text({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'


# ------------------------------------------------------------------- topics


@pytest.mark.parametrize("prefix", ["", "/llm", "llm/", "ll+m", "llm/#", "a\x00b", "site/+/llm"])
def test_bad_prefix_raises(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid topic prefix"):
        Topics(prefix)


def test_topic_names() -> None:
    t = Topics("site/llm")
    assert t.request("dev1") == "site/llm/request/dev1"
    assert t.cancel("dev1") == "site/llm/cancel/dev1"
    assert t.reply("dev1", "r1") == "site/llm/reply/dev1/r1"
    assert t.reply_namespace("dev1") == "site/llm/reply/dev1/"
    assert t.status("b1") == "site/llm/status/b1"
    assert t.status_filter() == "site/llm/status/+"
    assert t.request_filter() == "site/llm/request/+"
    assert t.request_filter("g") == "$share/g/site/llm/request/+"
    assert t.cancel_filter("g") == "site/llm/cancel/+"  # cancels are never shared
    assert Topics().prefix == "llm"


def test_client_of() -> None:
    t = Topics()
    assert t.client_of("llm/request/dev1", "request") == "dev1"
    assert t.client_of("llm/cancel/dev-1.a_b", "cancel") == "dev-1.a_b"
    assert t.client_of("llm/request/" + "d" * 64, "request") == "d" * 64


@pytest.mark.parametrize("topic", [
    "llm/request/",  # empty client
    "llm/request/a/b",  # two levels
    "llm/request/-dev",  # must start alphanumeric
    "llm/request/" + "d" * 65,
    "llm/request/a+b",
    "llm/request/#",
    "llm/request/dév",
    "other/request/dev1",  # other prefix
    "llmx/request/dev1",
    "x/llm/request/dev1",
    "llm/cancel/dev1",  # other kind
])
def test_client_of_rejects(topic: str) -> None:
    assert Topics().client_of(topic, "request") is None


def test_validators() -> None:
    assert is_valid_client("dev1") and not is_valid_client("_dev") and not is_valid_client("")
    assert is_valid_id("_r.1-") and not is_valid_id("r/1") and not is_valid_id("r1\n")


def test_name_rules_are_the_documented_ones() -> None:
    protocol = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(
        encoding="utf-8")
    assert ID_RULE == "[A-Za-z0-9_.-]{1,64}" and f"`{ID_RULE}`" in protocol
    assert CLIENT_RULE == "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}" and f"`{CLIENT_RULE}`" in protocol
    assert f"^{ID_RULE}$" == ID_PATTERN and f"^{CLIENT_RULE}$" == CLIENT_PATTERN


def test_response_topic_allowed_inside_namespace() -> None:
    t = Topics()
    assert t.is_allowed_response_topic("dev1", "llm/reply/dev1/x")
    assert t.is_allowed_response_topic("dev1", "llm/reply/dev1/app/session/7")


@pytest.mark.parametrize("topic", [
    "llm/reply/dev1/+",
    "llm/reply/dev1/#",
    "llm/reply/dev1/a/+/b",
    "llm/reply/dev2/x",  # another client's namespace
    "llm/reply/dev10/x",  # shares a name prefix only
    "llm/reply/dev1/",  # the bare namespace
    "llm/reply/dev1",
    "llm/reply/",
    "other/reply/dev1/x",
    "llm/request/dev1",
    "llm/reply/dev1/a\x00",
    "llm/reply/dev1/" + "x" * 1024,  # too long for a topic we would publish on
])
def test_response_topic_rejected(topic: str) -> None:
    assert not Topics().is_allowed_response_topic("dev1", topic)


DEEP_202 = "llm/reply/dev1/" + "l/" * 198 + "l"  # 202 levels: Mosquitto 2.0 disconnects


@pytest.mark.parametrize(("topic", "named"), [
    (DEEP_202, "202 topic levels; the limit is 32"),
    ("llm/reply/dev1/" + "l/" * 29 + "l", "33 topic levels; the limit is 32"),
    ("llm/reply/dev1/" + "x" * 1010, "1025 bytes long; the limit is 1024 bytes"),
    ("llm/reply/dev1/a\x01b", "U+0001"),
    ("llm/reply/dev1/a\x7fb", "U+007F"),
    ("llm/reply/dev1/a\x9fb", "U+009F"),
    ("llm/reply/dev1/a\ufdd0", "U+FDD0"),
    ("llm/reply/dev1/a\uffff", "U+FFFF"),
    ("llm/reply/dev1/a\U0010fffe", "U+10FFFE"),
    ("llm/reply/dev1/a/+", "U+002B"),
    ("llm/reply/dev2/x", "must lie under llm/reply/dev1/"),
])
def test_response_topic_problem_names_the_limit(topic: str, named: str) -> None:
    problem = Topics().response_topic_problem("dev1", topic)
    assert problem is not None and named in problem, problem


@pytest.mark.parametrize("topic", [
    "llm/reply/dev1/" + "l/" * 28 + "l",  # exactly 32 levels
    "llm/reply/dev1/" + "x" * 1009,  # exactly 1024 bytes
    "llm/reply/dev1/émoji-😀/ok",  # non-ASCII that is not a control or non-character
])
def test_response_topic_at_the_limits_is_allowed(topic: str) -> None:
    assert Topics().response_topic_problem("dev1", topic) is None


def test_prefix_too_deep_for_reply_topics_is_refused() -> None:
    Topics("/".join(["p"] * 29))  # + reply/{client}/{id} = 32 levels: fine
    with pytest.raises(ValueError, match="too many levels"):
        Topics("/".join(["p"] * 30))


def test_clear_with_both_messages_and_prompt_is_rejected() -> None:
    with pytest.raises(ValidationError, match="not both"):
        BridgeRequest.model_validate({"session": "s1", "clear": True, "prompt": "x",
                                      "messages": [{"role": "user", "content": "y"}]})


def test_backend_addresses_are_not_told_to_devices() -> None:
    from bridge.protocol.errors import BackendProtocolError, IdleTimeout, RequestRejected

    stalled = IdleTimeout("llama-server at http://10.0.0.5:8080/v1/chat/completions sent no "
                          "data for idle=60 s mid-stream")
    assert stalled.public_message == "llama-server sent no data for idle=60 s mid-stream"
    assert "10.0.0.5" in stalled.message  # the operator's log keeps it
    broken = BackendProtocolError("bad answer from https://gpu-box.lan/props: not JSON")
    assert broken.public_message == "bad answer from llama-server: not JSON"
    rejected = RequestRejected(ErrorCode.bad_request, "field 'x' unknown")
    assert rejected.public_message == rejected.message
