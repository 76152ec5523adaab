"""A clock for tests: epoch seconds that move only when a test moves them."""

from __future__ import annotations

START = 1_700_000_000.0


class FakeClock:
    """Call it for the time; :meth:`advance` (or :meth:`wait`, which records) moves it."""

    def __init__(self, now: float = START) -> None:
        self.now = now
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, seconds: float) -> bool:
        """A stand-in for ``Event.wait``: the time passes at once; never woken early."""
        self.waits.append(seconds)
        self.now += seconds
        return False
