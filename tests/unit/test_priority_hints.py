"""The claim's priority hints: per type, the best priority a claim took."""

from __future__ import annotations

from dispatcher.services.dispatch import best_priorities


def test_the_hint_is_each_types_best_claimed_priority() -> None:
    rows = [
        {"type": "a", "priority": 3},
        {"type": "b", "priority": 0},
        {"type": "a", "priority": -2},
        {"type": "a", "priority": 5},
    ]
    assert best_priorities(rows) == {"a": -2, "b": 0}


def test_a_claim_that_took_nothing_gives_no_hint() -> None:
    assert best_priorities([]) == {}
