"""The llama client's fault cases as a table: what the server does, what a client must do.

Each :class:`FaultCase` is one thing a llama-server (or the network) can do to a call --
stall, reset, send a malformed event, refuse the connection -- with the outcome every
client must reach: the typed exception (class, message pattern, how many connections
it made) or, for the robustness cases, the exact text. The blocking and the asyncio
clients run the same table (tests/llama/test_async_client_faults.py), so they fail
the same way.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from bridge.protocol.errors import (
    BackendHTTPError,
    BackendProtocolError,
    BackendStreamError,
    BackendUnavailable,
    BridgeError,
    ConnectTimeout,
    FirstByteTimeout,
    IdleTimeout,
)
from tests.support.fake_llama import (
    DONE,
    PING,
    Action,
    Close,
    Pause,
    Reset,
    Respond,
    ScriptedSSEServer,
    Send,
    SSEHeaders,
    Stall,
    chat_chunk,
    chat_stream,
    event,
    llama_error,
)

Call = Literal["stream", "chat"]
Target = Literal["scripted", "refused", "unaccepting"]

_LOADING = llama_error(503, "Loading model", "unavailable_error")
_SPLIT_TEXT = "h\u00e9llo \U0001f642 \u4e16\u754c \u0939\u093f\u0928\u094d\u0926\u0940"


@dataclass(frozen=True)
class FaultCase:
    """One fault and the outcome every llama client must reach.

    Attributes:
        id: the test id.
        scripts: what the scripted server plays, per connection (see ScriptedSSEServer).
        call: ``"stream"`` (a streamed chat read to its end) or ``"chat"`` (non-streamed).
        settings: client settings (see tests.support.llama_client.make_client).
        error: the exception the call must raise, or None for success.
        match: a pattern its message must contain.
        text: on success, the answer's text.
        connections: how many connections the client must have made (retries), if set.
        closes: the client must close a connection the server holds open (a stall).
        target: ``"scripted"``, or a port that refuses connections, or one that never
            accepts them.
        seconds: bounds on how long the call takes, for the cases about timeouts.
    """

    id: str
    scripts: Sequence[Any] = ()
    call: Call = "stream"
    settings: dict[str, Any] = field(default_factory=dict)
    error: type[BridgeError] | None = None
    match: str | None = None
    text: str | None = None
    connections: int | None = None
    closes: bool = False
    target: Target = "scripted"
    seconds: tuple[float, float] = (0.0, 5.0)


def _pings_between_data() -> list[Action]:
    script: list[Action] = [SSEHeaders()]
    for i in range(6):
        script += [Send(PING), Pause(0.12), Send(PING), Pause(0.12),
                   Send(event(chat_chunk(str(i))))]
    return [*script, Send(event(chat_chunk(finish="stop"))), Send(DONE)]


def _split_utf8() -> list[Action]:
    raw = event(chat_chunk(_SPLIT_TEXT))
    # Every byte its own HTTP chunk and TCP write: code points arrive split.
    return [SSEHeaders(), *(Send(raw[i:i + 1]) for i in range(len(raw))),
            Send(event(chat_chunk(finish="stop"))), Send(DONE)]


_IN_BAND = {"error": {"code": 500, "message": "slot crashed", "type": "server_error"}}
_LEGACY = b'error: {"code":400,"message":"bad grammar","type":"invalid_request_error"}\n\n'
_CONTEXT = "request (3024 tokens) exceeds the available context size (2048 tokens)"

FAULT_CASES: list[FaultCase] = [
    # ----------------------------------------------------------------- robustness
    FaultCase("eof-after-finish-without-done",
              [SSEHeaders(), Send(event(chat_chunk("a"))), Send(event(chat_chunk(finish="stop")))],
              text="a"),
    FaultCase("close-delimited-body",
              [SSEHeaders(chunked=False), Send(event(chat_chunk("a"))),
               Send(event(chat_chunk(finish="stop"))), Close()], text="a"),
    FaultCase("utf8-split-across-writes", _split_utf8(), text=_SPLIT_TEXT),
    FaultCase("crlf-line-endings",
              [SSEHeaders(), Send(event(chat_chunk("x"), eol=b"\r\n")), Send(b":\r\n\r\n"),
               Send(event(chat_chunk("y"), eol=b"\r\n")),
               Send(event(chat_chunk(finish="stop"), eol=b"\r\n")),
               Send(b"data: [DONE]\r\n\r\n")], text="xy"),
    FaultCase("pings-between-data-longer-than-idle", _pings_between_data(),
              settings={"idle": 0.5}, text="012345"),
    FaultCase("slow-first-byte-within-timeout", [Pause(0.4), *chat_stream(["ok"])],
              settings={"first_byte": 3.0}, text="ok"),
    FaultCase("503-loading-then-success", [[_LOADING], [_LOADING], chat_stream(["fine"])],
              settings={"attempts": 3}, text="fine", connections=3),
    # ----------------------------------------------------------------- timeouts
    FaultCase("stall-before-first-byte", [Stall(10)],
              settings={"first_byte": 0.4, "attempts": 3}, error=FirstByteTimeout,
              match=r"first_byte=0\.4 s", connections=1, closes=True, seconds=(0.35, 1.5)),
    FaultCase("stall-mid-stream", [SSEHeaders(), Send(event(chat_chunk("partial"))), Stall(10)],
              settings={"idle": 0.4, "attempts": 3}, error=IdleTimeout, match=r"idle=0\.4 s",
              connections=1, closes=True, seconds=(0.35, 1.5)),
    FaultCase("only-pings-longer-than-idle",
              [SSEHeaders(), Send(event(chat_chunk("a"))), *[Send(PING), Pause(0.05)] * 100],
              settings={"idle": 0.4}, error=IdleTimeout, match="keep-alive ping", closes=True,
              seconds=(0.35, 1.5)),
    # ----------------------------------------------------------------- broken streams
    FaultCase("reset-mid-stream", [SSEHeaders(), Send(event(chat_chunk("half"))), Reset()],
              settings={"attempts": 3}, error=BackendProtocolError, match="broke mid-stream",
              connections=1),
    FaultCase("close-mid-chunked-body", [SSEHeaders(), Send(event(chat_chunk("half"))), Close()],
              settings={"attempts": 3}, error=BackendProtocolError, connections=1),
    FaultCase("eof-without-finish-reason", [SSEHeaders(), Send(event(chat_chunk("half")))],
              settings={"attempts": 3}, error=BackendProtocolError, match="cut off",
              connections=1),
    FaultCase("malformed-json-event",
              [SSEHeaders(), Send(event(chat_chunk("a"))), Send(b'data: {"choices": [\n\n'),
               Stall(10)], error=BackendProtocolError, match="malformed JSON", closes=True),
    FaultCase("deeply-nested-json-event",
              [SSEHeaders(), Send(b"data: " + b"[" * 200_000 + b"\n\n")],
              error=BackendProtocolError, match="malformed JSON"),
    FaultCase("in-band-error-event",
              [SSEHeaders(), Send(event(chat_chunk("a"))), Send(event(_IN_BAND)), Stall(10)],
              error=BackendStreamError, match="slot crashed", closes=True),
    FaultCase("legacy-error-line", [SSEHeaders(), Send(_LEGACY)], error=BackendStreamError,
              match="bad grammar"),
    FaultCase("not-an-event-stream", [Respond(200, {"choices": []})], error=BackendProtocolError,
              match="not an event stream", closes=True),
    # ----------------------------------------------------------------- HTTP errors, retries
    FaultCase("4xx-not-retried", [llama_error(400, _CONTEXT, "exceed_context_size_error")],
              settings={"attempts": 3}, error=BackendHTTPError,
              match="exceeds the available context", connections=1),
    FaultCase("non-json-5xx", [Respond(502, "<html>Bad Gateway</html>", content_type="text/html")],
              settings={"attempts": 3}, error=BackendHTTPError, match="Bad Gateway",
              connections=1),
    FaultCase("503-every-time", [_LOADING], settings={"attempts": 3}, error=BackendHTTPError,
              match="Loading model", connections=3),
    FaultCase("connection-refused", settings={"attempts": 3}, error=BackendUnavailable,
              match="attempt 3/3", target="refused", seconds=(0.0, 2.0)),
    FaultCase("connect-timeout", settings={"connect": 0.3, "attempts": 2}, error=ConnectTimeout,
              match=r"connect=0\.3 s", target="unaccepting", seconds=(0.5, 3.0)),
    # ----------------------------------------------------------------- non-streamed calls
    FaultCase("chat-http-error", [llama_error(400, "bad", "invalid_request_error")], call="chat",
              settings={"attempts": 3}, error=BackendHTTPError, connections=1),
    FaultCase("chat-stall", [Stall(10)], call="chat",
              settings={"first_byte": 5.0, "non_streamed": 0.4}, error=FirstByteTimeout,
              match=r"non_streamed=0\.4 s", closes=True, seconds=(0.35, 1.5)),
    FaultCase("chat-deeply-nested-body",
              [Respond(200, b'{"choices": ' + b"[" * 200_000, content_type="application/json")],
              call="chat", error=BackendProtocolError, match="malformed JSON"),
]


@contextmanager
def fault_target(case: FaultCase) -> Iterator[tuple[str, ScriptedSSEServer | None]]:
    """Where a client meets ``case``'s fault: (base URL, the scripted server if any).

    ``refused``: a bound port nobody listens on (nobody can take it meanwhile).
    ``unaccepting``: a listener whose accept queue is full, so a connect hangs.
    """
    if case.target == "scripted":
        with ScriptedSSEServer(case.scripts) as server:
            yield server.url, server
        return
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}"
        if case.target == "refused":
            yield url, None
            return
        holder.listen(0)
        fillers = []
        try:
            for _ in range(4):  # more than the backlog holds; later ones wait in SYN_SENT
                filler = socket.socket()
                fillers.append(filler)
                filler.setblocking(False)
                filler.connect_ex(holder.getsockname())
            yield url, None
        finally:
            for filler in fillers:
                filler.close()
