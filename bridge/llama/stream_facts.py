"""What a streamed answer can tell about itself, the same for the blocking and the asyncio
stream: where it went, when its bytes came, what its decoder counted."""

from __future__ import annotations

from bridge.llama.decoding import StreamDecoder
from bridge.llama.http import CallInfo
from bridge.protocol.messages import Usage


class StreamFacts:
    """Read-only facts of one streamed call, from its :class:`CallInfo` and its
    :class:`StreamDecoder`; :class:`~bridge.llama.stream.Stream` and
    :class:`~bridge.llama.async_stream.AsyncStream` build on it."""

    _info: CallInfo
    _decoder: StreamDecoder

    @property
    def url(self) -> str:
        """The URL this stream requests."""
        return self._info.url

    @property
    def attempts(self) -> int:
        """Connection attempts made so far (retries before the first byte included)."""
        return self._info.attempts

    @property
    def started_at(self) -> float:
        """``time.monotonic()`` when the stream object was created."""
        return self._info.started_at

    @property
    def first_byte_at(self) -> float | None:
        """``time.monotonic()`` when llama-server's response headers arrived."""
        return self._info.first_byte_at

    @property
    def idle(self) -> float:
        """The idle timeout in seconds."""
        return self._decoder.idle

    @property
    def pings(self) -> int:
        """Keep-alive comment frames received (for diagnostics)."""
        return self._decoder.pings

    @property
    def events(self) -> int:
        """Data events received (the idle timeout restarts with each)."""
        return self._decoder.events

    @property
    def first_delta_at(self) -> float | None:
        """``time.monotonic()`` of the first text/reasoning/tool delta."""
        return self._decoder.first_delta_at

    @property
    def token_events(self) -> int:
        """Data events that carried generated text, reasoning or a tool call and were
        handed on: one per token as llama-server streams (see :meth:`usage_so_far`)."""
        return self._decoder.token_events

    def usage_so_far(self) -> Usage:
        """The usage of what was generated until now, also for a stream that never ended
        (see :meth:`bridge.llama.decoding.StreamDecoder.usage_so_far`)."""
        return self._decoder.usage_so_far()
