"""Backoff, and the retry-or-fail decision: the only places either is computed.

Exponential backoff with full jitter: after the n-th consecutive failure the delay is
uniform in ``[0, min(cap, base * 2**(n-1))]``. Full jitter spreads a burst of failures
(a downstream outage, a database restart) over the window instead of retrying them in
lockstep. Jobs use it through :class:`RetryPolicy`; the replica's own loops (claims,
completion writes, reconnects, restarted services) through :func:`backoff_delay`.
Bottom layer: no package imports.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


def backoff_ceiling(failures: int, base: float, cap: float) -> float:
    """The largest delay after ``failures`` consecutive failures (1-based)."""
    exponent = min(max(failures, 1) - 1, 62)
    return min(cap, base * 2.0**exponent)


def backoff_delay(
    failures: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """A random delay in ``[0, backoff_ceiling(failures, base, cap)]``."""
    return (rng or random).uniform(0.0, backoff_ceiling(failures, base, cap))


@dataclass(frozen=True)
class RetryPolicy:
    """A job type's backoff between attempts; ``base`` and ``cap`` in seconds."""

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
        return backoff_ceiling(failed_attempt, self.base, self.cap)

    def delay(self, failed_attempt: int, rng: random.Random | None = None) -> float:
        """A random delay in ``[0, ceiling(failed_attempt)]``."""
        return backoff_delay(failed_attempt, self.base, self.cap, rng)

    def after_failure(self, attempt: int, max_attempts: int) -> float | None:
        """Attempt ``attempt`` of ``max_attempts`` failed: the delay before the next
        one, or None when it was the last (the job fails for good)."""
        if attempt >= max_attempts:
            return None
        return self.delay(attempt)
