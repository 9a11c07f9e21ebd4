"""``ReplyChannel``: the ordered reply messages of one request.

- It tells its caller when buffered text has a new flush deadline, once per coalescing
  period: the service then wakes the ticker for it (and not for every token). With the
  real link against a real Mosquitto, what the subscriber receives is the text in order,
  in chunks with contiguous ``seq``.
- Without a broker (a fake publisher and a fake clock): the deadline arithmetic,
  ``seq`` order across message types, and exactly one terminal message.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bridge.config.settings import load_config
from bridge.mqtt.link import MqttLink
from bridge.protocol.address import ReplyAddress
from bridge.protocol.messages import (
    ChunkMsg,
    DoneMsg,
    ErrorCode,
    ErrorMsg,
    ProgressMsg,
    StartMsg,
    Timings,
    Usage,
    decode_reply,
)
from bridge.service.reply import ReplyChannel
from tests.support.clock import FakeClock
from tests.support.device import Device
from tests.support.processes import MosquittoProcess
from tests.support.publisher import RecordingPublisher
from tests.support.waiting import poll_until

pytestmark = pytest.mark.timeout(60)

TOPIC = "rchan/reply/dev/r1"


@pytest.fixture
def received(mosquitto: MosquittoProcess) -> Iterator[Device]:
    """A subscriber collecting the payloads published on ``rchan/#``."""
    with Device.bare(mosquitto.host, mosquitto.port, "rchan-sub") as device:
        device.subscribe("rchan/#")
        yield device


@pytest.fixture
def link(mosquitto: MosquittoProcess) -> Iterator[MqttLink]:
    cfg = load_config(mqtt={"host": mosquitto.host, "port": mosquitto.port, "qos": 1,
                            "protocol": "5"}, bridge_id="rchan")
    mqtt_link = MqttLink(cfg, lambda msg: None, will_payload=b"{}",
                         subscriptions=[cfg.topics.cancel_filter()])
    mqtt_link.start()
    try:
        yield mqtt_link
    finally:
        mqtt_link.close(b"{}")


def test_a_new_flush_deadline_is_reported_once_per_period(
        link: MqttLink, received: Device) -> None:
    channel = ReplyChannel(link, ReplyAddress(TOPIC, "r1"), chunk_bytes=256, flush_s=0.02)
    assert channel.text("first") is False  # published at once: nothing buffered
    assert channel.text(" a") is True  # buffered: a new deadline
    due = channel.due()
    assert due is not None
    assert channel.text(" b") is False and channel.due() == due  # same period
    assert poll_until(time.monotonic, lambda now: now >= due, 5, 0.005) >= due
    channel.poll()  # the ticker's flush
    assert channel.due() is None
    assert channel.text(" c") is True  # a new period
    assert channel.text("x" * 300) is True  # overflow: flushed, the rest buffered anew
    channel.poll()  # not due yet: nothing happens
    with channel.lock:
        channel._flush_all()  # what the terminal message does first
    sent = "first a b c" + "x" * 300

    def text() -> str:
        return "".join(m.text or "" for m in map(decode_reply, received.payloads())
                       if isinstance(m, ChunkMsg))

    assert received.wait(lambda d: len(text()) >= len(sent), 10), received.payloads()
    got = [decode_reply(p) for p in received.payloads()]
    assert [m.seq for m in got] == list(range(len(got)))
    assert text() == sent


# ============================================================================ without a broker


ADDRESS = ReplyAddress(TOPIC, "r1", b"corr")


def fake_channel(flush_s: float, clock: FakeClock, **kwargs: bool) -> tuple[ReplyChannel,
                                                                           RecordingPublisher]:
    fake = RecordingPublisher()
    return ReplyChannel(fake, ADDRESS, chunk_bytes=256, flush_s=flush_s, clock=clock,
                        **kwargs), fake


@pytest.mark.parametrize(("flush_s", "grid"), [(0.05, 0.01), (0.02, 0.004)])
def test_flush_deadline_is_the_coalescing_time_rounded_down_to_the_grid(
        flush_s: float, grid: float) -> None:
    clock = FakeClock(1000.0)
    channel, fake = fake_channel(flush_s, clock)
    assert channel.text("first") is False  # the first text goes out at once
    assert len(fake.sent) == 1 and channel.due() is None
    clock.now = 1000.0037
    assert channel.text(" a") is True
    due = channel.due()
    assert due is not None
    exact = clock.now + flush_s
    assert exact - grid < due <= exact  # at most one grid step early, never late
    assert due / grid == pytest.approx(round(due / grid))  # on the grid
    clock.now = due - grid / 10
    assert channel.text(" b") is False and channel.due() == due  # the same period
    channel.poll()
    assert len(fake.sent) == 1  # not due yet
    clock.now = due
    channel.poll()
    assert fake.texts() == ["first", " a b"]
    assert channel.due() is None
    assert channel.text(" c") is True  # a new period, a new deadline from now
    again = channel.due()
    assert again is not None and clock.now + flush_s - grid < again <= clock.now + flush_s


def test_without_coalescing_every_text_goes_out_at_once() -> None:
    clock = FakeClock()
    channel, fake = fake_channel(0.0, clock)
    for word in ("a", " b", " c"):
        assert channel.text(word) is False
        assert channel.due() is None
    assert fake.texts() == ["a", " b", " c"]


def test_seq_is_contiguous_across_message_types_and_every_message_carries_the_address() -> None:
    clock = FakeClock()
    channel, fake = fake_channel(0.05, clock)
    with channel.lock:
        channel.start_locked("m", 2)
    channel.progress(queued_ms=5)
    channel.reasoning("think")  # first reasoning: at once
    channel.reasoning(" more")  # buffered
    channel.text("answer")  # flushes the reasoning first, then the text at once
    channel.text(" rest")  # buffered
    clock.now += 1
    channel.done("stop", Usage(completion_tokens=3), Timings())  # flushes the text first
    got = fake.messages()
    assert [type(m) for m in got] == [StartMsg, ProgressMsg, ChunkMsg, ChunkMsg, ChunkMsg,
                                      ChunkMsg, DoneMsg]
    assert [m.seq for m in got] == list(range(len(got)))
    assert all(m.id == "r1" for m in got)
    chunks = [m for m in got if isinstance(m, ChunkMsg)]
    assert [(c.reasoning, c.text) for c in chunks] == \
        [("think", None), (" more", None), (None, "answer"), (None, " rest")]
    assert isinstance(got[0], StartMsg) and (got[0].model, got[0].queue) == ("m", 2)
    assert {(s.topic, s.correlation_data) for s in fake.sent} == {(TOPIC, b"corr")}
    # `start` comes from the intake thread, which never waits for the publish window
    assert [s.flow_controlled for s in fake.sent] == [False] + [True] * (len(got) - 1)
    assert channel.seq.next == len(got)


def test_a_heartbeat_sends_text_still_being_coalesced_instead_of_a_progress() -> None:
    clock = FakeClock()
    channel, fake = fake_channel(10.0, clock)  # a flush_ms longer than heartbeat_s
    channel.text("first")  # the first text goes at once
    channel.text(" second")  # buffered for 10 s
    channel.progress()  # the ticker's heartbeat mid-answer
    channel.progress()  # nothing buffered now: a progress
    got = fake.messages()
    assert [type(m) for m in got] == [ChunkMsg, ChunkMsg, ProgressMsg]
    assert [m.text for m in got if isinstance(m, ChunkMsg)] == ["first", " second"]
    assert channel.due() is None


def test_exactly_one_terminal_message_and_nothing_after_it() -> None:
    clock = FakeClock()
    channel, fake = fake_channel(0.05, clock)
    channel.text("a")
    channel.text(" b")  # buffered: the terminal message flushes it first
    channel.done("stop", None, Timings())
    terminal_info = channel.terminal_info
    channel.error(ErrorCode.internal, "too late")
    channel.reply(65536, finish_reason="stop")
    channel.progress(queued_ms=1)
    clock.now += 1
    channel.poll()
    got = fake.messages()
    assert [type(m) for m in got] == [ChunkMsg, ChunkMsg, DoneMsg]
    assert [m.seq for m in got] == [0, 1, 2]
    assert channel.finished and channel.terminal == "DoneMsg"
    assert terminal_info is not None and terminal_info.mid == 3  # the done's handle
    assert channel.terminal_info is terminal_info
    assert channel.record == [s.payload for s in fake.sent]  # kept for a duplicate


def test_refused_stream_ends_with_one_error_on_the_given_topic() -> None:
    clock = FakeClock()
    channel, fake = fake_channel(0.05, clock)
    channel.text("a")
    channel.refused("llm/reply/dev/r1", "stopped")
    got = fake.messages()
    assert [type(m) for m in got] == [ChunkMsg, ErrorMsg]
    end = got[-1]
    assert isinstance(end, ErrorMsg) and (end.seq, end.code, end.retryable, end.message) == \
        (1, ErrorCode.internal, False, "stopped")
    last = fake.sent[-1]
    assert (last.topic, last.correlation_data, last.flow_controlled) == \
        ("llm/reply/dev/r1", b"corr", False)
    assert channel.finished and channel.record is None  # a duplicate must run again
    channel.done("stop", None, Timings())
    assert len(fake.sent) == 2


def test_with_a_device_bound_every_message_is_brought_down_to_it() -> None:
    room = 120
    fake = RecordingPublisher()
    channel = ReplyChannel(fake, ReplyAddress(TOPIC, "r1", b"corr", room), chunk_bytes=room,
                           flush_s=0.0, clock=FakeClock())
    with channel.lock:
        channel.start_locked("a-model-name-that-is-rather-long-" * 3, 7)
    channel.progress(queued_ms=1234.5, prompt_progress={"total": 900, "processed": 10})
    channel.text("héllo " * 40)
    channel.done("length", Usage(prompt_tokens=1234, completion_tokens=56),
                 Timings(queue_ms=1.5, ttft_ms=23.25, total_ms=4567.75, tokens_per_s=12.5))
    assert all(len(s.payload) <= room for s in fake.sent), [len(s.payload) for s in fake.sent]
    got = fake.messages()
    assert "".join(m.text or "" for m in got if isinstance(m, ChunkMsg)) == "héllo " * 40
    assert [m.seq for m in got] == list(range(len(got)))
    done = got[-1]
    assert isinstance(done, DoneMsg) and done.finish_reason == "length"
    # timings went first, usage was kept: the documented order
    assert "timings" not in done.model_fields_set and done.usage.prompt_tokens == 1234
    # a reply's fit is judged against the device's bound as well as the broker's room
    assert channel.reply_fits(65536, finish_reason="stop") is True
    assert channel.reply_fits(65536, content="x" * room, finish_reason="stop") is False


def test_a_terminal_message_that_cannot_fit_becomes_the_smallest_error() -> None:
    """Intake sizes the bound for the finish reasons the bridge knows; an unknown, long one
    from a backend must not leave the device without its terminal message."""
    fake = RecordingPublisher()
    channel = ReplyChannel(fake, ReplyAddress(TOPIC, "r1", None, 110), chunk_bytes=110,
                           flush_s=0.0, clock=FakeClock())
    channel.done("a-finish-reason-nobody-planned-for-" * 3, None, Timings())
    (end,) = fake.messages()
    assert isinstance(end, ErrorMsg) and end.code == ErrorCode.internal and end.message == ""
    assert len(fake.sent[0].payload) <= 110 and channel.finished
