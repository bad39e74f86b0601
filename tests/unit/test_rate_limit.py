"""Sliding-window rate limits (pure bookkeeping)."""

from __future__ import annotations

from dispatcher.core.app import RateLimit
from dispatcher.services.rate_limit import RateWindows


def test_budget_shrinks_with_starts_and_recovers_as_they_age_out() -> None:
    windows = RateWindows({"email": RateLimit(starts=3, per=10.0)})
    assert windows.budget("email", now=100.0) == 3
    windows.record("email", 2, now=100.0)
    windows.record("email", 1, now=104.0)
    assert windows.budget("email", now=105.0) == 0
    assert windows.next_opening("email") == 110.0
    assert windows.budget("email", now=110.0) == 2  # the two starts at 100 aged out
    assert windows.budget("email", now=114.0) == 3
    assert windows.budget("other", now=100.0) is None


def test_a_new_leader_seeds_its_windows_from_recent_starts() -> None:
    windows = RateWindows({"email": RateLimit(starts=5, per=60.0)})
    windows.seed([("email", 10.0), ("email", 50.0), ("email", 59.0), ("ignored", 1.0)], now=1000)
    assert windows.budget("email", now=1000) == 2
    assert windows.budget("email", now=1001.5) == 3  # the start 59 s ago aged out
