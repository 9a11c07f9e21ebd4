"""A clock that moves only when the test moves it."""

from __future__ import annotations


class FakeClock:
    """Time standing still at :attr:`now` until the test changes it.

    It is a ``clock()`` callable, for code that takes one (the chunk builder, the session
    store), and has ``monotonic()``, to stand in for the ``time`` module where code calls
    ``time.monotonic()`` (the dedupe cache and client limits).
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now
