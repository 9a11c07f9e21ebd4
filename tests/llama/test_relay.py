"""The relay thread reading streams for waiting workers (bridge.llama.relay).

Each test drives ``Stream.pump`` with a running :class:`Relay` against the scripted
SSE server and checks that the worker gets exactly what iterating the stream in
its own thread gives: the same text and end, the same typed errors within their
timeouts, and a closed connection where a stuck server must be released.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from bridge.llama.client import Delta, LlamaCppClient, Stream, StreamEnd, TextDelta
from bridge.llama.relay import Relay
from bridge.protocol.errors import BackendProtocolError, IdleTimeout, StreamCancelled
from tests.support.fake_llama import (
    CLOSE_SEEN_S,
    DONE,
    PING,
    Action,
    Close,
    Pause,
    Reset,
    ScriptedSSEServer,
    Send,
    SSEHeaders,
    Stall,
    chat_chunk,
    chat_stream,
    event,
    usage_chunk,
)
from tests.support.llama_client import serve
from tests.support.prompts import HI as MESSAGES
from tests.support.waiting import poll_until

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def relay() -> Iterator[Relay]:
    relay = Relay()
    relay.start()
    yield relay
    relay.stop()


def pump(stream: Stream, relay: Relay) -> tuple[str, StreamEnd, list[str]]:
    """Pump a stream through the relay: (text, end, names of the threads that saw deltas)."""
    text: list[str] = []
    threads: list[str] = []

    def on_delta(delta: Delta) -> None:
        threads.append(threading.current_thread().name)
        if isinstance(delta, TextDelta):
            text.append(delta.text)

    with stream:
        end = stream.pump(on_delta, relay)
    return "".join(text), end, threads


def test_stream_is_read_by_the_relay_thread(clients: list[LlamaCppClient], relay: Relay) -> None:
    with ScriptedSSEServer(chat_stream(["Hel", "lo", " wor", "ld"])) as server:
        text, end, threads = pump(serve(clients, server).stream_chat(MESSAGES), relay)
    assert text == "Hello world"
    assert end.finish_reason == "stop"
    assert end.usage is not None and end.usage.completion_tokens == 4
    assert set(threads) == {"bridge-relay"}
    assert relay.relayed == 1
    assert relay.running == 0


def test_body_read_together_with_the_headers_is_not_lost(clients: list[LlamaCppClient],
                                                         relay: Relay) -> None:
    # The whole answer arrives with the headers, in the reader's buffer, then nothing
    # more (no final chunk): only what was buffered can complete the stream.
    body = (event(chat_chunk("all")), event(chat_chunk(" at once")),
            event(chat_chunk(finish="stop")), event(usage_chunk()), DONE)
    with ScriptedSSEServer([SSEHeaders(with_body=body), Stall(10)]) as server:
        text, end, _ = pump(serve(clients, server, idle=5.0).stream_chat(MESSAGES), relay)
    assert text == "all at once"
    assert end.finish_reason == "stop"


def test_many_streams_at_once_each_get_their_own_text(clients: list[LlamaCppClient],
                                                      relay: Relay) -> None:
    n = 24
    scripts = []
    for i in range(n):
        script: list[Action] = [SSEHeaders()]
        for j in range(5):
            script += [Send(event(chat_chunk(f"{i}.{j} "))), Pause(0.01)]
        script += [Send(event(chat_chunk(finish="length"))), Send(DONE)]
        scripts.append(script)
    results: dict[int, tuple[str, StreamEnd]] = {}
    errors: list[BaseException] = []
    with ScriptedSSEServer(scripts, max_connections=n) as server:
        client = serve(clients, server)

        def one(i: int) -> None:
            # The i-th connection plays script i: connect in order, then read together.
            try:
                text, end, _ = pump(client.stream_chat(MESSAGES), relay)
                results[i] = (text, end)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = []
        for i in range(n):
            thread = threading.Thread(target=one, args=(i,))
            thread.start()
            threads.append(thread)
            server.connection(i)  # wait until this one connected: keeps the order
        for thread in threads:
            thread.join(15)
    assert not errors
    texts = sorted(text for text, _ in results.values())
    assert texts == sorted("".join(f"{i}.{j} " for j in range(5)) for i in range(n))
    assert all(end.finish_reason == "length" for _, end in results.values())
    assert relay.relayed == n and relay.running == 0


def test_pings_do_not_count_as_data_and_slow_deltas_do_not_use_up_idle(
        clients: list[LlamaCppClient], relay: Relay) -> None:
    script: list[Action] = [SSEHeaders()]
    for i in range(4):
        script += [Send(PING), Pause(0.1), Send(PING), Pause(0.1), Send(event(chat_chunk(str(i))))]
    script += [Send(event(chat_chunk(finish="stop"))), Send(DONE)]
    seen: list[str] = []

    def slow(delta: Delta) -> None:
        if isinstance(delta, TextDelta):
            seen.append(delta.text)
            # A consumer slower than the idle timeout (a slow broker); not a wait for
            # a condition.
            time.sleep(0.4)

    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=0.35).stream_chat(MESSAGES)
        with stream:
            end = stream.pump(slow, relay)
    assert seen == ["0", "1", "2", "3"]
    assert end.finish_reason == "stop"
    assert stream.pings == 8


def test_stall_mid_stream_is_idle_timeout_and_closes(clients: list[LlamaCppClient],
                                                     relay: Relay) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("partial"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=0.4).stream_chat(MESSAGES)
        start = time.monotonic()
        with pytest.raises(IdleTimeout, match=r"idle=0\.4 s"):
            pump(stream, relay)
        took = time.monotonic() - start
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    assert 0.35 <= took < 2.0
    assert relay.running == 0


def test_only_pings_is_idle_timeout(clients: list[LlamaCppClient], relay: Relay) -> None:
    script: list[Action] = [SSEHeaders(), Send(event(chat_chunk("a")))]
    script += [Send(PING), Pause(0.05)] * 100
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=0.4).stream_chat(MESSAGES)
        with pytest.raises(IdleTimeout, match="keep-alive ping"):
            pump(stream, relay)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)


@pytest.mark.parametrize(("ending", "match"), [
    (Reset(), "broke mid-stream"),
    (Close(), "broke mid-stream"),
])
def test_connection_lost_mid_stream_is_protocol_error(clients: list[LlamaCppClient],
                                                      relay: Relay, ending: Action,
                                                      match: str) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("half"))), ending]
    with ScriptedSSEServer(script) as server:
        with pytest.raises(BackendProtocolError, match=match):
            pump(serve(clients, server, attempts=3).stream_chat(MESSAGES), relay)
        assert len(server.connections) == 1  # never retried once the answer started


def test_body_ending_without_finish_reason_is_cut_off(clients: list[LlamaCppClient],
                                                      relay: Relay) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("half")))]
    with ScriptedSSEServer(script) as server, pytest.raises(BackendProtocolError, match="cut off"):
        pump(serve(clients, server).stream_chat(MESSAGES), relay)


def test_malformed_event_is_protocol_error_and_closes(clients: list[LlamaCppClient],
                                                      relay: Relay) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Send(b'data: {"choices": [\n\n'),
              Stall(10)]
    with ScriptedSSEServer(script) as server:
        with pytest.raises(BackendProtocolError, match="malformed JSON"):
            pump(serve(clients, server).stream_chat(MESSAGES), relay)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)


def test_close_delimited_body_is_read_by_the_worker(clients: list[LlamaCppClient],
                                                    relay: Relay) -> None:
    script = [SSEHeaders(chunked=False), Send(event(chat_chunk("plain"))),
              Send(event(chat_chunk(finish="stop")))]
    with ScriptedSSEServer(script) as server:
        text, end, threads = pump(serve(clients, server).stream_chat(MESSAGES), relay)
    assert (text, end.finish_reason) == ("plain", "stop")
    assert threads == [threading.current_thread().name]
    assert relay.relayed == 0


def test_cancel_mid_stream_ends_the_wait_and_closes(clients: list[LlamaCppClient],
                                                    relay: Relay) -> None:
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=10.0).stream_chat(MESSAGES)
        got = threading.Event()

        def on_delta(delta: Delta) -> None:
            got.set()

        canceller = threading.Thread(target=lambda: got.wait(5) and stream.cancel())
        canceller.start()
        with stream, pytest.raises(StreamCancelled):
            stream.pump(on_delta, relay)
        canceller.join(5)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    assert relay.running == 0


def test_error_in_on_delta_reaches_the_worker_and_closes(clients: list[LlamaCppClient],
                                                         relay: Relay) -> None:
    class Boom(Exception):
        pass

    def on_delta(delta: Delta) -> None:
        raise Boom("publishing failed")

    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Stall(10)]
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=10.0).stream_chat(MESSAGES)
        with stream, pytest.raises(Boom):
            stream.pump(on_delta, relay)
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    assert relay.running == 0


def test_stopping_the_relay_cancels_the_streams_it_reads(clients: list[LlamaCppClient]) -> None:
    relay = Relay()
    relay.start()
    script = [SSEHeaders(), Send(event(chat_chunk("a"))), Stall(10)]
    errors: list[BaseException] = []
    with ScriptedSSEServer(script) as server:
        stream = serve(clients, server, idle=10.0).stream_chat(MESSAGES)

        def worker() -> None:
            try:
                with stream:
                    stream.pump(lambda delta: None, relay)
            except BaseException as exc:  # checked below
                errors.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        assert poll_until(lambda: relay.running, lambda n: n == 1, 5, interval=0.01) == 1
        relay.stop()
        thread.join(5)
        assert not thread.is_alive()
        assert server.connection(0).client_closed.wait(CLOSE_SEEN_S)
    assert len(errors) == 1 and isinstance(errors[0], StreamCancelled)
    # A stopped relay takes nothing.
    with (ScriptedSSEServer(chat_stream(["x"])) as server,
          pytest.raises(StreamCancelled)):
        pump(serve(clients, server).stream_chat(MESSAGES), relay)
