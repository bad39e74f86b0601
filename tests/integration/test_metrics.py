"""/metrics stays small whatever producers insert, is complete from the start, and is
rendered off the event loop."""

from __future__ import annotations

import threading

import asyncpg
import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.core.metrics import OTHER_TYPES, Metrics, Service
from dispatcher.runtime import Runtime
from dispatcher.services.reaper import Reaper
from tests.support.apps import make_app
from tests.support.database import TestDatabase
from tests.support.runtimes import StartRuntime

UNKNOWN_TYPES = 5000
# Each pending type and state was a line of about 60 bytes: 5,000 types once added 0.9 MB.
# With the bound, the page of a replica whose queue holds them grows only by the digits.
MAX_GROWTH_BYTES = 1000


async def scrape(runtime: Runtime) -> str:
    transport = httpx.ASGITransport(app=runtime.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return response.text


def samples(page: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Label set -> value of every sample called ``name`` on the page."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name
    }


def type_labels(page: str, name: str) -> set[str]:
    return {dict(labels)["type"] for labels in samples(page, name)}


async def test_unknown_types_share_one_series_and_the_page_stays_small(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    app = make_app()
    registered = set(app.executors)
    runtime = await start_runtime(app)
    await runtime.queue_stats.run_once()
    empty = await scrape(runtime)

    conn = await db.connect()
    try:
        # Every unknown type has a ready job; one in five also has one scheduled for later.
        # A registered type has a scheduled job too (later, so that nothing claims it).
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 'type-' || g FROM generate_series(1, $1) g",
            UNKNOWN_TYPES,
        )
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, run_at) SELECT 'type-' || g, now() + interval '1h' "
            "FROM generate_series(1, $1, 5) g",
            UNKNOWN_TYPES,
        )
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, run_at) VALUES ('t.noop', now() + interval '1h')"
        )
        await runtime.queue_stats.run_once()
        expected = await conn.fetchrow(
            f"""SELECT count(*) FILTER (WHERE run_at <= now()) AS ready,
                       count(*) FILTER (WHERE run_at > now()) AS scheduled
                FROM {db.jobs} WHERE status = 'pending' AND type <> ALL($1::text[])""",
            sorted(registered),
        )
    finally:
        await conn.close()
    page = await scrape(runtime)

    assert expected["ready"] == UNKNOWN_TYPES and expected["scheduled"] == UNKNOWN_TYPES // 5
    for name in ("dispatcher_queue_depth", "dispatcher_queue_oldest_pending_age_seconds"):
        assert type_labels(page, name) == registered | {OTHER_TYPES}, name
    depth = samples(page, "dispatcher_queue_depth")
    assert depth[(("state", "ready"), ("type", OTHER_TYPES))] == expected["ready"]
    assert depth[(("state", "scheduled"), ("type", OTHER_TYPES))] == expected["scheduled"]
    assert depth[(("state", "scheduled"), ("type", "t.noop"))] == 1
    assert depth[(("state", "ready"), ("type", "t.noop"))] == 0
    assert len(page) - len(empty) < MAX_GROWTH_BYTES, (len(empty), len(page))
    assert "type-1" not in page


async def test_the_reaper_counts_unknown_types_under_the_one_aggregate(
    db: TestDatabase,
) -> None:
    app = make_app()
    metrics = Metrics()
    metrics.init_series(app.executors, version="test", replica="r")
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    conn = await db.connect()
    try:
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, run_at) "
            "SELECT 'type-' || g, now() - interval '1 minute' FROM generate_series(1, 2000) g"
        )
        reaper = Reaper(
            pool, db.schema, app, stale_after=30, interval=5, replica_seen_within=30,
            unknown_type_grace=1, metrics=metrics,
        )  # fmt: skip
        report = await reaper.run_once()
    finally:
        await conn.close()
        await pool.close()
    assert len(report.without_executor) == 2000
    failed = {
        dict(sample.labels)["type"]: sample.value
        for family in metrics.jobs_failed.metric.collect()
        for sample in family.samples
        if sample.name == "dispatcher_jobs_failed_total"
    }
    assert failed == {**dict.fromkeys(app.executors, 0.0), OTHER_TYPES: 2000.0}


async def test_a_fresh_replica_exports_every_labelled_series_at_zero(
    start_runtime: StartRuntime,
) -> None:
    app = make_app()
    page = await scrape(await start_runtime(app))
    for name in (
        "dispatcher_jobs_completed_total",
        "dispatcher_jobs_failed_total",
        "dispatcher_jobs_retried_total",
        "dispatcher_jobs_cancelled_total",
        "dispatcher_jobs_snoozed_total",
        "dispatcher_jobs_rescued_total",
        "dispatcher_jobs_fenced_total",
    ):
        assert type_labels(page, name) == set(app.executors) | {OTHER_TYPES}, name
        assert set(samples(page, name).values()) == {0.0}, name
    errors = samples(page, "dispatcher_database_errors_total")
    assert {dict(labels)["service"] for labels in errors} == set(Service)


class ThreadRecorder:
    """A collector that records the thread each scrape collects in."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def describe(self) -> list[Metric]:
        return []  # or registering would collect once, here on the loop

    def collect(self) -> list[Metric]:
        self.threads.append(threading.get_ident())
        return []


async def test_metrics_are_rendered_off_the_event_loop(start_runtime: StartRuntime) -> None:
    runtime = await start_runtime(make_app())
    recorder = ThreadRecorder()
    runtime.metrics.registry.register(recorder)
    await scrape(runtime)
    assert recorder.threads, "the scrape did not collect"
    assert threading.get_ident() not in recorder.threads, "rendered on the event loop"
