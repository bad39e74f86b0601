"""What an executor receives: one attempt of one job, and its controls.

``payload`` is decoded on first use (a no-op executor never pays for it). ``progress``
records the latest value and returns at once; a background flush writes it to the
row a few times a second at most, so a flood of calls costs almost nothing. It works
with or without ``await``, from async and sync executors alike. The results of the
jobs it depended on are read when asked (``dependency_results``).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Generator
from typing import Any, Protocol

from dispatcher.core.log import Logger, get_logger

MAX_PROGRESS_MESSAGE = 1000


class DependencyReader(Protocol):
    """Reads the results of a job's dependencies
    (:class:`~dispatcher.services.dependencies.DependencyResults`)."""

    async def read(self, job_id: int) -> dict[int, Any]: ...

    def read_blocking(self, job_id: int) -> dict[int, Any]: ...


class _Done:
    """An awaitable that is already done: ``await job.progress(...)`` costs nothing."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


_DONE = _Done()


def _number(name: str, value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"progress {name} must be a finite number or None, got {value!r}")
    return value


class Job:
    """One attempt of a job, as its executor sees it.

    Attributes: ``id``, ``type``, ``attempt`` (1 on the first run), ``max_attempts``,
    ``timeout`` (seconds or None). Properties: ``payload``, ``log`` (a structlog
    logger bound to job_id, type and attempt), ``cancelled``.
    """

    __slots__ = (
        "_cancel_event",
        "_cancelled",
        "_dependencies",
        "_log",
        "_on_progress",
        "_payload",
        "_payload_text",
        "attempt",
        "id",
        "max_attempts",
        "progress_value",
        "timeout",
        "type",
    )

    def __init__(
        self,
        id: int,
        type: str,
        payload_text: str,
        attempt: int,
        max_attempts: int,
        timeout: float | None,
        on_progress: Callable[[Job], None] | None = None,
        threaded: bool = False,
        dependencies: DependencyReader | None = None,
    ) -> None:
        self.id = id
        self.type = type
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.timeout = timeout
        self._payload_text = payload_text
        self._payload: Any = _UNSET
        self._log: Logger | None = None
        self._on_progress = on_progress
        self._dependencies = dependencies
        self._cancelled = False
        # A sync executor reads the event from its thread: create it up front so the
        # loop's mark_cancelled() can never miss one created concurrently.
        self._cancel_event: threading.Event | None = threading.Event() if threaded else None
        # Latest progress as {"current", "total", "message"}; written by the flush.
        self.progress_value: dict[str, Any] | None = None

    @property
    def payload(self) -> Any:
        """The job's payload (decoded JSON)."""
        if self._payload is _UNSET:
            self._payload = json.loads(self._payload_text)
        return self._payload

    @property
    def log(self) -> Logger:
        """A structlog logger bound to this job's id, type and attempt."""
        if self._log is None:
            self._log = get_logger("job", job_id=self.id, type=self.type, attempt=self.attempt)
        return self._log

    def progress(
        self, current: float | None, total: float | None = None, message: str | None = None
    ) -> _Done:
        """Record progress (e.g. ``progress(3, 10, "resizing")``); readable from the row
        within a fraction of a second. Works with or without ``await``."""
        if message is not None and not isinstance(message, str):
            raise ValueError(f"progress message must be a string or None, got {message!r}")
        self.progress_value = {
            "current": _number("current", current),
            "total": _number("total", total),
            "message": None if message is None else message[:MAX_PROGRESS_MESSAGE],
        }
        if self._on_progress is not None:
            self._on_progress(self)
        return _DONE

    # --- dependencies ------------------------------------------------------------------

    async def dependency_results(self) -> dict[int, Any]:
        """The results of the jobs this one depended on (``depends_on``), as
        {job id: result}; all of them completed before this job could start. Empty for a
        job without dependencies. One query per call. In a plain def executor, use
        :meth:`dependency_results_sync`."""
        return await self._reader().read(self.id)

    def dependency_results_sync(self) -> dict[int, Any]:
        """:meth:`dependency_results` for a plain def executor (from its thread)."""
        return self._reader().read_blocking(self.id)

    def _reader(self) -> DependencyReader:
        if self._dependencies is None:
            raise RuntimeError(f"job {self.id} was built without a database to read from")
        return self._dependencies

    # --- cancellation ------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once this attempt should stop (cancel requested, timed out, shutdown).

        Async executors are interrupted with CancelledError; sync executors cannot be,
        and should poll this (or wait on :attr:`cancel_event`) in long loops.
        """
        return self._cancelled

    @property
    def cancel_event(self) -> threading.Event:
        """A threading.Event set when the attempt should stop (for sync executors)."""
        if self._cancel_event is None:
            self._cancel_event = threading.Event()
            if self._cancelled:
                self._cancel_event.set()
        return self._cancel_event

    def mark_cancelled(self) -> None:
        """Called by the dispatcher; executors read :attr:`cancelled`."""
        self._cancelled = True
        if self._cancel_event is not None:
            self._cancel_event.set()

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.type!r} attempt {self.attempt}/{self.max_attempts}>"


class _Unset:
    __slots__ = ()


_UNSET: Any = _Unset()
