"""Errors raised by dispatcher, and the signals executors raise to steer a job.

Bottom layer: imports nothing from the package. Every message names the thing that
went wrong and, where there is one, the fix.
"""

from __future__ import annotations


class DispatcherError(Exception):
    """Base class of every error dispatcher raises on purpose."""


class ConfigError(DispatcherError):
    """The configuration is invalid; ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class MigrationError(DispatcherError):
    """The database schema cannot be brought to the version this code expects."""


class SchemaNotReady(DispatcherError):
    """The schema is missing or older than the code: run ``dispatcher migrate``."""


class EmbeddedPostgresUnavailable(DispatcherError):
    """No DSN is configured and the embedded Postgres cannot be used."""


class InvalidJob(DispatcherError, ValueError):
    """A job passed to a client can never run (empty type, bad payload, ...)."""


class InvalidArgument(DispatcherError, ValueError):
    """An argument to a query or command is out of range (unknown status, bad limit)."""


class JobNotFound(DispatcherError, LookupError):
    """No job has the given id."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id}")


class QueueFull(DispatcherError):
    """The type's queue holds its ``max_pending`` jobs: try again later.

    ``retry_after`` is a hint in seconds (the leader re-counts pending jobs about
    that often).
    """

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class InvalidTransition(DispatcherError):
    """The job is not in a state that allows the requested change."""


# --- Signals an executor raises to steer its job --------------------------------


class JobControl(Exception):
    """Base of the exceptions an executor raises to say how its job should end."""


class PermanentError(JobControl):
    """Fail the job at once: retrying cannot help (bad payload, missing record)."""


class Snooze(JobControl):
    """Reschedule the job ``seconds`` from now without spending an attempt."""

    def __init__(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"Snooze seconds must be >= 0, got {seconds}")
        self.seconds = float(seconds)
        super().__init__(f"snoozed for {self.seconds:g}s")


class RetryAfter(JobControl):
    """Fail this attempt and retry after ``seconds`` instead of the backoff delay."""

    def __init__(self, seconds: float, reason: str = "") -> None:
        if seconds < 0:
            raise ValueError(f"RetryAfter seconds must be >= 0, got {seconds}")
        self.seconds = float(seconds)
        super().__init__(reason or f"retry after {self.seconds:g}s")
