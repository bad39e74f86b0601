"""Per-type rate limits as sliding windows of start times (leader mode).

Only the leader claims, so its own record of starts is the cluster's. A new leader
seeds its windows from the table (starts within the last window, recent_starts), so
a hand-over never resets a budget. Pure bookkeeping on the monotonic clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from dispatcher.core.app import RateLimit


class RateWindows:
    """Starts per type within each type's window."""

    def __init__(self, limits: dict[str, RateLimit]) -> None:
        self.limits = limits
        self._starts: dict[str, deque[float]] = {t: deque() for t in limits}

    def seed(self, starts: Iterable[tuple[str, float]], now: float | None = None) -> None:
        """Replace the windows with starts that happened ``ago`` seconds before now."""
        now = time.monotonic() if now is None else now
        for window in self._starts.values():
            window.clear()
        for type_, ago in sorted(starts, key=lambda s: -s[1]):
            if type_ in self._starts:
                self._starts[type_].append(now - ago)

    def budget(self, type_: str, now: float | None = None) -> int | None:
        """Starts still allowed now (None: the type has no rate limit)."""
        limit = self.limits.get(type_)
        if limit is None:
            return None
        now = time.monotonic() if now is None else now
        window = self._starts[type_]
        while window and window[0] <= now - limit.per:
            window.popleft()
        return max(0, limit.starts - len(window))

    def record(self, type_: str, count: int, now: float | None = None) -> None:
        if type_ in self._starts and count:
            now = time.monotonic() if now is None else now
            self._starts[type_].extend([now] * count)

    def next_opening(self, type_: str) -> float | None:
        """Monotonic time when the next start of an exhausted type is allowed."""
        limit = self.limits.get(type_)
        window = self._starts.get(type_)
        if limit is None or not window or len(window) < limit.starts:
            return None
        return window[0] + limit.per
