"""Prometheus metrics, all defined here (``dispatcher_`` prefix, units in names).

One :class:`Metrics` per runtime, each with its own registry, so several replicas in
one process (tests) keep separate numbers. Queue depth and oldest-pending age are
exported by the leader only: summing them across replicas never double-counts.

Bounded: a job type is a label value only if the app registers it; every other type
(anything producers insert by SQL) is counted under ``type="(other)"``, so the page
keeps its size however many types appear. And complete from the start:
:meth:`Metrics.init_series` creates every labelled series at 0, because ``increase()``
and ``rate()`` need two samples, and a series born at its first event hides that event
(the first rescue after a restart would never alert).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from dispatcher.core.loop_histogram import LoopHistogram

# The *_created series (a timestamp per counter) only double the scrape size.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Job durations from a millisecond to an hour.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

# The ``type`` label of every job type the app does not register, all together.
# Parenthesised so that it cannot be mistaken for a real type name.
OTHER_TYPES = "(other)"


class Service(StrEnum):
    """The ``service`` label of dispatcher_database_errors_total: each service that
    counts its database errors."""

    COMPLETER = "completer"
    DISPATCH = "dispatch"
    ELECTOR = "elector"
    HEARTBEAT = "heartbeat"
    PERIODIC = "periodic"
    QUEUE_STATS = "queue_stats"
    REAPER = "reaper"
    REPLICAS = "replicas"
    SESSION = "session"


class LeaderEvent(StrEnum):
    """The ``event`` label of dispatcher_leader_transitions_total."""

    ELECTED = "elected"
    DEPOSED = "deposed"


# The ``source`` label of dispatcher_wakeups_total: why the claim loop woke up. The
# callers of Wakeup.wake name them; tests/unit/deploy checks that this list has them all.
WAKEUP_SOURCES = (
    "start", "election", "notify", "poll", "timer", "slot", "retry", "control",
    "reconnect", "hand_back", "handed_back", "session", "rescue",
)  # fmt: skip

M = TypeVar("M", Counter, Gauge, Histogram, LoopHistogram)


class ByJobType(Generic[M]):
    """A metric whose first label is the job type, bounded: a type the app does not
    register is counted under OTHER_TYPES (see :meth:`Metrics.type_label`)."""

    def __init__(self, metric: M, type_label: Callable[[str], str]) -> None:
        self.metric: M = metric
        self._type_label = type_label

    def labels(self, type_: str, *labels: str) -> M:
        return self.metric.labels(self._type_label(type_), *labels)

    def clear(self) -> None:
        self.metric.clear()


class Metrics:
    """Every metric a replica exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # None until init_series() names the registered types (see type_label).
        self._job_types: frozenset[str] | None = None
        by_type = self._by_type

        # --- jobs ------------------------------------------------------------------
        self.jobs_completed = by_type(
            Counter("dispatcher_jobs_completed_total", "Jobs that completed", ["type"], registry=r)
        )
        self.jobs_failed = by_type(
            Counter(
                "dispatcher_jobs_failed_total",
                "Jobs that failed for good (out of attempts, permanent error, no executor)",
                ["type"],
                registry=r,
            )
        )
        self.jobs_retried = by_type(
            Counter(
                "dispatcher_jobs_retried_total",
                "Failed attempts that will be retried",
                ["type"],
                registry=r,
            )
        )
        self.jobs_cancelled = by_type(
            Counter(
                "dispatcher_jobs_cancelled_total",
                "Jobs cancelled while running",
                ["type"],
                registry=r,
            )
        )
        self.jobs_snoozed = by_type(
            Counter("dispatcher_jobs_snoozed_total", "Attempts that snoozed", ["type"], registry=r)
        )
        self.jobs_rescued = by_type(
            Counter(
                "dispatcher_jobs_rescued_total",
                "Processing jobs rescued by the reaper after their owner stopped heartbeating",
                ["type"],
                registry=r,
            )
        )
        self.jobs_fenced = by_type(
            Counter(
                "dispatcher_jobs_fenced_total",
                "Outcomes dropped because the attempt no longer owned its job",
                ["type"],
                registry=r,
            )
        )
        self.job_duration = by_type(
            LoopHistogram(
                "dispatcher_job_duration_seconds",
                "Executor run time per attempt",
                ["type"],
                buckets=DURATION_BUCKETS,
                registry=r,
            )
        )
        self.job_queue_wait = by_type(
            LoopHistogram(
                "dispatcher_job_queue_wait_seconds",
                "Time from a job being due (run_at) to its start",
                ["type"],
                buckets=DURATION_BUCKETS,
                registry=r,
            )
        )
        self.jobs_running = by_type(
            Gauge("dispatcher_jobs_running", "Jobs running in this replica", ["type"], registry=r)
        )
        self.concurrency_limit = Gauge(
            "dispatcher_concurrency_limit",
            'Configured concurrency limit (type="*" is the global one)',
            ["type"],
            registry=r,
        )

        # --- queue (leader only) ------------------------------------------------------
        self.queue_depth = by_type(
            Gauge(
                "dispatcher_queue_depth",
                "Pending jobs per type and state (ready: due now; scheduled: run_at in the "
                f'future); type="{OTHER_TYPES}" sums the types this replica has no '
                "executor for. Exported by the leader only.",
                ["type", "state"],
                registry=r,
            )
        )
        self.queue_oldest_pending_age = by_type(
            Gauge(
                "dispatcher_queue_oldest_pending_age_seconds",
                "Age of the oldest due pending job per type (now - run_at). Leader only.",
                ["type"],
                registry=r,
            )
        )

        # --- leadership -------------------------------------------------------------------
        self.is_leader = Gauge(
            "dispatcher_is_leader", "1 while this replica is the leader", registry=r
        )
        self.leader_term = Gauge(
            "dispatcher_leader_term", "Term of this replica's current leadership", registry=r
        )
        self.leader_transitions = Counter(
            "dispatcher_leader_transitions_total",
            "Leadership changes of this replica (event: elected, deposed)",
            ["event"],
            registry=r,
        )
        self.leader_takeovers = Counter(
            "dispatcher_leader_takeovers_total",
            "Backends of hung leaders terminated by this replica",
            registry=r,
        )

        # --- services -----------------------------------------------------------------------
        self.jobs_pruned = Counter(
            "dispatcher_jobs_pruned_total",
            "Finished jobs deleted after their retention",
            registry=r,
        )
        self.reaper_runs = Counter("dispatcher_reaper_runs_total", "Reaper passes", registry=r)
        self.claim_batch_size = Histogram(
            "dispatcher_claim_batch_size",
            "Jobs claimed per claim statement",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.completion_batch_size = Histogram(
            "dispatcher_completion_batch_size",
            "Outcomes written per group commit",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.wakeups = Counter(
            "dispatcher_wakeups_total",
            f"Claim loop wake-ups by source ({', '.join(WAKEUP_SOURCES)})",
            ["source"],
            registry=r,
        )
        self.database_errors = Counter(
            "dispatcher_database_errors_total",
            "Database errors by service",
            ["service"],
            registry=r,
        )
        self.info = Gauge(
            "dispatcher_info", "Replica identity (value is always 1)", ["version", "replica"],
            registry=r,
        )  # fmt: skip

    def init_series(self, job_types: Iterable[str], *, version: str, replica: str) -> None:
        """At start: name the types the app registers (bounding the ``type`` label to
        them, see :meth:`type_label`), create every labelled series at 0, and export
        the replica's identity (``dispatcher_info``).

        Leader-only queue gauges are left to the leader's first count, and
        ``concurrency_limit`` and ``jobs_running`` to the dispatcher and slots, which
        know their values."""
        self._job_types = frozenset(job_types)
        types = sorted(self._job_types)
        # Counters also get OTHER_TYPES: the reaper fails and rescues jobs of types
        # this replica does not run.
        for counter in (
            self.jobs_completed, self.jobs_failed, self.jobs_retried, self.jobs_cancelled,
            self.jobs_snoozed, self.jobs_rescued, self.jobs_fenced,
        ):  # fmt: skip
            for type_ in (*types, OTHER_TYPES):
                counter.labels(type_)
        for histogram in (self.job_duration, self.job_queue_wait):
            for type_ in types:
                histogram.labels(type_)
        for event in LeaderEvent:
            self.leader_transitions.labels(event)
        for source in WAKEUP_SOURCES:
            self.wakeups.labels(source)
        for service in Service:
            self.database_errors.labels(service)
        self.info.labels(version, replica).set(1)

    @property
    def job_types(self) -> frozenset[str] | None:
        """The registered types given to init_series (None before)."""
        return self._job_types

    def type_label(self, type_: str) -> str:
        """The ``type`` label value of a job type: itself if the app registers it, else
        OTHER_TYPES. Before init_series (a bare Metrics in a test), every type is its
        own label."""
        if self._job_types is None or type_ in self._job_types:
            return type_
        return OTHER_TYPES

    def _by_type(self, metric: M) -> ByJobType[M]:
        return ByJobType(metric, self.type_label)

    def exposed_names(self) -> set[str]:
        """Every series name a scrape can show (counters end in _total; histograms
        show _bucket, _sum and _count): what alerts and dashboards may reference."""
        names = set()
        for family in self.registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
        return names
