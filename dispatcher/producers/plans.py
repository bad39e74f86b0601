"""What the sync and async clients share: every producer operation, as a plan.

A plan is a generator that yields the statements to run (a named query with its
arguments, or rows to COPY) and receives their rows back. It holds all the logic
(argument checks, the unique-key retry loop, error messages); a client only drives
it through its driver, psycopg or asyncpg. So both clients behave identically and
neither repeats the other.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Unpack

from dispatcher.core.errors import (
    DispatcherError,
    InvalidArgument,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
    QueueFull,
)
from dispatcher.core.records import (
    BulkOptions,
    JobRecord,
    JobStatus,
    NewJob,
    encode_json,
    new_job_values,
)
from dispatcher.core.tracing import sending

T = TypeVar("T")

# insert_job_unique returns nothing when the conflicting job finished between our
# INSERT and our look; trying again then inserts. Several misses in a row mean the
# key is being hammered by jobs that finish instantly: say so rather than spin.
UNIQUE_INSERT_TRIES = 5

# Column order of the copy_jobs query (and of asyncpg's copy_records_to_table), and of
# copy_jobs_lean, for jobs that take every other column's default.
COPY_COLUMNS = (
    "id", "type", "payload", "priority", "max_attempts", "run_at", "timeout", "trace_context"
)  # fmt: skip
LEAN_COPY_COLUMNS = ("id", "type", "payload")

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Run:
    """Run the named query with these arguments; the plan receives its rows."""

    query: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class CopyRows:
    """COPY these rows into the jobs table (COPY_COLUMNS order, or LEAN_COPY_COLUMNS
    when ``lean``); receives no rows."""

    rows: Iterable[tuple[Any, ...]]
    lean: bool = False


Step = Run | CopyRows
Plan = Generator[Step, Sequence[Row], T]


@dataclass(frozen=True)
class BulkJobs:
    """Validated arguments of enqueue_many: one type and options, many payloads."""

    type: str
    payloads: list[str]
    priority: int
    max_attempts: int | None
    run_at: dt.datetime | None
    run_in: dt.timedelta | None
    timeout: float | None
    unique_keys: list[str] | None

    @property
    def is_lean(self) -> bool:
        """Every column but type and payload takes its default (run_at: now())."""
        return (
            self.priority == 0
            and self.max_attempts is None
            and self.timeout is None
            and self.run_at is None
            and self.run_in is None
        )


def prepare_bulk(type: str, payloads: Iterable[Any], **bulk: Unpack[BulkOptions]) -> BulkJobs:
    """Check enqueue_many's arguments once and encode every payload."""
    unknown = set(bulk) - BulkOptions.__optional_keys__
    if unknown:
        known = ", ".join(sorted(BulkOptions.__optional_keys__))
        raise InvalidJob(
            f"unknown enqueue_many option {', '.join(sorted(unknown))}; known: {known}"
        )
    options = new_job_values(
        type,
        None,
        priority=bulk.get("priority", 0),
        run_at=bulk.get("run_at"),
        max_attempts=bulk.get("max_attempts"),
        timeout=bulk.get("timeout"),
    )
    unique_keys = bulk.get("unique_keys")
    encoded = _encode_payloads(payloads)
    keys: list[str] | None = None
    if unique_keys is not None:
        keys = list(unique_keys)
        if len(keys) != len(encoded):
            raise InvalidJob(
                f"unique_keys has {len(keys)} entries but there are {len(encoded)} payloads"
            )
        for i, key in enumerate(keys):
            if not isinstance(key, str) or not key or "\x00" in key:
                raise InvalidJob(f"unique_keys[{i}] must be a non-empty string without NUL")
        if options.run_in is not None:
            raise InvalidJob("enqueue_many with unique_keys takes an absolute run_at, not a delay")
    return BulkJobs(
        type=options.type,
        payloads=encoded,
        priority=options.priority,
        max_attempts=options.max_attempts,
        run_at=options.run_at,
        run_in=options.run_in,
        timeout=options.timeout,
        unique_keys=keys,
    )


def _encode_payloads(payloads: Iterable[Any]) -> list[str]:
    encoded = []
    try:
        for payload in payloads:
            encoded.append(encode_json({} if payload is None else payload, what="payload"))
    except InvalidJob as exc:  # name the culprit only when there is one
        raise InvalidJob(str(exc).replace("payload", f"payload #{len(encoded)}", 1)) from None
    return encoded


# --- plans ------------------------------------------------------------------------
# Each enqueue runs inside its producer span (dispatcher.core.tracing.sending: a no-op
# unless a span is current), and stores the span's context with its jobs.


def enqueue_plan(job: NewJob) -> Plan[JobRecord]:
    with sending(job.type) as send:
        record = yield from _enqueue(job, send.carrier)
        send.sent(record.id)
    return record


def _enqueue(job: NewJob, trace_context: str | None) -> Plan[JobRecord]:
    if job.unique_key is None:
        rows = yield Run("insert_job", job.insert_args(trace_context))
        if not rows:
            raise (yield from _queue_full(job.type))
        if job.depends_on is not None:
            # A trigger settled the row after it was returned: waiting, pending, or
            # ended at once (a dependency failed).
            rows = yield Run("get_job", (rows[0]["id"],))
        return JobRecord.from_row(rows[0])
    if job.cache_ttl is not None:
        cached = yield Run("cached_job", (job.type, job.unique_key, job.cache_ttl))
        if cached:
            return JobRecord.from_row(cached[0])
    for _ in range(UNIQUE_INSERT_TRIES):
        rows = yield Run("insert_job_unique", job.insert_args(trace_context))
        if rows:
            return JobRecord.from_row(rows[0])
        full = yield Run("queue_full", (job.type,))
        if full:
            raise queue_full_error(job.type, full[0])
    raise _unique_retry_exhausted(job.type, job.unique_key)


# Producers refused for backpressure are told to come back after about this long: the
# leader re-counts pending jobs (and reopens the queue) on that rhythm.
RETRY_AFTER_FULL = 5.0


def _queue_full(type: str) -> Plan[DispatcherError]:
    rows = yield Run("queue_full", (type,))
    if not rows:  # reopened between our insert and our look
        return DispatcherError(f"the {type!r} queue refused the job; try again")
    return queue_full_error(type, rows[0])


def queue_full_error(type: str, row: Row) -> QueueFull:
    return QueueFull(
        f"the {type!r} queue is full: about {row['pending']} jobs pending, max_pending "
        f"{row['max_pending']}; try again in a few seconds",
        retry_after=RETRY_AFTER_FULL,
    )


def enqueue_many_plan(bulk: BulkJobs) -> Plan[list[int]]:
    if not bulk.payloads:
        return []
    with sending(bulk.type, len(bulk.payloads)) as send:
        return (yield from _enqueue_many(bulk, send.carrier))


def _enqueue_many(bulk: BulkJobs, trace_context: str | None) -> Plan[list[int]]:
    if bulk.unique_keys is None:
        reserved = (
            yield Run("reserve_job_ids", (len(bulk.payloads), bulk.run_at, bulk.run_in, bulk.type))
        )[0]
        if reserved["max_pending"] is not None:
            raise queue_full_error(bulk.type, reserved)
        ids: list[int] = list(reserved["ids"])
        if bulk.is_lean and trace_context is None:
            # Fewer columns to format and parse: the defaults are the database's.
            yield CopyRows(zip(ids, [bulk.type] * len(ids), bulk.payloads, strict=True), lean=True)
        else:
            run_at = reserved["run_at"]
            yield CopyRows(
                (job_id, bulk.type, payload, bulk.priority, bulk.max_attempts, run_at,
                 bulk.timeout, trace_context)
                for job_id, payload in zip(ids, bulk.payloads, strict=True)
            )  # fmt: skip
        return ids
    full = yield Run("queue_full", (bulk.type,))
    if full:
        raise queue_full_error(bulk.type, full[0])
    keys = bulk.unique_keys
    n = len(keys)
    arrays = (
        [bulk.type] * n,
        bulk.payloads,
        [bulk.priority] * n,
        [bulk.max_attempts] * n,
        [bulk.run_at] * n,
        [bulk.timeout] * n,
        keys,
        trace_context,
    )
    found: dict[str, int] = {}
    for _ in range(UNIQUE_INSERT_TRIES):
        inserted = yield Run("insert_jobs_unique_many", arrays)
        found = {row["unique_key"]: row["id"] for row in inserted}
        missing = sorted({k for k in keys if k not in found})
        if missing:
            existing = yield Run("active_ids_by_unique_key", ([bulk.type] * len(missing), missing))
            found.update({row["unique_key"]: row["id"] for row in existing})
        if all(key in found for key in keys):
            return [found[key] for key in keys]
    raise _unique_retry_exhausted(bulk.type, next(k for k in keys if k not in found))


def get_plan(job_id: int) -> Plan[JobRecord]:
    rows = yield Run("get_job", (job_id,))
    return _record_or_not_found(rows, job_id)


def cancel_plan(job_id: int) -> Plan[JobRecord]:
    rows = yield Run("cancel_job", (job_id,))
    if rows:
        return JobRecord.from_row(rows[0])
    job = _record_or_not_found((yield Run("get_job", (job_id,))), job_id)
    raise _transition_refused(job, "cancel", "waiting, pending or processing")


def retry_plan(job_id: int) -> Plan[JobRecord]:
    rows = yield Run("retry_job", (job_id,))
    if rows and rows[0]["depends_on"]:
        # Settled by a trigger after the row was returned (see retry_job).
        rows = yield Run("get_job", (job_id,))
    if rows:
        return JobRecord.from_row(rows[0])
    job = _record_or_not_found((yield Run("get_job", (job_id,))), job_id)
    raise _transition_refused(job, "retry", "failed or cancelled")


MAX_PAGE = 1000
RETRY_BATCH = 1000


def retry_many_plan(status: str = "failed", type: str | None = None) -> Plan[int]:
    """Retry every job of ``status`` (failed or cancelled), optionally of one type."""
    if status not in ("failed", "cancelled"):
        raise InvalidArgument(f"bulk retry takes failed or cancelled jobs, not {status!r}")
    total = 0
    while True:
        rows = yield Run("retry_jobs", ([status], type, RETRY_BATCH))
        total += len(rows)
        if len(rows) < RETRY_BATCH:
            return total


def set_paused_plan(type: str, paused: bool) -> Plan[JobType]:
    if not isinstance(type, str) or not type.strip():
        raise InvalidArgument("type must be a non-empty string")
    rows = yield Run("set_paused", (type, paused))
    return _job_type(rows[0])


def job_types_plan() -> Plan[list[JobType]]:
    rows = yield Run("list_job_types")
    return [_job_type(row) for row in rows]


def list_jobs_plan(
    status: str | None = None,
    type: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> Plan[list[JobRecord]]:
    if status is not None and status not in JobStatus.__members__.values():
        known = ", ".join(s.value for s in JobStatus)
        raise InvalidArgument(f"unknown status {status!r}; expected one of {known}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument(f"limit must be an integer from 1 to {MAX_PAGE}, got {limit!r}")
    rows = yield Run("list_jobs", (status, type, before_id, limit))
    return [JobRecord.from_row(row) for row in rows]


@dataclass(frozen=True)
class JobType:
    """A job type's cluster-wide controls (the job_types table)."""

    type: str
    paused: bool
    max_pending: int | None
    accepting: bool
    pending: int | None


def _job_type(row: Row) -> JobType:
    return JobType(row["type"], row["paused"], row["max_pending"], row["accepting"], row["pending"])


@dataclass(frozen=True)
class QueueDepth:
    """One job type's queue: pending due now, pending later, processing."""

    ready: int
    scheduled: int
    processing: int
    oldest_ready_age: float


@dataclass(frozen=True)
class ClusterStatus:
    """The leader lease, the replicas, and the queue per type, as the database sees them."""

    leader: dict[str, Any] | None
    replicas: list[dict[str, Any]]
    queues: dict[str, QueueDepth]
    schedules: list[dict[str, Any]]
    types: list[JobType]


def cluster_status_plan(alive_within: float) -> Plan[ClusterStatus]:
    """``alive_within``: seconds since a replica's last heartbeat to count it alive."""
    leader_rows = yield Run("leader_current")
    replica_rows = yield Run("replicas_list", (alive_within,))
    queue_rows = yield Run("queue_depth")
    schedule_rows = yield Run("list_schedules")
    type_rows = yield Run("list_job_types")
    leader = dict(leader_rows[0]) if leader_rows and leader_rows[0]["holder"] else None
    current = leader["holder"] if leader and leader["lease_current"] else None
    # A replica's own role column lags (a killed leader cannot update it): the lease
    # row is the truth.
    replicas = [
        {**row, "role": "leader" if row["id"] == current else "standby"} for row in replica_rows
    ]
    return ClusterStatus(
        leader=leader,
        replicas=replicas,
        queues={
            row["type"]: QueueDepth(
                row["ready"], row["scheduled"], row["processing"], row["oldest_ready_age"]
            )
            for row in queue_rows
        },
        schedules=[dict(row) for row in schedule_rows],
        types=[_job_type(row) for row in type_rows],
    )


# --- messages ---------------------------------------------------------------------

# What migration 0013's triggers refuse of a job's dependencies (the constraint names
# they raise with): unknown ids, or ids not lower than the job's own.
DEPENDENCY_REFUSALS = frozenset(
    {"depends_on_must_name_existing_jobs", "depends_on_must_name_earlier_jobs"}
)


def refused_job(constraint: str | None, message: str) -> InvalidJob | None:
    """The InvalidJob a client raises for a database error with ``constraint`` (a job
    the database refused for its dependencies), or None: not ours to translate."""
    return InvalidJob(message) if constraint in DEPENDENCY_REFUSALS else None


def _unique_retry_exhausted(type: str, unique_key: str) -> DispatcherError:
    return DispatcherError(
        f"could not enqueue {type!r} with unique_key {unique_key!r}: the active job with that "
        f"key finished {UNIQUE_INSERT_TRIES} times while we looked; try again"
    )


def _record_or_not_found(rows: Sequence[Row], job_id: int) -> JobRecord:
    if not rows:
        raise JobNotFound(job_id)
    return JobRecord.from_row(rows[0])


def _transition_refused(job: JobRecord, action: str, allowed: str) -> InvalidTransition:
    """E.g. "cannot retry job 7: it is completed; retry applies to failed or cancelled jobs"."""
    return InvalidTransition(
        f"cannot {action} job {job.id}: it is {job.status.value}; {action} applies to "
        f"{allowed} jobs"
    )
