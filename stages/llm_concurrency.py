"""Requests in flight to the LLM, adapted to what the server can take (additive increase, multiplicative
decrease, as TCP's congestion window does).

Why: a llama.cpp server with one slot queues every request beyond the first. Sending `llm.concurrency`
requests at once then makes the later ones wait past the read timeout, and retrying them only lengthens
the queue. A timeout or a 429 is the server saying "busy", not "down": halve the requests in flight; each
success grows the limit by 1/limit, so a full window of successes adds one slot back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ConcurrencySnapshot:
    """What `status` shows: the limit in use, the configured maximum, requests in flight, and why."""

    limit: int
    maximum: int
    in_flight: int
    reason: str


class AdaptiveConcurrency:
    """A semaphore whose size moves between 1 and `maximum`.

    `acquire` returns the time the request started; pass it back to `congestion` so that requests already
    in flight when the limit was last cut do not cut it again (one decrease per window, as in TCP).
    """

    def __init__(self, maximum: int, clock: Callable[[], float] = time.monotonic) -> None:
        if maximum < 1:
            raise ValueError("maximum must be >= 1")
        self.maximum = maximum
        self.clock = clock
        self._limit = float(maximum)
        self._in_flight = 0
        self._last_decrease = float("-inf")
        self._cause = ""
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        with self._cond:
            return int(self._limit)

    def acquire(self) -> float:
        """Wait for a free slot; returns the request's start time (a token for `congestion`)."""
        with self._cond:
            while self._in_flight >= int(self._limit):
                self._cond.wait()
            self._in_flight += 1
            return self.clock()

    def release(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify()

    def success(self) -> None:
        """The server answered in time: grow by 1/limit (one slot per window of successes)."""
        with self._cond:
            if self._limit >= self.maximum:
                return
            before = int(self._limit)
            self._limit = min(float(self.maximum), self._limit + 1.0 / self._limit)
            if int(self._limit) > before:
                self._cond.notify_all()

    def congestion(self, started: float, cause: str) -> bool:
        """The server was too busy (read timeout, 429): halve the limit, at most once per window.

        Returns True when the limit was cut."""
        with self._cond:
            if started < self._last_decrease:
                return False  # sent before the last cut: that cut already accounted for it
            self._last_decrease = self.clock()
            before = int(self._limit)
            self._limit = max(1.0, self._limit / 2.0)
            self._cause = f"halved from {before} after {cause} at {time.strftime('%H:%M:%S')}"
            return True

    def snapshot(self) -> ConcurrencySnapshot:
        with self._cond:
            limit = int(self._limit)
            if limit >= self.maximum:
                reason = "configured maximum (llm.concurrency)"
            else:
                reason = f"{self._cause}; +1 per window of successful replies"
            return ConcurrencySnapshot(limit, self.maximum, self._in_flight, reason)
