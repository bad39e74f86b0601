"""Retry policy: exponential backoff with full jitter.

The delay before retry n (after the n-th failed attempt) is uniform in
``[0, min(cap, base * 2**(n-1))]``. Full jitter spreads a burst of failures (a
downstream outage) over the window instead of retrying them in lockstep.
Bottom layer: no package imports.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """``base`` and ``cap`` in seconds."""

    base: float = 2.0
    cap: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("base", "cap"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"RetryPolicy.{name} must be a positive number, got {value!r}")
        if self.cap < self.base:
            raise ValueError(f"RetryPolicy.cap ({self.cap}) must be >= base ({self.base})")

    def ceiling(self, failed_attempt: int) -> float:
        """The largest delay after the ``failed_attempt``-th failure (1-based)."""
        exponent = min(max(failed_attempt, 1) - 1, 62)
        return min(self.cap, self.base * 2.0**exponent)

    def delay(self, failed_attempt: int, rng: random.Random | None = None) -> float:
        """A random delay in ``[0, ceiling(failed_attempt)]``."""
        return (rng or random).uniform(0.0, self.ceiling(failed_attempt))
