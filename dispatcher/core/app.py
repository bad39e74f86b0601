"""The application object: which executors run which job types, with what limits.

    app = App(concurrency=200)

    @app.executor("email.send", concurrency=20, timeout=30, max_attempts=5)
    async def send_email(job: Job) -> dict | None: ...

An ``async def`` runs on the event loop; a plain ``def`` runs in a thread pool.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
import zoneinfo
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from dispatcher.core.errors import DispatcherError
from dispatcher.core.records import MAX_ATTEMPTS, MAX_TYPE_LENGTH
from dispatcher.core.retry import RetryPolicy

ExecutorFunction = Callable[..., Any]
Hook = Callable[[], Awaitable[None]]
F = TypeVar("F", bound=ExecutorFunction)


@dataclass(frozen=True)
class ExecutorSpec:
    """One registered executor and its settings."""

    type: str
    function: ExecutorFunction
    is_async: bool
    concurrency: int | None
    timeout: float | None
    max_attempts: int
    retry: RetryPolicy
    max_pending: int | None = None
    rate_limit: RateLimit | None = None
    key_concurrency: int | None = None


@dataclass(frozen=True)
class RateLimit:
    """At most ``starts`` job starts per ``per`` seconds, across the cluster."""

    starts: int
    per: float


@dataclass(frozen=True)
class Periodic:
    """A cron schedule that enqueues one job of ``type`` per instant."""

    name: str
    cron: str
    type: str
    payload: Any
    timezone: str
    priority: int
    max_attempts: int | None
    backfill: float


def _check_positive(name: str, value: Any, *, integer: bool, what: str) -> None:
    if value is None:
        return
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and value > 0
    if not ok:
        kind = "a positive integer" if integer else "a positive number of seconds"
        raise DispatcherError(f"{what}: {name} must be {kind}, got {value!r}")
    if name == "max_attempts" and value > MAX_ATTEMPTS:
        raise DispatcherError(f"{what}: max_attempts must be at most {MAX_ATTEMPTS}, got {value}")


class App:
    """A set of executors and the defaults they share.

    ``concurrency``: the global limit of running jobs across the cluster.
    ``max_attempts``, ``retry``, ``timeout``: defaults for executors that do not set
    their own (a job row's own max_attempts/timeout win over both).
    ``unknown_type_grace``: seconds a due job of a type no live replica runs waits
    before the reaper fails it.
    """

    def __init__(
        self,
        *,
        concurrency: int = 100,
        max_attempts: int = 5,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        unknown_type_grace: float = 600.0,
    ) -> None:
        _check_positive("concurrency", concurrency, integer=True, what="App")
        _check_positive("max_attempts", max_attempts, integer=True, what="App")
        _check_positive("timeout", timeout, integer=False, what="App")
        _check_positive("unknown_type_grace", unknown_type_grace, integer=False, what="App")
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.unknown_type_grace = unknown_type_grace
        self.executors: dict[str, ExecutorSpec] = {}
        self.schedules: dict[str, Periodic] = {}
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []

    def on_startup(self, hook: Hook) -> Hook:
        """Register ``async def hook() -> None``, awaited once per replica before it
        claims anything (open your own pools here)."""
        self.startup_hooks.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        """Register ``async def hook() -> None``, awaited once per replica after its
        jobs drained (close your pools, flush buffers)."""
        self.shutdown_hooks.append(hook)
        return hook

    def executor(
        self,
        type: str,
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        retry: RetryPolicy | None = None,
        max_pending: int | None = None,
        rate_limit: tuple[int, float] | None = None,
        key_concurrency: int | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as the executor of ``type``.

        ``concurrency``: at most this many jobs of the type run at once, across the
        cluster (default: only the global limit). ``timeout``: seconds per attempt.
        ``max_attempts``: attempts before the job fails for good. ``retry``: backoff.
        ``max_pending``: producers get QueueFull (HTTP 429) once about this many jobs
        of the type are pending. ``rate_limit=(n, seconds)``: at most n starts per that
        many seconds across the cluster. ``key_concurrency``: at most this many jobs of
        the type with the same ``concurrency_key`` run at once, across the cluster, in
        priority, run_at, id order within a key (1: one at a time per key, in order);
        jobs without a key are limited by the other limits only.
        """
        what = f"executor {type!r}"
        if not isinstance(type, str) or not type.strip() or len(type) > MAX_TYPE_LENGTH:
            raise DispatcherError(
                f"executor type must be a non-empty string of at most {MAX_TYPE_LENGTH} "
                f"characters, got {type!r}"
            )
        _check_positive("concurrency", concurrency, integer=True, what=what)
        _check_positive("timeout", timeout, integer=False, what=what)
        _check_positive("max_attempts", max_attempts, integer=True, what=what)
        _check_positive("max_pending", max_pending, integer=True, what=what)
        _check_positive("key_concurrency", key_concurrency, integer=True, what=what)
        limit: RateLimit | None = None
        if rate_limit is not None:
            if not (isinstance(rate_limit, tuple) and len(rate_limit) == 2):
                raise DispatcherError(f"{what}: rate_limit must be (starts, seconds)")
            _check_positive("rate_limit starts", rate_limit[0], integer=True, what=what)
            _check_positive("rate_limit seconds", rate_limit[1], integer=False, what=what)
            limit = RateLimit(rate_limit[0], float(rate_limit[1]))

        def register(function: F) -> F:
            if type in self.executors:
                existing = self.executors[type].function
                raise DispatcherError(
                    f"{what} is already registered (by {existing.__module__}."
                    f"{existing.__qualname__})"
                )
            if not callable(function):
                raise DispatcherError(f"{what}: {function!r} is not callable")
            self.executors[type] = ExecutorSpec(
                type=type,
                function=function,
                is_async=inspect.iscoroutinefunction(function),
                concurrency=concurrency,
                timeout=timeout if timeout is not None else self.timeout,
                max_attempts=max_attempts if max_attempts is not None else self.max_attempts,
                retry=retry or self.retry,
                max_pending=max_pending,
                rate_limit=limit,
                key_concurrency=key_concurrency,
            )
            return function

        return register

    def periodic(
        self,
        cron: str,
        *,
        type: str,
        payload: Any = None,
        timezone: str = "UTC",
        name: str | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        backfill: float = 300.0,
    ) -> Callable[[F], F]:
        """Enqueue a ``type`` job at every instant of ``cron`` (5 fields, or 6 with
        seconds last), in ``timezone``. The leader enqueues each instant exactly once,
        across leader changes and restarts; after downtime it catches up at most
        ``backfill`` seconds of missed instants.

        Use it on its own for a type that has an executor, or as a decorator to
        register the decorated function as that type's executor too.
        """
        from croniter import croniter

        what = f"periodic {cron!r}"
        if not isinstance(cron, str) or not croniter.is_valid(cron):
            raise DispatcherError(f"{what}: not a valid cron expression")
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise DispatcherError(f"{what}: unknown timezone {timezone!r}") from None
        if not isinstance(type, str) or not type.strip():
            raise DispatcherError(f"{what}: type must be a non-empty string")
        _check_positive("backfill", backfill, integer=False, what=what)
        schedule_name = name or f"{type}@{cron}"
        if schedule_name in self.schedules:
            raise DispatcherError(
                f"{what}: a schedule named {schedule_name!r} exists; pass name= to tell them apart"
            )
        self.schedules[schedule_name] = Periodic(
            name=schedule_name,
            cron=cron,
            type=type,
            payload={} if payload is None else payload,
            timezone=timezone,
            priority=priority,
            max_attempts=max_attempts,
            backfill=float(backfill),
        )

        def register(function: F) -> F:
            return self.executor(type)(function)

        return register

    def limits(self, concurrency: int | None = None) -> Limits:
        """The limits a replica applies: the global one (``concurrency``, e.g.
        DISPATCHER_CONCURRENCY, else the App's) and each type's, never above it."""
        global_limit = concurrency or self.concurrency
        per_type = {
            type_: min(spec.concurrency or global_limit, global_limit)
            for type_, spec in sorted(self.executors.items())
        }
        sync = [per_type[t] for t, spec in self.executors.items() if not spec.is_async]
        return Limits(global_limit, per_type, min(global_limit, sum(sync)) if sync else 1)

    def retry_for(self, type_: str) -> tuple[RetryPolicy, int]:
        """The retry policy and max_attempts of ``type_`` (the App's defaults for a
        type it has no executor for); a job row's own max_attempts wins over the
        latter."""
        spec = self.executors.get(type_)
        if spec is None:
            return self.retry, self.max_attempts
        return spec.retry, spec.max_attempts


@dataclass(frozen=True)
class Limits:
    """A replica's concurrency limits: ``global_limit`` running jobs in all,
    ``per_type[t]`` of type t, and ``sync_threads`` threads for its plain def
    executors (they can never need more)."""

    global_limit: int
    per_type: dict[str, int]
    sync_threads: int


def load_app(target: str) -> App:
    """Import ``module:attribute`` (e.g. ``dispatcher.examples:app``) and return the App.

    The current folder is importable, as with ``python -m``.
    """
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise DispatcherError(f"expected MODULE:APP (e.g. dispatcher.examples:app), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DispatcherError(f"cannot import {module_name!r} (from {target!r}): {exc}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        found = "nothing" if app is None else type(app).__name__
        raise DispatcherError(f"{target!r} must name a dispatcher.App, found {found}")
    if not app.executors:
        raise DispatcherError(f"{target!r} has no executors registered")
    return app
