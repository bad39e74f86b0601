"""The reaper, one pass at a time (``run_once`` and its steps) on a real database.

Rescue: a processing job whose owner stopped heartbeating has its attempt recorded as
failed and is retried after its retry policy's delay, failed when out of attempts, or
cancelled when a cancel was requested; a job heartbeated recently, or one its live
owner says it holds but finds locked, is left alone. Unknown types: a pending job no
replica has an executor for fails after the grace period. Retention: finished jobs are
deleted in batches after their retention, per status; nothing pending, running or
recent is touched.

Rows are inserted with plain SQL, as the states a crashed or cut-off replica leaves.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from dispatcher.core.app import App
from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.core.retry import RetryPolicy
from dispatcher.core.schema import SchemaNames
from dispatcher.services import reaper as reaper_module
from dispatcher.services.job import Job
from dispatcher.services.reaper import Reaper
from tests.support.apps import make_app
from tests.support.database import TestDatabase
from tests.support.waiting import eventually

STALE_AFTER = 30.0
GRACE = 60.0
ORPHAN_GRACE = 0.2


@dataclass(frozen=True)
class FixedBackoff(RetryPolicy):
    """No jitter: the n-th failed attempt waits ``base * n`` seconds, so a test can
    tell the policy's delay from the row."""

    def delay(self, failed_attempt: int, rng: random.Random | None = None) -> float:
        return self.base * failed_attempt


def reaper_app() -> App:
    app = App(concurrency=10, retry=FixedBackoff(base=100.0, cap=100.0))

    @app.executor("r.work", max_attempts=3)
    async def work(job: Job) -> None:
        return None

    return app


def make_reaper(pool: asyncpg.Pool, schema: str, app: App, metrics: Metrics) -> Reaper:
    return Reaper(
        pool,
        schema,
        app,
        stale_after=STALE_AFTER,
        interval=5,
        replica_seen_within=30,
        unknown_type_grace=GRACE,
        retention_completed=86400,
        retention_failed=14 * 86400,
        orphan_grace=ORPHAN_GRACE,
        metrics=metrics,
    )


@dataclass
class Harness:
    """A reaper on a test schema, a connection to insert rows with, and its metrics."""

    db: TestDatabase
    conn: asyncpg.Connection
    reaper: Reaper
    metrics: Metrics

    async def processing(
        self,
        *,
        heartbeat: str = "now() - interval '1 hour'",
        attempts: int = 1,
        max_attempts: int | None = 3,
        cancel_requested: bool = False,
        owner: str = "dead-1-abc",
        type_: str = "r.work",
    ) -> int:
        """A job in the middle of attempt ``attempts``, last heartbeated at ``heartbeat``
        (an SQL expression)."""
        job_id: int = await self.conn.fetchval(
            f"INSERT INTO {self.db.jobs} (type, status, attempts, max_attempts, owner, term, "
            f"started_at, heartbeat_at, cancel_requested) "
            f"VALUES ($1, 'processing', $2, $3, $4, 1, now() - interval '2 hours', "
            f"{heartbeat}, $5) RETURNING id",
            type_,
            attempts,
            max_attempts,
            owner,
            cancel_requested,
        )
        return job_id

    async def row(self, job_id: int) -> dict[str, Any]:
        row = await self.conn.fetchrow(
            f"SELECT *, (errors -> -1 ->> 'at')::timestamptz AS last_error_at "
            f"FROM {self.db.jobs} WHERE id = $1",
            job_id,
        )
        assert row is not None, f"job {job_id} is gone"
        return dict(row)

    async def replica_with_session(self, owner: str, async_types: list[str]) -> asyncpg.Connection:
        """A replica row for ``owner`` whose session (returned, holding the session
        lock) is recorded, as replica_session.py does it."""
        queries = queries_for(self.db.schema)
        await self.conn.execute(
            queries["replica_heartbeat"], owner, owner, "test", 0, "test", "standby", []
        )
        session = await self.db.connect()
        lock = SchemaNames(self.db.schema).session_lock_name
        assert await session.fetchval(queries["session_lock"], lock)
        row = await session.fetchrow(queries["session_record"], owner, async_types)
        assert row is not None and row["registered"] and row["written"]
        return session

    async def orphaned_owners(self) -> list[tuple[str, int]]:
        rows = await self.conn.fetch(
            queries_for(self.db.schema)["orphaned_owners"],
            SchemaNames(self.db.schema).session_lock_name,
        )
        return [(row["id"], row["session_pid"]) for row in rows]

    def counted(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def harness(db: TestDatabase) -> AsyncIterator[Harness]:
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    conn = await db.connect()
    metrics = Metrics()
    try:
        yield Harness(db, conn, make_reaper(pool, db.schema, reaper_app(), metrics), metrics)
    finally:
        await conn.close()
        await pool.close()


async def test_a_stale_job_is_retried_failed_or_cancelled_and_a_live_one_is_left_alone(
    harness: Harness,
) -> None:
    h = harness
    retried = await h.processing(attempts=2, max_attempts=3)
    exhausted = await h.processing(attempts=3, max_attempts=3)
    cancelled = await h.processing(attempts=1, cancel_requested=True)
    # A heartbeat from the future (no replica writes one: heartbeats take the database
    # clock) is a row someone inserted as processing: it would hold a slot forever.
    future = await h.processing(heartbeat="now() + interval '1 hour'")
    fresh = await h.processing(heartbeat="now() - interval '1 second'", owner="alive-1-abc")
    # A little ahead (less than stale_after): clocks are the database's, but not stale.
    nearly_now = await h.processing(heartbeat="now() + interval '1 second'", owner="alive-1-abc")
    untouched = {job_id: await h.row(job_id) for job_id in (fresh, nearly_now)}

    report = await h.reaper.run_once()

    assert sorted(report.rescued) == sorted(
        [
            (retried, "r.work", "pending"),
            (exhausted, "r.work", "failed"),
            (cancelled, "r.work", "cancelled"),
            (future, "r.work", "pending"),
        ]
    )
    for job_id, before in untouched.items():
        assert await h.row(job_id) == before, "a job heartbeated within stale_after is alive"

    # The lost attempt is recorded as failed, whatever comes next.
    for job_id, attempt in ((retried, 2), (exhausted, 3), (cancelled, 1), (future, 1)):
        row = await h.row(job_id)
        assert row["attempts"] == attempt, "a rescue spends no attempt of its own"
        (entry,) = json.loads(row["errors"])
        assert entry["attempt"] == attempt and entry["traceback"] is None
        assert entry["error"] == row["last_error"]
    # Retried after the policy's delay for its failed attempt (100 s per attempt here),
    # counted from the rescue, on the database clock.
    row = await h.row(retried)
    assert re.fullmatch(
        r"stale: owner stopped heartbeating \(owner dead-1-abc, last heartbeat 360\ds ago\)",
        row["last_error"],
    ), row["last_error"]
    assert (row["status"], row["finished_at"]) == ("pending", None)
    assert (row["run_at"] - row["last_error_at"]).total_seconds() == 200.0
    row = await h.row(exhausted)
    assert row["status"] == "failed" and row["finished_at"] is not None
    assert row["last_error"].startswith("stale: owner stopped heartbeating")
    row = await h.row(cancelled)
    assert row["status"] == "cancelled" and row["finished_at"] is not None
    row = await h.row(future)
    assert row["status"] == "pending"
    assert "is in the future, owner dead-1-abc" in row["last_error"], row["last_error"]
    assert (row["run_at"] - row["last_error_at"]).total_seconds() == 100.0

    assert h.counted("dispatcher_jobs_rescued_total", type="r.work") == 4
    assert h.counted("dispatcher_jobs_failed_total", type="r.work") == 1
    assert h.counted("dispatcher_reaper_runs_total") == 1
    # Nothing left to rescue: a second pass changes nothing.
    assert (await h.reaper.run_once()).rescued == []
    assert h.counted("dispatcher_jobs_rescued_total", type="r.work") == 4


async def test_a_job_its_live_owner_lists_as_locked_is_spared_until_the_listing_is_stale(
    harness: Harness,
) -> None:
    # The owner heartbeats with SKIP LOCKED: a row another session holds locked ages
    # while its attempt runs, and the owner says so in replicas.locked_job_ids.
    h = harness
    locked = await h.processing(owner="busy-1-abc")
    await h.conn.execute(
        f'INSERT INTO "{h.db.schema}".replicas '
        "(id, name, host, pid, version, locked_job_ids, locked_job_ids_at) "
        "VALUES ('busy-1-abc', 'busy', 'h', 1, 'v', ARRAY[$1::bigint], now())",
        locked,
    )
    orphan = await h.processing(owner="busy-1-abc")  # stale, and not in its owner's list

    assert await h.reaper.rescue_stale() == [(orphan, "r.work", "pending")]
    assert (await h.row(locked))["status"] == "processing"

    # The owner stopped saying so (it died, or its listing is older than stale_after).
    await h.conn.execute(
        f'UPDATE "{h.db.schema}".replicas SET locked_job_ids_at = now() - make_interval('
        "secs => $1)",
        STALE_AFTER + 1,
    )
    assert await h.reaper.rescue_stale() == [(locked, "r.work", "pending")]
    assert h.counted("dispatcher_jobs_rescued_total", type="r.work") == 2


async def test_one_pass_rescues_every_batch(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    monkeypatch.setattr(reaper_module, "BATCH", 3)
    await h.conn.execute(
        f"INSERT INTO {h.db.jobs} (type, status, attempts, max_attempts, owner, heartbeat_at) "
        "SELECT 'r.work', 'processing', 1, 3, 'dead-1-abc', now() - interval '1 hour' "
        "FROM generate_series(1, 10)"
    )

    report = await h.reaper.run_once()

    assert len(report.rescued) == 10, "four batches of at most 3, in one pass"
    assert {status for _, _, status in report.rescued} == {"pending"}
    left = await h.conn.fetchval(f"SELECT count(*) FROM {h.db.jobs} WHERE status = 'processing'")
    assert left == 0
    assert h.counted("dispatcher_jobs_rescued_total", type="r.work") == 10


async def test_a_job_nobody_has_an_executor_for_fails_after_the_grace_period(
    harness: Harness,
) -> None:
    h = harness
    jobs = f"{h.db.jobs} (type, run_at) VALUES ($1, now() - make_interval(secs => $2))"
    overdue = await h.conn.fetchval(f"INSERT INTO {jobs} RETURNING id", "r.unknown", GRACE + 60)
    within_grace = await h.conn.fetchval(f"INSERT INTO {jobs} RETURNING id", "r.unknown", 1.0)
    # A type another live replica runs (a rolling deploy): it will claim it.
    elsewhere = await h.conn.fetchval(f"INSERT INTO {jobs} RETURNING id", "r.elsewhere", GRACE + 60)
    await h.conn.execute(
        f'INSERT INTO "{h.db.schema}".replicas (id, name, host, pid, version, job_types) '
        "VALUES ('newer-1-abc', 'newer', 'h', 1, 'v', ARRAY['r.elsewhere'])"
    )
    # And one of our own types, long due (the claim loop's business, not the reaper's).
    ours = await h.conn.fetchval(f"INSERT INTO {jobs} RETURNING id", "r.work", GRACE + 60)

    report = await h.reaper.run_once()

    assert report.without_executor == [overdue]
    row = await h.row(overdue)
    assert row["status"] == "failed" and row["finished_at"] is not None
    assert "no executor registered for type 'r.unknown'" in row["last_error"], row["last_error"]
    for job_id in (within_grace, elsewhere, ours):
        assert (await h.row(job_id))["status"] == "pending"
    assert h.counted("dispatcher_jobs_failed_total", type="r.unknown") == 1


async def test_prune_deletes_only_jobs_past_their_retention(
    db: TestDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    metrics = Metrics()
    reaper = make_reaper(pool, db.schema, make_app(), metrics)
    conn = await db.connect()
    try:
        await conn.execute(
            f"""
            INSERT INTO {db.jobs} (type, status, finished_at)
            SELECT 'old', s, now() - a
            FROM (VALUES ('completed', interval '2 days'), ('cancelled', interval '2 days'),
                         ('failed', interval '2 days'), ('failed', interval '15 days'),
                         ('completed', interval '1 hour')) AS v(s, a),
                 generate_series(1, 2500)
            """
        )
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 'todo' FROM generate_series(1, 10)"
        )
        monkeypatch.setattr(reaper_module, "PRUNE_BATCH", 1000)  # several batches per status
        pruned = await reaper.prune_finished()
        left = {
            (r["status"], r["old"]): r["n"]
            for r in await conn.fetch(
                f"SELECT status, finished_at < now() - interval '1 day' AS old, count(*) AS n "
                f"FROM {db.jobs} GROUP BY 1, 2"
            )
        }
    finally:
        await conn.close()
        await pool.close()
    assert pruned == 2500 * 3  # completed + cancelled past a day, failed past 14 days
    assert left == {
        ("failed", True): 2500,  # 2 days old: within the 14-day dead-letter retention
        ("completed", False): 2500,  # an hour old
        ("pending", None): 10,
    }
    assert metrics.registry.get_sample_value("dispatcher_jobs_pruned_total") == 7500


async def test_a_replica_whose_session_ended_has_its_async_jobs_rescued_after_the_grace(
    harness: Harness,
) -> None:
    h = harness
    dead = await h.replica_with_session("dead-2-abc", ["r.work"])
    alive = await h.replica_with_session("alive-2-abc", ["r.work"])
    try:
        # Heartbeated just now: stale_after is far away, only the session can tell.
        orphan = await h.processing(heartbeat="now()", owner="dead-2-abc", attempts=1)
        threaded = await h.processing(heartbeat="now()", owner="dead-2-abc", type_="r.thread")
        running = await h.processing(heartbeat="now()", owner="alive-2-abc")
        assert await h.orphaned_owners() == []
        assert await h.reaper.rescue_orphaned() == []

        dead_pid = dead.get_server_pid()
        await dead.close()
        await eventually(
            lambda: h.orphaned_owners(), timeout=10, what="the closed session's lock to be free"
        )
        # First sighting: the owner gets orphan_grace to have stopped its attempts.
        assert await h.reaper.rescue_orphaned() == []
        assert (await h.row(orphan))["status"] == "processing"

        rescued = await eventually(
            h.reaper.rescue_orphaned, timeout=10, what="the orphan's rescue after the grace"
        )
        assert rescued == [(orphan, "r.work", "pending")]
        row = await h.row(orphan)
        assert row["owner"] == "dead-2-abc" and row["attempts"] == 1
        assert row["last_error"] == (
            "orphaned: owner dead-2-abc lost its database session (its process died or was cut off)"
        )
        # A plain def executor's thread cannot be stopped at once: stale_after path.
        assert (await h.row(threaded))["status"] == "processing"
        assert (await h.row(running))["status"] == "processing"
        assert await h.orphaned_owners() == [("dead-2-abc", dead_pid)]
        assert await h.reaper.rescue_orphaned() == []
    finally:
        await alive.close()


async def test_a_free_session_lock_proves_nothing_on_another_server_run(harness: Harness) -> None:
    h = harness
    session = await h.replica_with_session("restarted-1-abc", ["r.work"])
    pid = session.get_server_pid()
    await session.close()
    await eventually(h.orphaned_owners, timeout=10, what="the closed session's lock to be free")
    assert await h.orphaned_owners() == [("restarted-1-abc", pid)]
    # Recorded before a restart (or on the primary before a fail-over): here nobody
    # holds anything yet, so a free lock says nothing about the replica.
    await h.conn.execute(
        f'UPDATE "{h.db.schema}".replicas '
        "SET session_server_started = session_server_started - interval '1 hour'"
    )
    assert await h.orphaned_owners() == []
