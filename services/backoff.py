"""Reconnect delays: exponential growth with full jitter, so a fleet that lost the same peer
does not come back in lock-step (AWS "Exponential Backoff And Jitter"; Twisted's backoffPolicy)."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    def __init__(
        self,
        initial: float = 0.2,
        maximum: float = 10.0,
        factor: float = 2.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self._initial = initial
        self._maximum = maximum
        self._factor = factor
        self._rand = rand
        self.attempts = 0

    def next_delay(self) -> float:
        """Delay before the next attempt: uniform in [initial/2, cap] where cap grows per failure."""
        cap = min(self._maximum, self._initial * self._factor**self.attempts)
        self.attempts += 1
        low = self._initial / 2
        return low + (cap - low) * self._rand()

    def reset(self) -> None:
        self.attempts = 0
