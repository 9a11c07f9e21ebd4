"""The device clients' protocol core (bridge/mqtt/exchange.py, bridge/mqtt/answer.py),
without a broker: order, copies, gaps, the terminal message, resends on a fake clock,
an answer that starts again, and error replies as exceptions."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from bridge.mqtt.answer import AnswerText, error_of
from bridge.mqtt.exchange import (
    Exchange,
    Publish,
    cancel_message,
    request_message,
    text_request,
)
from bridge.protocol.errors import (
    AnswerChanged,
    BackendHTTPError,
    BackendTimeout,
    BackendUnavailable,
    BridgeError,
    ReplyTimeout,
    RequestRejected,
    SequenceError,
)
from bridge.protocol.messages import (
    ChunkMsg,
    DoneMsg,
    ErrorCode,
    ErrorMsg,
    ProgressMsg,
    ReplyMsg,
    StartMsg,
    encode,
)
from bridge.protocol.topics import Topics
from tests.support.clock import FakeClock

TOPICS = Topics()
NS = TOPICS.reply_namespace("kitchen")
TOPIC = TOPICS.reply("kitchen", "q1")


def _request(rid: str = "q1") -> Publish:
    return request_message(TOPICS, "kitchen", {"id": rid, "prompt": "Hi"})


def _exchange(clock: FakeClock, request: Publish | None = None, **kwargs: float
              ) -> Exchange:
    return Exchange(NS, _request() if request is None else request, now=clock(),
                    resend_after_s=kwargs.pop("resend_after_s", 15.0),
                    max_resends=int(kwargs.pop("max_resends", 3)),
                    idle_timeout_s=kwargs.pop("idle_timeout_s", 60.0))


def _answer(rid: str = "q1", *texts: str) -> list[bytes]:
    """start, one chunk per text, done: the payloads as the bridge sends them."""
    msgs: list[BaseModel] = [StartMsg(id=rid, seq=0, model="m")]
    msgs += [ChunkMsg(id=rid, seq=i + 1, text=t) for i, t in enumerate(texts)]
    msgs.append(DoneMsg(id=rid, seq=len(msgs), finish_reason="stop"))
    return [encode(m) for m in msgs]


def _feed(ex: Exchange, payloads: list[bytes], now: float) -> list[object]:
    out: list[object] = []
    for payload in payloads:
        out += ex.on_message(TOPIC, payload, now).messages
    return out


# --------------------------------------------------------------------------- requests


def test_a_json_request_gets_an_id_and_plain_text_goes_as_is() -> None:
    built = request_message(TOPICS, "kitchen", {"prompt": "Hi", "max_tokens": 4})
    body = json.loads(built.payload)
    assert built.topic == "llm/request/kitchen"
    assert built.request_id == body["id"] and len(body["id"]) == 12
    assert body == {"prompt": "Hi", "max_tokens": 4, "id": built.request_id}
    assert request_message(TOPICS, "kitchen", {"prompt": "x"}, "r9").request_id == "r9"
    assert request_message(TOPICS, "kitchen", {"id": "mine", "prompt": "x"},
                           "r9").request_id == "mine"
    plain = request_message(TOPICS, "kitchen", "  Hello  ")
    assert plain == Publish("llm/request/kitchen", b"  Hello  ", None)
    assert request_message(TOPICS, "kitchen", b"\x00raw").payload == b"\x00raw"
    assert text_request("  Hi ") == {"messages": [{"role": "user", "content": "  Hi "}]}
    cancel = cancel_message(TOPICS, "kitchen", "q1")
    assert (cancel.topic, json.loads(cancel.payload)) == ("llm/cancel/kitchen", {"id": "q1"})


# --------------------------------------------------------------------------- order


def test_messages_in_order_until_the_terminal_one() -> None:
    clock = FakeClock()
    ex = _exchange(clock)
    payloads = _answer("q1", "Hello", " world")
    deliveries = [ex.on_message(TOPIC, p, clock()) for p in payloads]
    assert [m.type for d in deliveries for m in d.messages] == ["start", "chunk", "chunk", "done"]
    assert [d.finished for d in deliveries] == [False, False, False, True]
    assert not any(d.restarted for d in deliveries)
    assert ex.finished and ex.expected == 4
    # after the end nothing counts, not even a copy of the end
    assert ex.on_message(TOPIC, payloads[-1], clock()).messages == ()


def test_copies_are_dropped_and_gaps_raise() -> None:
    clock = FakeClock()
    ex = _exchange(clock)
    start, c1, _lost, done = _answer("q1", "a", "b")
    assert len(_feed(ex, [start, c1, start, c1, c1], clock())) == 2  # QoS 1 redelivery
    with pytest.raises(SequenceError, match="expected seq 2, got 3"):
        ex.on_message(TOPIC, done, clock())


def test_other_requests_other_topics_and_garbage_are_ignored() -> None:
    clock = FakeClock()
    ex = _exchange(clock)
    other = _answer("q2", "x")
    assert ex.on_message(TOPICS.reply("kitchen", "q2"), other[0], clock()).messages == ()
    assert ex.on_message("llm/status/b1", _answer()[0], clock()).messages == ()
    junk = ex.on_message(TOPIC, b"not json", clock())
    assert junk.undecodable and junk.messages == ()
    assert ex.expected == 0
    assert len(_feed(ex, _answer("q1", "x"), clock())) == 3


def test_without_an_id_the_first_request_seen_is_followed() -> None:
    clock = FakeClock()
    ex = Exchange(NS, request_message(TOPICS, "kitchen", "Hi"), now=clock())
    assert ex.request_id is None
    first, other = _answer("gen1", "x"), _answer("gen2", "y")
    got = ex.on_message(TOPIC, first[0], clock()).messages
    got += ex.on_message(TOPICS.reply("kitchen", "gen2"), other[0], clock()).messages
    for payload in first[1:]:
        got += ex.on_message(TOPIC, payload, clock()).messages
    assert ex.request_id == "gen1" and [m.id for m in got] == ["gen1"] * 3


# --------------------------------------------------------------------------- silence


def test_resends_after_silence_with_the_same_request_and_a_bounded_count() -> None:
    clock = FakeClock(100.0)
    request = _request()
    ex = _exchange(clock, request, resend_after_s=15, max_resends=3, idle_timeout_s=60)
    assert ex.deadline() == 115.0
    clock.now = 114.9
    assert ex.on_silence(clock()) is None  # not due yet
    sent = []
    for due in (115.0, 130.0, 145.0):
        assert ex.deadline() == due
        clock.now = due
        sent.append(ex.on_silence(clock()))
    assert sent == [request] * 3 and ex.resends == 3  # the same bytes, hence the same id
    # out of resends: the next deadline is giving up, 60 s after the last message
    assert ex.deadline() == 160.0
    clock.now = 159.0
    assert ex.on_silence(clock()) is None
    clock.now = 160.0
    with pytest.raises(ReplyTimeout, match=r"no reply for 60 s \(request q1\) after 3 resends"):
        ex.on_silence(clock())


def test_a_message_restarts_the_silence_and_the_resend_count() -> None:
    clock = FakeClock(0.0)
    ex = _exchange(clock, resend_after_s=15, max_resends=1, idle_timeout_s=60)
    start, chunk, done = _answer("q1", "x")
    clock.now = 15.0
    assert ex.on_silence(clock()) is not None
    assert ex.deadline() == 60.0  # the one resend is used: wait for the idle timeout
    clock.now = 20.0
    ex.on_message(TOPIC, start, clock())  # the bridge answers
    assert ex.deadline() == 35.0  # silence counts from the message, and may resend again
    clock.now = 30.0
    ex.on_message(TOPIC, start, clock())  # a copy is a sign of life too
    assert ex.deadline() == 45.0
    clock.now = 45.0
    assert ex.on_silence(clock()) is not None
    assert _feed(ex, [chunk, done], clock()) and ex.finished
    assert ex.resends == 2


def test_heartbeats_keep_a_slow_request_alive_without_resends() -> None:
    clock = FakeClock(0.0)
    ex = _exchange(clock, resend_after_s=15, max_resends=3, idle_timeout_s=60)
    _feed(ex, [encode(StartMsg(id="q1", seq=0, queue=3))], clock())
    for seq in range(1, 40):  # 200 s in the queue, a heartbeat every 5 s
        clock.now += 5
        assert ex.deadline() > clock()
        _feed(ex, [encode(ProgressMsg(id="q1", seq=seq, queued_ms=seq * 5000.0))], clock())
    assert ex.resends == 0


def test_plain_text_is_never_resent_and_a_short_idle_timeout_wins() -> None:
    clock = FakeClock(0.0)
    plain = Exchange(NS, request_message(TOPICS, "kitchen", "Hi"), now=clock(),
                     resend_after_s=1, idle_timeout_s=10)
    assert plain.deadline() == 10.0  # its id is the bridge's: a resend would run it again
    clock.now = 5.0
    assert plain.on_silence(clock()) is None
    short = _exchange(FakeClock(0.0), resend_after_s=15, idle_timeout_s=5)
    assert short.deadline() == 5.0
    with pytest.raises(ReplyTimeout):
        short.on_silence(5.0)
    assert short.resends == 0


# --------------------------------------------------------------------------- answers again


def test_a_replayed_answer_continues_seamlessly() -> None:
    """The bridge finished while the device heard nothing, and replays the recorded answer
    to the resend byte for byte: its first messages are copies, the rest is new."""
    clock = FakeClock(0.0)
    ex = _exchange(clock)
    answer = _answer("q1", "one", " two", " three")
    assert len(_feed(ex, answer[:3], clock())) == 3
    clock.now = 15.0
    assert ex.on_silence(clock()) is not None
    deliveries = [ex.on_message(TOPIC, p, clock()) for p in answer]
    assert [len(d.messages) for d in deliveries] == [0, 0, 0, 1, 1]
    assert not any(d.restarted for d in deliveries) and deliveries[-1].finished


def test_an_answer_run_again_is_handed_over_from_its_start() -> None:
    """A restarted bridge runs the resend anew: its start may equal the first one, its
    chunks are cut differently. From the first difference on, the new answer is handed
    over from seq 0, with what was held back."""
    clock = FakeClock(0.0)
    ex = _exchange(clock)
    first = _answer("q1", "Hel", "lo", " there")
    assert len(_feed(ex, first[:3], clock())) == 3  # start, "Hel", "lo"; then silence
    again = _answer("q1", "Hello", " there")
    held = ex.on_message(TOPIC, again[0], clock())  # the same start: held back
    assert held.messages == () and not held.restarted
    restart = ex.on_message(TOPIC, again[1], clock())
    assert restart.restarted
    assert [(m.seq, m.type) for m in restart.messages] == [(0, "start"), (1, "chunk")]
    rest = [ex.on_message(TOPIC, p, clock()) for p in again[2:]]
    assert [m.seq for d in rest for m in d.messages] == [2, 3] and rest[-1].finished


def test_a_different_start_restarts_at_once() -> None:
    clock = FakeClock(0.0)
    ex = _exchange(clock)
    _feed(ex, _answer("q1", "a", "b")[:2], clock())
    moved = encode(StartMsg(id="q1", seq=0, model="m", queue=2))
    restart = ex.on_message(TOPIC, moved, clock())
    assert restart.restarted and [m.seq for m in restart.messages] == [0]
    assert ex.expected == 1


def test_a_new_answer_with_its_beginning_missing_is_a_gap() -> None:
    clock = FakeClock(0.0)
    ex = _exchange(clock)
    _feed(ex, _answer("q1", "a", "b", "c")[:4], clock())
    with pytest.raises(SequenceError, match="started again"):
        ex.on_message(TOPIC, encode(ChunkMsg(id="q1", seq=2, text="other")), clock())


# --------------------------------------------------------------------------- text


def _text_of(ex: Exchange, text: AnswerText, payloads: list[bytes]) -> list[str]:
    out: list[str] = []
    for payload in payloads:
        out += text.feed(ex.on_message(TOPIC, payload, 0.0))
    return out


def test_text_across_a_restart_gives_only_what_is_new() -> None:
    ex, text = _exchange(FakeClock(0.0)), AnswerText()
    first = _answer("q1", "Hel", "lo", " there")
    assert _text_of(ex, text, first[:3]) == ["Hel", "lo"]
    again = [encode(StartMsg(id="q1", seq=0, model="m", queue=1)),
             encode(ChunkMsg(id="q1", seq=1, text="He")),
             encode(ChunkMsg(id="q1", seq=2, text="llo the")),
             encode(ChunkMsg(id="q1", seq=3, text="re!")),
             encode(DoneMsg(id="q1", seq=4, finish_reason="stop"))]
    assert _text_of(ex, text, again) == [" the", "re!"]
    assert text.text == "Hello there!" and ex.finished


def test_text_that_changes_in_a_restart_raises() -> None:
    ex, text = _exchange(FakeClock(0.0)), AnswerText()
    _text_of(ex, text, _answer("q1", "Hello", " there")[:3])
    with pytest.raises(AnswerChanged):
        _text_of(ex, text, [encode(StartMsg(id="q1", seq=0, model="m", queue=1)),
                            encode(ChunkMsg(id="q1", seq=1, text="Help"))])


def test_text_of_a_reply_and_of_reasoning() -> None:
    ex, text = _exchange(FakeClock(0.0)), AnswerText()
    msgs = [StartMsg(id="q1", seq=0), ChunkMsg(id="q1", seq=1, reasoning="hmm"),
            ReplyMsg(id="q1", seq=2, content="42", finish_reason="stop")]
    assert _text_of(ex, text, [encode(m) for m in msgs]) == ["42"]


@pytest.mark.parametrize(("code", "retryable", "cls"), [
    (ErrorCode.bad_request, False, RequestRejected),
    (ErrorCode.too_large, False, RequestRejected),
    (ErrorCode.rate_limited, True, RequestRejected),
    (ErrorCode.busy, True, RequestRejected),
    (ErrorCode.expired, False, RequestRejected),
    (ErrorCode.backend_unavailable, True, BackendUnavailable),
    (ErrorCode.timeout, False, BackendTimeout),
    (ErrorCode.backend_error, False, BackendHTTPError),
    (ErrorCode.internal, True, BridgeError),
])
def test_an_error_reply_raises_the_class_of_its_code(code: ErrorCode, retryable: bool,
                                                     cls: type[BridgeError]) -> None:
    msg = ErrorMsg(id="q1", seq=1, code=code, message="what to change", retryable=retryable,
                   retry_after_ms=500 if retryable else None, backend_type="server_error")
    ex, text = _exchange(FakeClock(0.0)), AnswerText()
    _text_of(ex, text, [encode(StartMsg(id="q1", seq=0))])
    with pytest.raises(cls) as raised:
        _text_of(ex, text, [encode(msg)])
    exc = raised.value
    assert type(exc) is cls and exc.code == code and exc.retryable is retryable
    assert str(exc) == "what to change"
    if isinstance(exc, RequestRejected):
        assert exc.retry_after_ms == msg.retry_after_ms
    if isinstance(exc, BackendHTTPError):
        assert exc.error_type == "server_error"
    assert error_of(msg).code == code
