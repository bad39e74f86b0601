"""What a job is to producers: its statuses, its row, and the checks on a new job.

Bottom layer: imports only errors. Both clients, the HTTP API and the CLI build job
rows through :func:`new_job_values`, so a bad job is refused the same way everywhere,
before it reaches the database.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import json.encoder
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack, cast

from dispatcher.core.errors import InvalidJob

MAX_TYPE_LENGTH = 200
SMALLINT_MIN, SMALLINT_MAX = -32768, 32767
# The most attempts a job may have (the CHECK constraints of migration 0005 say so too:
# a claim adds one, and must never overflow).
MAX_ATTEMPTS = 10_000
# The most dependencies a job may have (migration 0013's insert trigger says so too),
# and the largest job id.
MAX_DEPENDENCIES = 10_000
BIGINT_MAX = 2**63 - 1
DEPENDENCY_FAILURE_OUTCOMES = ("fail", "cancel")


class JobStatus(enum.StrEnum):
    """The life of a job: pending → processing → completed | failed | cancelled; a job
    with dependencies is waiting (never claimed) until they all completed."""

    WAITING = "waiting"
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


# One encoder for all: json.dumps builds a new encoder per call when given options.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)


def _c_encoder() -> Callable[[Any, int], Sequence[str]] | None:
    """The C encoder behind _ENCODER, built once: JSONEncoder.encode builds it anew on
    every call, which was two thirds of encoding a small payload (enqueue_many of
    100,000: 370 -> 120 ms). Without circular-reference markers it keeps no state, so
    threads share it; a circular value then ends in RecursionError, as deep nesting
    does. None where the C accelerator is missing: _ENCODER is used."""
    # Not in the typeshed stubs, but json.encoder's own since Python 2.6.
    make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:
        return None
    encoder: Callable[[Any, int], Sequence[str]] = make_encoder(
        None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False,
        False,
    )  # fmt: skip
    return encoder


_C_ENCODER = _c_encoder()


def encode_json(value: Any, *, what: str) -> str:
    """JSON text Postgres' jsonb accepts, or InvalidJob naming ``what`` and the reason.

    Refuses NaN/Infinity (not JSON), NUL characters (jsonb cannot store them), lone
    surrogates such as a decoded "\\ud800" (not Unicode: no database encoding has them),
    and values nested too deeply for Python's encoder (circular ones among them).
    """
    try:
        text = _ENCODER.encode(value) if _C_ENCODER is None else "".join(_C_ENCODER(value, 0))
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"{what} is not JSON-serializable: {exc}") from None
    except RecursionError:
        raise InvalidJob(
            f"{what} is not JSON-serializable: nested too deeply (or contains itself)"
        ) from None
    if "\\u0000" in text:
        raise InvalidJob(f"{what} contains a NUL character (\\u0000), which jsonb cannot store")
    check_unicode(text, what=what)
    return text


def check_unicode(text: str, *, what: str) -> None:
    """InvalidJob unless ``text`` is valid Unicode (no lone surrogates)."""
    if text.isascii():  # the common case, and O(1) in CPython
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidJob(
            f"{what} contains a lone surrogate ({text[exc.start]!r} at {exc.start}), "
            "which is not valid Unicode"
        ) from None


def decode_json(value: Any) -> Any:
    """A jsonb column as Python: asyncpg and psycopg may hand over text or objects.

    JSON nested deeper than Python's decoder allows (Postgres accepts thousands of
    levels) comes back as a string saying so, rather than failing the whole read.
    """
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except RecursionError:
            return f"<JSON nested too deeply to decode here ({len(value)} bytes)>"
    return value


@dataclass(frozen=True)
class NewJob:
    """A validated job, ready to bind into insert_job's parameters."""

    type: str
    payload_json: str
    priority: int
    max_attempts: int | None
    run_at: dt.datetime | None
    run_in: dt.timedelta | None
    timeout: float | None
    unique_key: str | None
    cache_ttl: float | None = None
    concurrency_key: str | None = None
    depends_on: tuple[int, ...] | None = None
    on_dependency_failure: str | None = None

    def insert_args(self, trace_context: str | None = None) -> tuple[Any, ...]:
        """Values for $1..$12 of insert_job / insert_job_unique; ``trace_context``: the
        JSON text of the trace context to store (dispatcher.core.tracing)."""
        return (
            self.type,
            self.payload_json,
            self.priority,
            self.max_attempts,
            self.run_at,
            self.run_in,
            self.timeout,
            self.unique_key,
            self.concurrency_key,
            None if self.depends_on is None else list(self.depends_on),
            self.on_dependency_failure,
            trace_context,
        )


class EnqueueOptions(TypedDict, total=False):
    """What an enqueue may set beside the type and the payload: the one definition the
    clients' ``enqueue`` takes (``**options``), and the HTTP API and the CLI describe
    with :data:`ENQUEUE_OPTION_HELP` (a test keeps every surface in step with it)."""

    priority: int
    run_at: dt.datetime | dt.timedelta | None
    max_attempts: int | None
    timeout: float | None
    unique_key: str | None
    cache_ttl: float | None
    concurrency_key: str | None
    depends_on: Sequence[int] | None
    on_dependency_failure: str | None


class BulkOptions(TypedDict, total=False):
    """What ``enqueue_many`` may set for all its jobs (see :class:`EnqueueOptions`);
    ``unique_keys`` gives one key per payload."""

    priority: int
    run_at: dt.datetime | dt.timedelta | None
    max_attempts: int | None
    timeout: float | None
    unique_keys: Sequence[str] | None


ENQUEUE_OPTION_HELP: dict[str, str] = {
    "priority": "lower runs first (-32768..32767, default 0)",
    "run_at": "when it runs: an aware datetime, or a timedelta from the database's now() "
    "(over HTTP and the CLI: a time with a timezone, or a delay in seconds)",
    "max_attempts": f"attempts before it fails for good (1..{MAX_ATTEMPTS}; default: "
    "the executor's)",
    "timeout": "seconds an attempt may run (default: the executor's)",
    "unique_key": "while a pending or processing job of the type has this key, that job "
    "is returned (duplicate) and nothing is inserted; race-free",
    "cache_ttl": "seconds: a job of the type with this unique_key that completed within "
    "them is returned (cached, with its result) instead of running it again",
    "concurrency_key": "jobs of the type with the same key run at most key_concurrency at "
    "once (the executor's), in priority, run_at, id order (e.g. a customer id)",
    "depends_on": "ids of jobs to wait for: it runs once all of them completed (it is "
    "'waiting' until then), and ends when one of them fails or is cancelled; not with a "
    "unique_key",
    "on_dependency_failure": "what it becomes when a dependency fails or is cancelled: "
    "'fail' (default) or 'cancel'",
}


def options_of(values: object, *, run_at: dt.datetime | dt.timedelta | None) -> EnqueueOptions:
    """The enqueue options held as attributes of ``values`` (a request body, parsed
    command-line arguments: they name them as :class:`EnqueueOptions` does), with
    ``run_at`` as the caller resolved it."""
    options = {name: getattr(values, name) for name in EnqueueOptions.__optional_keys__}
    return cast(EnqueueOptions, {**options, "run_at": run_at})


def new_job_values(type: str, payload: Any = None, **options: Unpack[EnqueueOptions]) -> NewJob:
    """Check a job's fields; raise InvalidJob naming the first bad one.

    ``run_at`` is an aware datetime, or a timedelta counted from the database's
    ``now()`` (never this machine's clock). ``payload`` defaults to ``{}``.
    """
    unknown = set(options) - EnqueueOptions.__optional_keys__
    if unknown:
        known = ", ".join(sorted(EnqueueOptions.__optional_keys__))
        raise InvalidJob(f"unknown enqueue option {', '.join(sorted(unknown))}; known: {known}")
    priority = options.get("priority", 0)
    run_at = options.get("run_at")
    max_attempts = options.get("max_attempts")
    timeout = options.get("timeout")
    unique_key = options.get("unique_key")
    cache_ttl = options.get("cache_ttl")
    concurrency_key = options.get("concurrency_key")
    depends_on = dependency_ids(options.get("depends_on"))
    on_dependency_failure = options.get("on_dependency_failure")
    if not isinstance(type, str) or not type.strip():
        raise InvalidJob("type must be a non-empty string")
    if len(type) > MAX_TYPE_LENGTH:
        raise InvalidJob(f"type must be at most {MAX_TYPE_LENGTH} characters, got {len(type)}")
    if "\x00" in type:
        raise InvalidJob("type must not contain NUL characters")
    check_unicode(type, what="type")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidJob(f"priority must be an integer, got {priority!r}")
    if not SMALLINT_MIN <= priority <= SMALLINT_MAX:
        raise InvalidJob(
            f"priority must be between {SMALLINT_MIN} and {SMALLINT_MAX}, got {priority}"
        )
    if max_attempts is not None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise InvalidJob(f"max_attempts must be an integer, got {max_attempts!r}")
        if not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise InvalidJob(f"max_attempts must be 1 to {MAX_ATTEMPTS}, got {max_attempts}")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise InvalidJob(f"timeout must be a number of seconds, got {timeout!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise InvalidJob(f"timeout must be a positive number of seconds, got {timeout}")
    if unique_key is not None and (not isinstance(unique_key, str) or not unique_key):
        raise InvalidJob("unique_key must be a non-empty string or None")
    if unique_key is not None and "\x00" in unique_key:
        raise InvalidJob("unique_key must not contain NUL characters")
    if unique_key is not None:
        check_unicode(unique_key, what="unique_key")
    if concurrency_key is not None:
        if not isinstance(concurrency_key, str) or not concurrency_key:
            raise InvalidJob("concurrency_key must be a non-empty string or None")
        if "\x00" in concurrency_key:
            raise InvalidJob("concurrency_key must not contain NUL characters")
        check_unicode(concurrency_key, what="concurrency_key")
    if cache_ttl is not None:
        if isinstance(cache_ttl, bool) or not isinstance(cache_ttl, int | float):
            raise InvalidJob(f"cache_ttl must be a number of seconds, got {cache_ttl!r}")
        if not (cache_ttl > 0 and math.isfinite(cache_ttl)):
            raise InvalidJob(f"cache_ttl must be a positive number of seconds, got {cache_ttl}")
        if unique_key is None:
            raise InvalidJob("cache_ttl needs a unique_key: the cache is looked up by it")
    if depends_on is not None and unique_key is not None:
        raise InvalidJob(
            "depends_on and unique_key do not combine: a waiting job holds no unique key"
        )
    check_dependency_failure(on_dependency_failure, has_dependencies=depends_on is not None)
    absolute: dt.datetime | None = None
    relative: dt.timedelta | None = None
    if isinstance(run_at, dt.datetime):
        if run_at.tzinfo is None:
            raise InvalidJob("run_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
        absolute = run_at
    elif isinstance(run_at, dt.timedelta):
        relative = run_at
    elif run_at is not None:
        raise InvalidJob(f"run_at must be a datetime, a timedelta or None, got {run_at!r}")
    return NewJob(
        type=type,
        payload_json=encode_json({} if payload is None else payload, what="payload"),
        priority=priority,
        max_attempts=max_attempts,
        run_at=absolute,
        run_in=relative,
        timeout=None if timeout is None else float(timeout),
        unique_key=unique_key,
        cache_ttl=None if cache_ttl is None else float(cache_ttl),
        concurrency_key=concurrency_key,
        depends_on=depends_on,
        on_dependency_failure=on_dependency_failure,
    )


def check_dependency_failure(value: Any, *, has_dependencies: bool) -> None:
    """InvalidJob unless ``value`` is a valid on_dependency_failure (None included)."""
    if value is None:
        return
    if value not in DEPENDENCY_FAILURE_OUTCOMES:
        raise InvalidJob(f"on_dependency_failure must be 'fail' or 'cancel', got {value!r}")
    if not has_dependencies:
        raise InvalidJob("on_dependency_failure needs depends_on")


def dependency_ids(depends_on: Any) -> tuple[int, ...] | None:
    """``depends_on`` as distinct job ids in their order (None: no dependencies), or
    InvalidJob saying what is wrong with it."""
    if depends_on is None:
        return None
    if isinstance(depends_on, str | bytes) or not isinstance(depends_on, Sequence):
        raise InvalidJob(f"depends_on must be a list of job ids, got {depends_on!r}")
    for job_id in depends_on:
        if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= BIGINT_MAX:
            raise InvalidJob(f"depends_on must hold job ids (positive integers), got {job_id!r}")
    ids = tuple(dict.fromkeys(depends_on))
    if len(ids) > MAX_DEPENDENCIES:
        raise InvalidJob(f"depends_on may name at most {MAX_DEPENDENCIES} jobs, got {len(ids)}")
    return ids or None


@dataclass(frozen=True)
class JobRecord:
    """A row of the jobs table, as producers and operators see it."""

    id: int
    type: str
    payload: Any
    status: JobStatus
    priority: int
    run_at: dt.datetime
    attempts: int
    max_attempts: int | None
    timeout: float | None
    unique_key: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    owner: str | None
    term: int | None
    progress: dict[str, Any] | None
    result: Any
    last_error: str | None
    errors: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: bool = False
    concurrency_key: str | None = None
    # The jobs it waits for (None: none), and what it becomes if one fails.
    depends_on: list[int] | None = None
    on_dependency_failure: str | None = None
    # Those of depends_on that have not completed (read by get, None elsewhere).
    open_dependencies: list[int] | None = None
    # Set by enqueue when an active job with the same unique_key already existed and
    # was returned instead of a new one.
    duplicate: bool = False
    # Set by enqueue(cache_ttl=...) when a recently completed job with the same
    # unique_key was returned (with its result) instead of running it again.
    cached: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobRecord:
        """Build from a jobs row (asyncpg Record or psycopg dict row)."""
        return cls(
            id=row["id"],
            type=row["type"],
            payload=decode_json(row["payload"]),
            status=JobStatus(row["status"]),
            priority=row["priority"],
            run_at=row["run_at"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            timeout=row["timeout"],
            unique_key=row["unique_key"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            heartbeat_at=row["heartbeat_at"],
            owner=row["owner"],
            term=row["term"],
            progress=decode_json(row["progress"]),
            result=decode_json(row["result"]),
            last_error=row["last_error"],
            errors=decode_json(row["errors"]),
            cancel_requested=row["cancel_requested"],
            concurrency_key=row["concurrency_key"],
            depends_on=_list_or_none(row["depends_on"]),
            on_dependency_failure=row["on_dependency_failure"],
            open_dependencies=_list_or_none(row.get("open_dependencies")),
            duplicate=bool(row.get("duplicate", False)),
            cached=bool(row.get("cached", False)),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (timestamps as ISO 8601)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, dt.datetime):
                value = value.isoformat()
            elif isinstance(value, JobStatus):
                value = value.value
            out[name] = value
        return out


def _list_or_none(value: Any) -> list[int] | None:
    return None if value is None else list(value)
