"""Request intake (bridge/service/intake.py): every payload is Accepted or Rejected, no crash.

Unit tests with hand-built :class:`bridge.mqtt.link.Inbound` messages; no broker.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bridge.config.settings import DeploymentConfig, load_config
from bridge.mqtt.link import Inbound
from bridge.protocol.fit import fit, smallest_payload
from bridge.protocol.messages import (
    BridgeRequest,
    ChatMessage,
    ErrorCode,
    ErrorMsg,
    encode,
    json_text,
)
from bridge.protocol.packet import packet_bytes, packet_payload_room
from bridge.protocol.topics import CLIENT_PATTERN, is_valid_id
from bridge.service.intake import (
    Accepted,
    Rejected,
    describe_validation_error,
    parse_cancel,
    parse_request,
)
from tests.support.prompts import HI

# Every value parse_request reads is given explicitly, so no BRIDGE_* variable can change it.
CFG = load_config(
    prefix="llm", bridge_id="test", chunk_bytes=512, max_chunk_bytes=16384,
    max_message_bytes=65536, max_request_bytes=4096, max_tokens_default=256, max_tokens_cap=1000,
)
MAX_PAYLOAD = 65536
CLIENT = "dev1"
NS = f"llm/reply/{CLIENT}/"
HEX16 = re.compile(r"^[0-9a-f]{16}$")


def inbound(
    payload: bytes | str | dict[str, Any],
    *,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    expires_at: float | None = None,
    received_at: float = 1000.0,
    client: str = CLIENT,
) -> Inbound:
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return Inbound(f"llm/request/{client}", payload, response_topic, correlation_data,
                   expires_at, received_at)


def accept(payload: bytes | str | dict[str, Any], max_payload: int = MAX_PAYLOAD,
           cfg: DeploymentConfig = CFG, **kwargs: Any) -> Accepted:
    result = parse_request(inbound(payload, **kwargs), CLIENT, cfg, max_payload)
    assert isinstance(result, Accepted), result
    return result


def reject(payload: bytes | str | dict[str, Any], max_payload: int = MAX_PAYLOAD,
           **kwargs: Any) -> Rejected:
    result = parse_request(inbound(payload, **kwargs), CLIENT, CFG, max_payload)
    assert isinstance(result, Rejected), result
    assert result.reply.topic == f"{NS}{result.request_id}"
    assert is_valid_id(result.request_id)
    assert 0 < len(result.message) <= 400
    return result


# ---------------------------------------------------------------------------- accepted


def test_plain_text_is_one_user_message() -> None:
    acc = accept("Why is the sky blue?")
    assert acc.request.messages == [ChatMessage(role="user", content="Why is the sky blue?")]
    assert acc.request.prompt is None
    assert acc.client == CLIENT
    assert HEX16.match(acc.request_id)
    assert acc.reply.topic == f"{NS}{acc.request_id}"
    assert acc.chunk_bytes == CFG.chunk_bytes
    assert acc.max_tokens == CFG.max_tokens_default


def test_max_tokens_defaults_to_a_few_sentences_and_is_capped() -> None:
    """A request without max_tokens gets max_tokens_default, not the cap: a forgotten
    limit must not stream for minutes."""
    assert DeploymentConfig.model_fields["max_tokens_default"].default == 256
    assert accept({"messages": HI}).max_tokens == 256
    small_cap = CFG.model_copy(update={"max_tokens_cap": 100})
    assert accept({"messages": HI}, cfg=small_cap).max_tokens == 100


@pytest.mark.parametrize("text", ["[1, 2]", "42", '"quoted"', "null", "héllo wörld ✓ 🙂"])
def test_anything_but_a_json_object_is_plain_text(text: str) -> None:
    acc = accept(text)
    assert acc.request.messages == [ChatMessage(role="user", content=text)]


def test_json_object_is_validated_into_the_request() -> None:
    acc = accept({"id": "req-1", "messages": HI, "temperature": 0.2, "seed": 7,
                  "stop": ["\n"], "stream": False, "reasoning": True})
    req = acc.request
    assert acc.request_id == "req-1"
    assert req.id == "req-1"
    assert req.messages == [ChatMessage(role="user", content="hi")]
    assert (req.temperature, req.seed, req.stop) == (0.2, 7, ["\n"])
    assert req.wants_single_reply
    assert req.reasoning is True


def test_prompt_request_is_accepted() -> None:
    acc = accept({"prompt": "Once upon a time", "max_tokens": 5})
    assert acc.request.prompt == "Once upon a time"
    assert acc.max_tokens == 5


def test_leading_whitespace_before_a_json_object() -> None:
    acc = accept('  \n {"id": "a", "prompt": "x"} \n')
    assert acc.request_id == "a"


def test_generated_ids_are_16_hex_and_fresh() -> None:
    ids = {accept("hi").request_id for _ in range(20)}
    assert len(ids) == 20
    assert all(HEX16.match(i) for i in ids)
    assert HEX16.match(accept({"messages": HI}).request_id)


@pytest.mark.parametrize("request_id", ["a", "A.b_c-9", "x" * 64])
def test_valid_id_is_kept(request_id: str) -> None:
    acc = accept({"id": request_id, "messages": HI})
    assert acc.request_id == request_id
    assert acc.reply.topic == f"{NS}{request_id}"


# ---------------------------------------------------------------------------- rejected


@pytest.mark.parametrize("bad_id", ["a/b", "x+", "#", "", "x" * 65, "a b", "é", "ab\n", 5, None])
def test_invalid_id_is_rejected_with_a_generated_id(bad_id: Any) -> None:
    payload: dict[str, Any] = {"id": bad_id, "messages": HI}
    if bad_id is None:
        payload = {"id": {"nested": "x"}, "messages": HI}
    rej = reject(payload)
    assert rej.code == ErrorCode.bad_request
    assert HEX16.match(rej.request_id)
    assert rej.message.startswith("id: "), rej.message


def test_too_large() -> None:
    limit = CFG.max_request_bytes
    accept("x" * limit)  # exactly at the limit is fine
    rej = reject("x" * (limit + 1))
    assert rej.code == ErrorCode.too_large
    assert str(limit) in rej.message
    assert "max_request_bytes" in rej.message


def test_too_large_is_checked_before_decoding() -> None:
    rej = reject(b"\xff" * (CFG.max_request_bytes + 1))
    assert rej.code == ErrorCode.too_large


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"hello \xc3", b'{"messages": "\xe9"}',
                                     "caf\u00e9".encode("latin-1")])
def test_non_utf8_is_bad_request_naming_utf8(payload: bytes) -> None:
    rej = reject(payload)
    assert rej.code == ErrorCode.bad_request
    assert "UTF-8" in rej.message


@pytest.mark.parametrize("payload", [
    '{"messages":' + "[" * 50_000 + "]" * 50_000 + "}",
    '{"a":' * 50_000 + "1" + "}" * 50_000,
])
def test_deeply_nested_json_is_bad_request(payload: str) -> None:
    big = load_config(prefix="llm", bridge_id="test", max_request_bytes=1 << 20)
    result = parse_request(inbound(payload), CLIENT, big, MAX_PAYLOAD)
    assert isinstance(result, Rejected)
    assert result.code == ErrorCode.bad_request
    assert "nested" in result.message


@pytest.mark.parametrize("payload", ["", "   \n\t", b"\n"])
def test_empty_request(payload: str | bytes) -> None:
    rej = reject(payload)
    assert rej.code == ErrorCode.bad_request
    assert "empty" in rej.message


@pytest.mark.parametrize("payload", ['{"messages": ', '{"prompt": "x"} trailing', "{'a': 1}",
                                     '{"prompt": "x",}'])
def test_invalid_json_object(payload: str) -> None:
    rej = reject(payload)
    assert rej.code == ErrorCode.bad_request
    assert rej.message.startswith("invalid JSON")


def test_unknown_field_is_named() -> None:
    rej = reject({"id": "r1", "messages": HI, "temprature": 0.5})
    assert rej.code == ErrorCode.bad_request
    assert "unknown field 'temprature'" in rej.message
    assert rej.request_id == "r1"  # a readable id is kept for the error's topic


def test_unknown_field_in_a_message_is_named() -> None:
    rej = reject({"messages": [{"role": "user", "content": "x", "mood": "happy"}]})
    assert "unknown field 'messages.0.mood'" in rej.message


@pytest.mark.parametrize(("payload", "field"), [
    ({"messages": "hi"}, "messages"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "chunk_bytes": 0}, "chunk_bytes"),
    ({"prompt": 42}, "prompt"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"prompt": "x", "seed": True}, "seed"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
])
def test_wrong_types_are_named(payload: dict[str, Any], field: str) -> None:
    rej = reject(payload)
    assert rej.code == ErrorCode.bad_request
    assert rej.message.startswith(f"{field}: "), rej.message


def test_model_level_error_says_what_to_send() -> None:
    rej = reject({"temperature": 0.5})
    assert "exactly one of 'messages' or 'prompt'" in rej.message


# ---------------------------------------------------------------------------- MQTT 5 properties


@pytest.mark.parametrize("topic", [f"{NS}x", f"{NS}mine/deeper/level", f"{NS}$x"])
def test_response_topic_inside_the_namespace_is_honoured(topic: str) -> None:
    acc = accept({"id": "r1", "messages": HI}, response_topic=topic)
    assert acc.reply.topic == topic
    assert acc.request_id == "r1"


@pytest.mark.parametrize("topic", [
    "elsewhere/x",                  # outside the prefix
    "llm/reply/dev2/x",             # another client's replies
    "llm/reply/dev10/x",            # shares dev1 as a string prefix, not as a level
    "llm/reply/dev1",               # the namespace without its slash
    NS,                             # the bare namespace
    f"{NS}#",
    f"{NS}+",
    f"{NS}a/+/b",
    f"{NS}a/#",
    f"{NS}a\x00b",
    "",
    f"{NS}" + "x" * 1100,           # longer than any broker would take as a topic here
])
def test_response_topic_outside_or_with_wildcards_is_rejected(topic: str) -> None:
    rej = reject({"id": "r1", "messages": HI}, response_topic=topic, correlation_data=b"c")
    assert rej.code == ErrorCode.bad_request
    assert "Response Topic" in rej.message
    assert rej.reply.topic == f"{NS}r1"  # the error goes to the default topic, never outside
    assert rej.reply.correlation_data == b"c"
    assert len(rej.message) <= 400


def test_correlation_data_and_expiry_are_carried_through() -> None:
    acc = accept("hi", correlation_data=b"\x00\xffcorr", expires_at=1234.5, received_at=1000.0)
    assert acc.reply.correlation_data == b"\x00\xffcorr"
    assert acc.expires_at == 1234.5
    assert acc.received_at == 1000.0
    rej = reject(b"\xff", correlation_data=b"\x01")
    assert rej.reply.correlation_data == b"\x01"


def test_without_v5_properties_nothing_is_invented() -> None:
    acc = accept("hi")
    assert acc.reply.correlation_data is None
    assert acc.expires_at is None


# ---------------------------------------------------------------------------- limits


@pytest.mark.parametrize(("requested", "max_payload", "expected"), [
    (None, MAX_PAYLOAD, 512),       # the config default
    (128, MAX_PAYLOAD, 128),        # the minimum (below it: bad_request, see docs/protocol.md)
    (300, MAX_PAYLOAD, 300),
    (10**12, MAX_PAYLOAD, 16384),   # max_chunk_bytes
    (5000, 1000, 1000),             # the link's largest message, less the topic
    (None, 300, 300),               # even the default, less the topic
])
def test_chunk_bytes_is_clamped(requested: int | None, max_payload: int, expected: int) -> None:
    payload: dict[str, Any] = {"messages": HI}
    if requested is not None:
        payload["chunk_bytes"] = requested
    acc = accept(payload, max_payload=max_payload)
    if expected == max_payload:  # bounded by the link: its limit covers topic + payload
        expected -= len(acc.reply.topic.encode())
    assert acc.chunk_bytes == expected


def test_a_full_chunk_fits_the_link_with_its_topic() -> None:
    cfg = load_config(prefix="llm", bridge_id="t", max_chunk_bytes=4096,
                           max_message_bytes=4096)
    acc = accept({"messages": HI, "chunk_bytes": 4096}, max_payload=4096, cfg=cfg)
    assert acc.chunk_bytes + len(acc.reply.topic.encode()) <= 4096


# ---------------------------------------------------------------------------- max_packet

DEVICE_CFG = load_config(prefix="llm", bridge_id="t", device={"max_packet": 300})


def test_max_packet_bounds_every_reply_and_sizes_the_chunks() -> None:
    acc = accept({"id": "r1", "messages": HI, "max_packet": 256, "chunk_bytes": 4096},
                 correlation_data=b"corr")
    room = packet_payload_room(256, acc.reply.topic, b"corr")
    assert acc.reply.max_payload == room and acc.chunk_bytes == room
    assert packet_bytes(acc.reply.topic, room, b"corr") <= 256
    # a bound larger than the other limits changes no chunk size, but still bounds replies
    big = accept({"id": "r2", "messages": HI, "max_packet": 100_000})
    assert big.chunk_bytes == 512 and big.reply.max_payload is not None


def test_no_max_packet_no_device_bound() -> None:
    assert accept({"messages": HI}).reply.max_payload is None


def test_the_deployment_default_applies_unless_the_request_gives_its_own() -> None:
    default = accept({"id": "r1", "messages": HI}, cfg=DEVICE_CFG)
    assert default.reply.max_payload == packet_payload_room(300, default.reply.topic, None)
    own = accept({"id": "r1", "messages": HI, "max_packet": 1000}, cfg=DEVICE_CFG)
    assert own.reply.max_payload == packet_payload_room(1000, own.reply.topic, None)


@pytest.mark.parametrize(("client", "request_id", "correlation"), [
    ("d", "r", None), ("c" * 32, "i" * 32, None), ("c" * 32, "i" * 32, b"x" * 16),
    ("c" * 64, "i" * 64, b"x" * 256)])
def test_max_packet_below_the_topics_smallest_messages_is_refused_naming_the_minimum(
        client: str, request_id: str, correlation: bytes | None) -> None:
    topic = f"llm/reply/{client}/{request_id}"
    least = packet_bytes(topic, smallest_payload(request_id), correlation)

    def parse(max_packet: int) -> Accepted | Rejected:
        msg = inbound({"id": request_id, "messages": HI, "max_packet": max_packet},
                      correlation_data=correlation, client=client)
        return parse_request(msg, client, CFG, MAX_PAYLOAD)

    assert isinstance(parse(least), Accepted)
    refused = parse(least - 1)
    assert isinstance(refused, Rejected) and refused.code == ErrorCode.bad_request
    assert refused.message.startswith(f"max_packet>={least}: "), refused.message
    assert refused.reply.max_payload == packet_payload_room(least - 1, topic, correlation)
    # the refusal itself fits the device: shortened, the minimum still in it
    error = ErrorMsg(id=request_id, seq=0, code=refused.code, message=refused.message)
    payload = fit(error, refused.reply.max_payload)
    assert packet_bytes(topic, len(payload), correlation) <= least - 1
    assert json.loads(payload)["message"] == f"max_packet>={least}"


def test_a_request_that_cannot_be_read_is_refused_within_the_default_or_its_own_bound() -> None:
    garbled = parse_request(inbound(b'{"max_packet": 300, "id": "r1"'), CLIENT, DEVICE_CFG,
                            MAX_PAYLOAD)
    assert isinstance(garbled, Rejected)
    assert garbled.reply.max_payload == packet_payload_room(300, garbled.reply.topic, None)
    invalid = parse_request(inbound({"id": "r1", "temperature": 99, "messages": HI,
                                     "max_packet": 200}), CLIENT, DEVICE_CFG, MAX_PAYLOAD)
    assert isinstance(invalid, Rejected) and "temperature" in invalid.message
    assert invalid.reply.max_payload == packet_payload_room(200, "llm/reply/dev1/r1", None)
    nonsense = parse_request(inbound({"id": "r1", "messages": HI, "max_packet": True}),
                             CLIENT, CFG, MAX_PAYLOAD)
    assert isinstance(nonsense, Rejected) and "max_packet" in nonsense.message
    assert nonsense.reply.max_payload is None


@pytest.mark.parametrize(("requested", "expected"), [(None, 256), (1, 1), (999, 999),
                                                     (1000, 1000), (10**9, 1000)])
def test_max_tokens_is_capped_and_defaulted(requested: int | None, expected: int) -> None:
    payload: dict[str, Any] = {"messages": HI}
    if requested is not None:
        payload["max_tokens"] = requested
    assert accept(payload).max_tokens == expected


# ---------------------------------------------------------------------------- error text


def _validation_error(data: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        BridgeRequest.model_validate(data)
    return info.value


def test_describe_validation_error_names_each_field() -> None:
    text = describe_validation_error(
        _validation_error({"messages": HI, "bogus": 1, "temperature": "hot"}))
    assert text.startswith("temperature: ") and "; unknown field 'bogus'" in text, text
    assert "\n" not in text


def test_describe_validation_error_counts_what_it_leaves_out() -> None:
    data: dict[str, Any] = {"messages": HI, **{f"extra{i}": i for i in range(8)}}
    text = describe_validation_error(_validation_error(data))
    assert text.count("unknown field") == 5
    assert text.endswith("(and 3 more)")


def test_long_error_messages_are_cut_to_400_chars() -> None:
    data: dict[str, Any] = {"messages": HI, **{f"{'k' * 300}{i}": i for i in range(5)}}
    rej = reject(data)
    assert len(rej.message) == 400
    assert rej.message.startswith("unknown field 'kkk")


@pytest.mark.parametrize("payload", [
    b'{"messages": [{"role": "user", "content": "x"}], "\\ud800": 1}',
    b'{"messages": [{"role": "user", "content": "x", "\\udfff": 1}]}',
    b'{"prompt": "x", "id": "\\ud800"}',
    b'{"prompt": "x", "profile": "\\ud800\\u0000"}',
])
def test_rejection_of_lone_surrogates_is_encodable(payload: bytes) -> None:
    """A JSON escape like \\ud800 decodes to a lone surrogate; the error about it must still
    be publishable as UTF-8 JSON."""
    rej = reject(payload)
    assert rej.code == ErrorCode.bad_request
    assert encode(ErrorMsg(id=rej.request_id, seq=0, code=rej.code, message=rej.message))


def test_lone_surrogates_are_bad_request_or_forwardable() -> None:
    result = parse_request(
        inbound(b'{"messages": [{"role": "user", "content": "a\\udc00b"}]}'), CLIENT, CFG,
        MAX_PAYLOAD)
    if isinstance(result, Rejected):
        assert result.code == ErrorCode.bad_request
    else:
        assert json_text(result.request.model_dump(exclude_none=True)).encode()


# ---------------------------------------------------------------------------- property

_KNOWN_FIELDS = sorted(BridgeRequest.model_fields)

_json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
              | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
_json_value = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]),
     "content": st.text(max_size=30) | _json_leaf},
)
_field_value = st.one_of(
    _json_value,
    st.lists(_message, max_size=3),
    st.from_regex(r"[A-Za-z0-9_./#+-]{0,70}", fullmatch=True),
    st.integers(min_value=-5, max_value=100_000),
    st.floats(min_value=-1, max_value=6),
)
_mixed_dict = st.dictionaries(st.sampled_from(_KNOWN_FIELDS) | st.text(max_size=10),
                              _field_value, max_size=6)
_mostly_valid = st.builds(
    lambda msgs, extra: {"messages": msgs, **extra},
    st.lists(_message, min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(_KNOWN_FIELDS), _field_value, max_size=4),
)

# Lone surrogates only reach the bridge as JSON escapes ("\\ud800"): json.dumps writes them so.
_surrogate_text = st.text(st.characters(categories=["Cs", "Ll"]), min_size=1, max_size=4)
_with_surrogates = st.dictionaries(st.sampled_from(_KNOWN_FIELDS) | _surrogate_text,
                                   _surrogate_text | _field_value, max_size=4)


def _to_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


_payloads = st.one_of(
    st.binary(max_size=5000),
    st.text(max_size=200).map(str.encode),
    _json_value.map(_to_bytes),
    _mixed_dict.map(_to_bytes),
    _mostly_valid.map(_to_bytes),
    _with_surrogates.map(lambda extra: _to_bytes({"messages": HI, **extra})),
)
_response_topics = st.one_of(
    st.none(),
    st.text(max_size=30),
    st.builds(lambda c, rest: f"llm/reply/{c}/{rest}", st.sampled_from(["dev1", "dev2", "dev"]),
              st.from_regex(r"[a-z/+#]{0,12}", fullmatch=True)),
)


@settings(max_examples=2000, deadline=None)
@given(
    payload=_payloads,
    client=st.from_regex(CLIENT_PATTERN, fullmatch=True),
    response_topic=_response_topics,
    correlation=st.none() | st.binary(max_size=16),
    max_payload=st.integers(min_value=128, max_value=100_000),
)
def test_parse_request_never_raises(payload: bytes, client: str, response_topic: str | None,
                                    correlation: bytes | None, max_payload: int) -> None:
    # Small max_request_bytes (4096) so that too_large is exercised too.
    msg = Inbound(f"llm/request/{client}", payload, response_topic, correlation, None, 5.0)
    result = parse_request(msg, client, CFG, max_payload)
    namespace = f"llm/reply/{client}/"
    assert isinstance(result, Accepted | Rejected)
    assert result.client == client
    assert result.reply.correlation_data == correlation
    assert is_valid_id(result.request_id)
    assert result.reply.topic.startswith(namespace)
    assert len(result.reply.topic) > len(namespace)
    if isinstance(result, Rejected):
        assert result.message
        assert len(result.message) <= 400
        assert result.reply.topic == namespace + result.request_id
        assert isinstance(result.code, ErrorCode)
        assert encode(ErrorMsg(id=result.request_id, seq=0, code=result.code,
                               message=result.message))
    else:
        assert "+" not in result.reply.topic and "#" not in result.reply.topic
        assert 128 <= result.chunk_bytes <= max(128, min(CFG.max_chunk_bytes, max_payload))
        assert 1 <= result.max_tokens <= CFG.max_tokens_cap
        assert (result.request.messages is None) != (result.request.prompt is None) \
            or result.request.clear


# ---------------------------------------------------------------------------- cancel


@pytest.mark.parametrize(("payload", "expected"), [
    (b'{"id":"x"}', "x"),
    (b'  {"id": "req-1.a_B"}\n', "req-1.a_B"),
    (b"x", "x"),
    (b"  abc-123\n", "abc-123"),
    (b"x" * 64, "x" * 64),
])
def test_parse_cancel_reads_the_id(payload: bytes, expected: str) -> None:
    assert parse_cancel(payload) == expected


@pytest.mark.parametrize("payload", [
    b"", b"   ", b"a/b", b"a+b", b"#", b"x" * 65, b"two words", b"\xff\xfe", b'"x"',
    b'{"id": 5}', b'{"id": "a/b"}', b'{"id": ""}', b'{"id": null}', b'{"other": "x"}',
    b'{"id": "x"', b'{"id": ["x"]}', b"[1, 2]", b"{" * 100_000, b'{"id": "\\ud800"}',
])
def test_parse_cancel_rejects_invalid_ids_and_garbage(payload: bytes) -> None:
    assert parse_cancel(payload) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | _json_value.map(_to_bytes))
def test_parse_cancel_never_raises(payload: bytes) -> None:
    found = parse_cancel(payload)
    assert found is None or is_valid_id(found)


@pytest.mark.parametrize("payload", [b"\xff", b'{"bogus": 1, "prompt": "x"}', b"{"])
def test_rejections_go_to_a_valid_response_topic(payload: bytes) -> None:
    """An MQTT 5 device listens on its Response Topic only: errors must reach it there."""
    topic = f"{NS}inbox/7"
    result = parse_request(inbound(payload, response_topic=topic, correlation_data=b"c7"),
                           CLIENT, CFG, MAX_PAYLOAD)
    assert isinstance(result, Rejected)
    assert result.reply.topic == topic
    assert result.reply.correlation_data == b"c7"


def test_response_topic_deeper_than_brokers_allow_is_refused_on_the_default_topic() -> None:
    """202 levels: Mosquitto 2.0 disconnects a client publishing that. The error names the
    limit and goes to the default reply topic, which the broker takes."""
    deep = NS + "l/" * 198 + "l"
    rej = reject({"id": "deep", "messages": HI}, response_topic=deep, correlation_data=b"c")
    assert rej.code is ErrorCode.bad_request
    assert "202 topic levels; the limit is 32" in rej.message
    assert rej.reply.topic == f"{NS}deep" and rej.reply.correlation_data == b"c"


def test_response_topic_that_leaves_no_room_for_a_message_is_refused() -> None:
    topic = NS + "x" * 600
    msg = inbound({"id": "r1", "messages": HI}, response_topic=topic)
    assert isinstance(parse_request(msg, CLIENT, CFG, MAX_PAYLOAD), Accepted)
    rej = parse_request(msg, CLIENT, CFG, 1024)  # a broker with a tiny Maximum Packet Size
    assert isinstance(rej, Rejected) and rej.code is ErrorCode.bad_request
    assert "512 must stay free" in rej.message and rej.reply.topic == f"{NS}r1"


def test_rejections_ignore_a_forbidden_response_topic() -> None:
    result = parse_request(inbound(b"\xff", response_topic="llm/reply/other/x"),
                           CLIENT, CFG, MAX_PAYLOAD)
    assert isinstance(result, Rejected)
    assert result.reply.topic == f"{NS}{result.request_id}"
