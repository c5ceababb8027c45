"""One exponential backoff for every retry loop (sources, storage, refused publishes, restarts).

Delays double from ``minimum`` up to ``maximum``; an optional jitter spreads
clients that failed together (a broker restart) so they do not come back in
lockstep. Jitter only shortens a delay (by a random fraction up to ``jitter``),
so ``maximum`` stays a hard bound: what a caller promises about recovery time
holds for every draw. Deadlines are on the monotonic clock: a wall-clock step (NTP at boot
on a Jetson without a real-time clock) neither stalls nor skips a retry.
"""

from __future__ import annotations

import random
import time


class Backoff:
    """``next()`` gives the next delay; ``reset()`` after a success starts again from ``minimum``."""

    def __init__(self, minimum: float, maximum: float, jitter: float = 0.0):
        if not 0 < minimum <= maximum:
            raise ValueError("backoff needs 0 < minimum <= maximum")
        if not 0 <= jitter < 1:
            raise ValueError("backoff jitter must be in [0, 1)")
        self.minimum = minimum
        self.maximum = maximum
        self.jitter = jitter
        self.failures = 0
        self.retry_at = 0.0

    def next(self) -> float:
        """Count one more failure; the delay before the next try (also set as ``retry_at``)."""
        delay = min(self.minimum * 2 ** self.failures, self.maximum)
        self.failures += 1
        if self.jitter:
            delay *= 1 - random.uniform(0, self.jitter)
        self.retry_at = time.monotonic() + delay
        return delay

    def reset(self) -> None:
        self.failures = 0
        self.retry_at = 0.0

    @property
    def due(self) -> bool:
        """True when the delay after the last failure has passed (or there was none)."""
        return time.monotonic() >= self.retry_at

    @property
    def current(self) -> float:
        """The delay the last failure set, for log lines (0 before any failure)."""
        return min(self.minimum * 2 ** max(self.failures - 1, 0), self.maximum) if self.failures else 0.0
