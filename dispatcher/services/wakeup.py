"""When the claim loop should look for work next, and why.

Several parties wake the claim loop: notifications (new jobs, control changes, a
reconnect), freed slots, retries coming due, the earliest future ``run_at``. They
all talk to one :class:`Wakeup`, built before any of them, so none needs a reference
to the dispatcher itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

from dispatcher.core.cancellation import wait_for_event


class Woken(NamedTuple):
    """Why the claim loop woke: the last reason given (one per pass, for the wake-ups
    metric) and every reason given since it last woke (what the pass must honour: a
    control notification followed by a freed slot still re-reads the paused types)."""

    source: str
    sources: frozenset[str]


class Wakeup:
    """A wake-up event with its reason, and a timer for the next known due time."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._source = "start"
        self._sources: set[str] = set()
        self._due_at: float | None = None  # monotonic
        # Set by the claim loop while its last claim was cut short by capacity: only
        # then is a freed slot worth a claim.
        self.wanted_slots = False

    def wake(self, source: str) -> None:
        """Look for work now."""
        self._source = source
        self._sources.add(source)
        self._event.set()

    def slot_freed(self) -> None:
        """A slot came free: worth a claim only if the last one left jobs behind."""
        if self.wanted_slots:
            self.wake("slot")

    def due_at(self, at: float) -> None:
        """Something becomes claimable at monotonic time ``at`` (kept if earlier)."""
        if self._due_at is None or at < self._due_at:
            self._due_at = at

    def retry_at(self, at: float) -> None:
        """A retry was scheduled for ``at``: be awake then, not at the next poll."""
        earlier = self._due_at is None or at < self._due_at
        self.due_at(at)
        if earlier:
            # Wake now so the loop re-arms its timer for the earlier time.
            self.wake("retry")

    def forget_due(self) -> None:
        self._due_at = None

    @property
    def next_due(self) -> float | None:
        return self._due_at

    async def wait(self, poll_interval: float) -> Woken:
        """Wait for a wake-up, the due time or ``poll_interval``; return the reasons.

        A due time that has passed is consumed (the pass that follows sets the next)."""
        timeout = poll_interval
        if self._due_at is not None:
            timeout = max(0.0, min(timeout, self._due_at - time.monotonic()))
        if await wait_for_event(self._event, timeout):
            woken = Woken(self._source, frozenset(self._sources))
        else:
            due = self._due_at is not None and self._due_at <= time.monotonic()
            source = "timer" if due else "poll"
            woken = Woken(source, frozenset({source}))
        if self._due_at is not None and self._due_at <= time.monotonic():
            self._due_at = None
        self._event.clear()
        self._sources.clear()
        return woken
