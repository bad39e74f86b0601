"""Rows other services could insert with plain SQL that can never run, each with the
named constraint that refuses it (migrations 0005, 0013 and 0014). Used by the integration and
chaos tests of hostile input."""

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

# The same for rows with dependencies (migration 0013; the columns exist from there).
REFUSED_DEPENDENCY_ROWS = [
    ("waiting with nothing to wait for (never made pending)", "type, status",
     "'h.ok', 'waiting'", "waiting_jobs_must_have_dependencies"),
    ("waiting with no attempt left (its release would fail)", "type, status, depends_on, attempts",
     "'h.ok', 'waiting', '{1}', 10000", "waiting_jobs_must_be_able_to_run"),
    ("a NULL dependency", "type, depends_on", "'h.ok', '{NULL}'",
     "depends_on_must_be_a_list_of_at_most_10000_job_ids"),
    ("dependencies as a matrix", "type, depends_on", "'h.ok', '{{1},{2}}'",
     "depends_on_must_be_a_list_of_at_most_10000_job_ids"),
    ("dependencies and a unique key (a waiting job holds none)", "type, depends_on, unique_key",
     "'h.ok', '{1}', 'k'", "jobs_with_dependencies_cannot_have_a_unique_key"),
    ("an unknown on_dependency_failure", "type, depends_on, on_dependency_failure",
     "'h.ok', '{1}', 'ignore'", "on_dependency_failure_must_be_fail_or_cancel"),
    ("inserted processing with dependencies", "type, status, owner, heartbeat_at, depends_on",
     "'h.ok', 'processing', 'ghost', now(), '{1}'",
     "jobs_with_dependencies_start_pending_or_waiting"),
    ("10,001 dependencies", "type, depends_on", "'h.ok', array_fill(1::bigint, ARRAY[10001])",
     "depends_on_must_be_a_list_of_at_most_10000_job_ids"),
]  # fmt: skip

# The same for trace contexts that could never be a carrier (migration 0014). Carriers
# that pass (a garbage traceparent, values that are not strings) are ignored by the
# executor instead: tests/integration/test_tracing.py.
REFUSED_TRACE_CONTEXT_ROWS = [
    ("a trace context that is not an object", "type, trace_context",
     """'h.ok', '"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"'""",
     "trace_context_must_be_an_object_of_at_most_4kb"),
    ("a trace context of 5 KB", "type, trace_context",
     "'h.ok', jsonb_build_object('traceparent', repeat('x', 5000))",
     "trace_context_must_be_an_object_of_at_most_4kb"),
]  # fmt: skip
