"""Prometheus metrics, all defined here (``dispatcher_`` prefix, units in names).

One :class:`Metrics` per runtime, each with its own registry, so several replicas in
one process (tests) keep separate numbers. Queue depth and oldest-pending age are
exported by the leader only: summing them across replicas never double-counts.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# The *_created series (a timestamp per counter) only double the scrape size.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Job durations from a millisecond to an hour.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class Metrics:
    """Every metric a replica exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry

        # --- jobs ------------------------------------------------------------------
        self.jobs_completed = Counter(
            "dispatcher_jobs_completed_total", "Jobs that completed", ["type"], registry=r
        )
        self.jobs_failed = Counter(
            "dispatcher_jobs_failed_total",
            "Jobs that failed for good (out of attempts, permanent error, no executor)",
            ["type"],
            registry=r,
        )
        self.jobs_retried = Counter(
            "dispatcher_jobs_retried_total",
            "Failed attempts that will be retried",
            ["type"],
            registry=r,
        )
        self.jobs_cancelled = Counter(
            "dispatcher_jobs_cancelled_total", "Jobs cancelled while running", ["type"], registry=r
        )
        self.jobs_snoozed = Counter(
            "dispatcher_jobs_snoozed_total", "Attempts that snoozed", ["type"], registry=r
        )
        self.jobs_rescued = Counter(
            "dispatcher_jobs_rescued_total",
            "Processing jobs rescued by the reaper after their owner stopped heartbeating",
            ["type"],
            registry=r,
        )
        self.jobs_fenced = Counter(
            "dispatcher_jobs_fenced_total",
            "Outcomes dropped because the attempt no longer owned its job",
            ["type"],
            registry=r,
        )
        self.job_duration = Histogram(
            "dispatcher_job_duration_seconds",
            "Executor run time per attempt",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.job_queue_wait = Histogram(
            "dispatcher_job_queue_wait_seconds",
            "Time from a job being due (run_at) to its start",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.jobs_running = Gauge(
            "dispatcher_jobs_running", "Jobs running in this replica", ["type"], registry=r
        )
        self.concurrency_limit = Gauge(
            "dispatcher_concurrency_limit",
            'Configured concurrency limit (type="*" is the global one)',
            ["type"],
            registry=r,
        )

        # --- queue (leader only) ------------------------------------------------------
        self.queue_depth = Gauge(
            "dispatcher_queue_depth",
            "Pending jobs per type and state (ready: due now; scheduled: run_at in the "
            "future). Exported by the leader only.",
            ["type", "state"],
            registry=r,
        )
        self.queue_oldest_pending_age = Gauge(
            "dispatcher_queue_oldest_pending_age_seconds",
            "Age of the oldest due pending job per type (now - run_at). Leader only.",
            ["type"],
            registry=r,
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
            "Claim loop wake-ups by source (notify, poll, timer, slot, retry, control, "
            "election, reconnect)",
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
