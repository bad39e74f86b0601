"""Assertions on what a test's code enqueued: ``assert_enqueued``, ``refute_enqueued``,
``all_enqueued``.

A job is *enqueued* while it has not started: ``pending`` (due now or later) or
``waiting`` (on its dependencies). A job matches when its type is ``type``, its
payload contains ``payload`` (a subset: every key given is there with a matching
value, recursively; lists match element by element) and each other field given
equals the row's (``priority``, ``unique_key``, ``concurrency_key``, ``max_attempts``,
``depends_on``, ``status``, ... any :class:`~dispatcher.JobRecord` field).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg

from dispatcher.core.records import JobRecord, JobStatus
from dispatcher.core.schema import DEFAULT_SCHEMA
from dispatcher.producers.client import Client
from dispatcher.producers.plans import MAX_PAGE, list_jobs_plan
from dispatcher.producers.runners import PsycopgRunner

ENQUEUED = (JobStatus.PENDING, JobStatus.WAITING)
_FIELDS = frozenset(f.name for f in dataclasses.fields(JobRecord)) - {"type", "payload"}
_SHOWN = 10  # jobs listed in a failure message

Target = Client | psycopg.Connection[Any]


def payload_matches(expected: Any, actual: Any) -> bool:
    """``expected`` is a subset of ``actual``: dicts by the keys ``expected`` names,
    lists element by element, anything else by equality."""
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and payload_matches(value, actual[key]) for key, value in expected.items()
        )
    if isinstance(expected, list | tuple):
        return (
            isinstance(actual, list | tuple)
            and len(expected) == len(actual)
            and all(payload_matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual)


def all_enqueued(
    target: Target,
    type: str | None = None,
    payload: Any = None,
    *,
    schema: str | None = None,
    **fields: Any,
) -> list[JobRecord]:
    """The enqueued jobs that match, oldest first.

    ``target``: a :class:`~dispatcher.Client`, or a psycopg connection (then ``schema``
    names the installation, default ``dispatcher``; the read joins the connection's
    transaction, so it sees jobs enqueued in it but not committed yet). ``status=``
    narrows to one status (``"pending"`` or ``"waiting"``; any other also works, e.g.
    ``"completed"`` after a drain).
    """
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise TypeError(
            f"unknown job field(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}"
        )
    statuses = [JobStatus(fields["status"])] if "status" in fields else list(ENQUEUED)
    return [
        job
        for job in _jobs(target, type, statuses, schema)
        if (payload is None or payload_matches(payload, job.payload))
        and all(getattr(job, name) == value for name, value in fields.items())
    ]


def assert_enqueued(
    target: Target,
    type: str | None = None,
    payload: Any = None,
    *,
    schema: str | None = None,
    **fields: Any,
) -> JobRecord:
    """Assert that a matching job is enqueued (see :func:`all_enqueued`); return the
    oldest. The AssertionError lists the enqueued jobs of the type instead."""
    found = all_enqueued(target, type, payload, schema=schema, **fields)
    if found:
        return found[0]
    raise AssertionError(
        f"expected a job matching {_describe(type, payload, fields)} to be enqueued; "
        + _others(target, type, schema)
    )


def refute_enqueued(
    target: Target,
    type: str | None = None,
    payload: Any = None,
    *,
    schema: str | None = None,
    **fields: Any,
) -> None:
    """Assert that no matching job is enqueued (see :func:`all_enqueued`)."""
    found = all_enqueued(target, type, payload, schema=schema, **fields)
    if found:
        shown = "\n".join(_line(job) for job in found[:_SHOWN])
        raise AssertionError(
            f"expected no job matching {_describe(type, payload, fields)} to be enqueued; "
            f"found {len(found)}:\n{shown}"
        )


def _jobs(
    target: Target, type_: str | None, statuses: list[JobStatus], schema: str | None
) -> Iterator[JobRecord]:
    """Every job of ``type_`` (None: any) in ``statuses``, oldest first."""
    page: Callable[[JobStatus, int | None], list[JobRecord]]
    if isinstance(target, Client):
        if schema is not None and schema != target.schema:
            raise ValueError(f"the client's schema is {target.schema!r}, not {schema!r}")
        client = target

        def page(status: JobStatus, before: int | None) -> list[JobRecord]:
            return client.list_jobs(status=status, type=type_, before_id=before, limit=MAX_PAGE)

    elif isinstance(target, psycopg.Connection):
        runner, conn = PsycopgRunner(schema or DEFAULT_SCHEMA), target

        def page(status: JobStatus, before: int | None) -> list[JobRecord]:
            return runner.run(conn, list_jobs_plan(status, type_, before, MAX_PAGE))

    else:
        raise TypeError(
            f"expected a dispatcher Client or a psycopg connection, got {type(target).__name__}"
        )
    found: list[JobRecord] = []
    for status in statuses:
        before: int | None = None
        while True:
            jobs = page(status, before)
            found += jobs
            if len(jobs) < MAX_PAGE:
                break
            before = jobs[-1].id
    return iter(sorted(found, key=lambda job: job.id))


def _describe(type_: str | None, payload: Any, fields: dict[str, Any]) -> str:
    parts = [f"type={type_!r}"] if type_ is not None else []
    if payload is not None:
        parts.append(f"payload={payload!r}")
    parts += [f"{name}={value!r}" for name, value in sorted(fields.items())]
    return ", ".join(parts) or "anything"


def _line(job: JobRecord) -> str:
    return f"  job {job.id} {job.type!r} {job.status.value} payload={job.payload!r}"


def _others(target: Target, type_: str | None, schema: str | None) -> str:
    enqueued = list(_jobs(target, type_, list(ENQUEUED), schema))
    what = f"of type {type_!r}" if type_ is not None else "at all"
    if not enqueued:
        return f"no job {what} is enqueued"
    shown = "\n".join(_line(job) for job in enqueued[:_SHOWN])
    more = f"\n  ... and {len(enqueued) - _SHOWN} more" if len(enqueued) > _SHOWN else ""
    return f"enqueued {what} ({len(enqueued)}):\n{shown}{more}"
