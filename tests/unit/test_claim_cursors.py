"""Where each type's next claim starts (dispatcher.services.claim_cursors): pure logic;
the claims that use it run on a real database in tests/integration/test_dispatch.py."""

from __future__ import annotations

import datetime as dt
import json

from dispatcher.services.claim_cursors import ClaimCursors

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def claimed(cursors: ClaimCursors, *rows: tuple[str, int, float]) -> None:
    """Claimed rows (type, priority, run_at in seconds after T0); ids in row order."""
    cursors.claimed(
        [
            {"type": t, "priority": p, "run_at": at(s), "id": i}
            for i, (t, p, s) in enumerate(rows, 1)
        ],
        cursors.generation,
    )


def inserted(**first_run_at: float) -> str:
    """The insert trigger's payload for rows of these types first due at these times."""
    return json.dumps({t: at(s).timestamp() for t, s in first_run_at.items()})


def test_each_type_starts_at_its_best_claimed_priority_and_latest_run_at() -> None:
    cursors = ClaimCursors()
    claimed(
        cursors,
        ("a", 3, 9.0), ("b", 0, 1.0), ("a", -2, 4.0), ("a", -2, 5.0), ("a", -2, 5.0), ("a", 5, 20),
    )  # fmt: skip
    assert (cursors.hint("a"), cursors.since("a")) == (-2, (at(5.0), 5))
    assert (cursors.hint("b"), cursors.since("b")) == (0, (at(1.0), 2))
    assert (cursors.hint("c"), cursors.since("c")) == (None, None)
    claimed(cursors)  # a claim that took nothing changes nothing
    assert cursors.since("a") == (at(5.0), 5)


def test_a_row_inserted_behind_a_types_start_forgets_only_that_type() -> None:
    cursors = ClaimCursors()
    claimed(cursors, ("a", 0, 5.0), ("b", 0, 5.0))
    cursors.heard(inserted(a=5.000001, b=6.0, c=1.0))  # after since: the common case
    assert (cursors.since("a"), cursors.since("b")) == ((at(5.0), 1), (at(5.0), 2))
    cursors.heard(inserted(a=4.0, b=7.0))  # a transaction that began before the claim
    assert (cursors.since("a"), cursors.hint("a")) == (None, 0)  # any hint stays correct
    assert cursors.since("b") == (at(5.0), 2)
    cursors.heard(inserted(b=5.0))  # at since's run_at: its id may be lower
    assert cursors.since("b") is None


def test_too_many_types_or_a_strangers_payload_forget_every_type() -> None:
    for payload in ("*", "", "not json", "[1, 2]", '"a"', '{"a": "soon"}'):
        cursors = ClaimCursors()
        claimed(cursors, ("a", 0, 1.0), ("b", 0, 1.0))
        cursors.heard(payload)
        assert cursors.since("a") is None, payload
        if payload != '{"a": "soon"}':
            assert cursors.since("b") is None, payload


def test_a_claim_in_flight_when_a_row_landed_behind_does_not_set_its_start_again() -> None:
    cursors = ClaimCursors()
    claimed(cursors, ("a", 0, 5.0))
    sent_at = cursors.generation
    cursors.heard(inserted(a=4.0))  # arrives while the next claim is in flight
    cursors.claimed([{"type": "a", "priority": 0, "run_at": at(7.0), "id": 9}], sent_at)
    assert (cursors.hint("a"), cursors.since("a")) == (0, None)


def test_wake_ups_other_than_new_work_scan_every_type_from_the_start() -> None:
    cursors = ClaimCursors()
    for source in ("notify", "slot", "retry", "timer", "session", "rescue", "control"):
        claimed(cursors, ("a", 0, 1.0))
        cursors.woken({source})
        assert cursors.since("a") is not None, source
    for source in ("poll", "start", "election", "reconnect", "hand_back", "handed_back"):
        claimed(cursors, ("a", 0, 1.0))
        cursors.woken({source})
        assert cursors.since("a") is None, source
        # Whatever else woke the loop in the same pass.
        claimed(cursors, ("a", 0, 1.0))
        cursors.woken({"notify", source, "slot"})
        assert cursors.since("a") is None, source
