"""Rows other services could insert with plain SQL that can never run, each with the
named constraint that refuses it (migration 0005). Used by the integration and chaos
tests of hostile input."""

from __future__ import annotations

# (what, columns, values SQL, the constraint that refuses it)
REFUSED_ROWS = [
    ("attempts at the integer limit (the claim's +1 overflowed)", "type, attempts",
     "'h.ok', 2147483647", "attempts_must_stay_within_10000"),
    ("a pending job with no attempt left", "type, attempts", "'h.ok', 10000",
     "attempts_must_stay_within_10000"),
    ("max_attempts at the integer limit", "type, max_attempts", "'h.ok', 2147483647",
     "max_attempts_must_be_at_most_10000"),
    ("run_at -infinity (every claim failed)", "type, run_at", "'h.ok', '-infinity'",
     "run_at_must_be_finite"),
    ("run_at infinity (next_due_in and queue_depth failed)", "type, run_at",
     "'h.ok', 'infinity'", "run_at_must_be_finite"),
    ("processing without a heartbeat (never rescued)", "type, status, owner",
     "'h.one', 'processing', 'ghost'", "processing_jobs_must_have_an_owner_and_a_heartbeat"),
    ("processing without an owner", "type, status, heartbeat_at",
     "'h.one', 'processing', now()", "processing_jobs_must_have_an_owner_and_a_heartbeat"),
    ("a payload of 2 MB (loaded into claim batches)", "type, payload",
     "'h.ok', jsonb_build_object('blob', repeat('x', 2 * 1024 * 1024))",
     "payload_must_fit_max_payload_bytes"),
]  # fmt: skip
