"""The execution guarantees under adversarial conditions, with in-process replicas
against a real Postgres: no job run twice at once, none stranded, none cancelled by a
stranger (issue 12; docs/reliability.md lists each scenario and its test).

Every test app writes each run of each attempt into ``attempts_log`` itself
(tests/support/attempt_log.py); overlaps are computed from that table.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from dispatcher.core.app import App
from dispatcher.core.metrics import Metrics
from dispatcher.core.retry import RetryPolicy
from dispatcher.runtime import Runtime
from dispatcher.services.job import Job
from dispatcher.services.reaper import Reaper
from tests.support.attempt_log import (
    AttemptLog,
    Run,
    create_attempts_log,
    fetch_runs,
    overlapping_runs,
)
from tests.support.database import TestDatabase
from tests.support.runtimes import FAST_SETTINGS, StartRuntime
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

STALE_AFTER = float(FAST_SETTINGS["stale_after"])
# Text only the claim statements (claim_jobs, claim_jobs_worker) contain: their fence.
CLAIM_STATEMENT = "FOR KEY SHARE"


@pytest.fixture
async def log(db: TestDatabase) -> AsyncIterator[AttemptLog]:
    conn = await db.connect()
    try:
        await create_attempts_log(conn, db.schema)
    finally:
        await conn.close()
    attempt_log = AttemptLog(db.dsn, db.schema, "in-process")
    await attempt_log.start()
    yield attempt_log
    await attempt_log.stop()


def guarantee_app(log: AttemptLog) -> App:
    app = App(concurrency=50, retry=RetryPolicy(base=0.2, cap=1.0))

    @app.executor("g.work")
    async def work(job: Job) -> dict[str, Any]:
        """Runs ``seconds``, reporting progress ten times a second."""
        async with log.run(job):
            deadline = time.monotonic() + job.payload.get("seconds", 0.1)
            step = 0
            while time.monotonic() < deadline:
                step += 1
                job.progress(step)
                await asyncio.sleep(0.1)
            return {"attempt": job.attempt}

    @app.executor("g.work_once", max_attempts=1)
    async def work_once(job: Job) -> dict[str, Any]:
        async with log.run(job):
            await asyncio.sleep(job.payload.get("seconds", 0.05))
            return {"attempt": job.attempt}

    @app.executor("g.twice")
    async def twice(job: Job) -> dict[str, Any]:
        """Attempt 1 waits until cancelled, and takes a second to stop; later attempts
        run ``seconds``."""
        async with log.run(job):
            if job.attempt == 1:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    await asyncio.sleep(1.0)  # cleanup that takes a while
                    raise
            await asyncio.sleep(job.payload["seconds"])
            return {"attempt": job.attempt}

    @app.executor("g.stubborn", timeout=0.5, max_attempts=2)
    def stubborn(job: Job) -> dict[str, Any]:
        """A plain def that ignores job.cancelled: it runs ``seconds`` whatever."""
        with log.run_in_thread(job):
            time.sleep(job.payload["seconds"])
            return {"attempt": job.attempt}

    @app.executor("g.stubborn_once", max_attempts=1)
    def stubborn_once(job: Job) -> dict[str, Any]:
        with log.run_in_thread(job):
            time.sleep(job.payload["seconds"])
            return {"attempt": job.attempt}

    return app


async def insert(
    conn: asyncpg.Connection, db: TestDatabase, type: str, payloads: list[dict[str, Any]]
) -> list[int]:
    rows = await conn.fetch(
        f"INSERT INTO {db.jobs} (type, payload) "
        "SELECT $1, p::jsonb FROM unnest($2::text[]) AS p RETURNING id",
        type,
        [json.dumps(p) for p in payloads],
    )
    return [r["id"] for r in rows]


async def wait_until_all_ended(conn: asyncpg.Connection, db: TestDatabase, timeout: float) -> None:
    async def ended() -> bool:
        left = await conn.fetchval(
            f"SELECT count(*) FROM {db.jobs} WHERE status IN ('pending', 'processing')"
        )
        return left == 0

    await eventually(ended, timeout=timeout, what="every job to end", every=0.05)


async def wait_status(
    conn: asyncpg.Connection, db: TestDatabase, job_id: int, status: str, timeout: float = 10
) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await conn.fetchrow(f"SELECT * FROM {db.jobs} WHERE id = $1", job_id)
        return row if row["status"] == status else None

    return await eventually(check, timeout=timeout, what=f"job {job_id} to be {status}")


async def idle(runtime: Runtime) -> None:
    """Every slot free again: per-type running counts all zero (as /status shows)."""
    await eventually(
        lambda: asyncio.sleep(0, runtime.running_by_type() == {}),
        timeout=10,
        what=f"running counts back to zero (now {runtime.running_by_type()})",
    )


def no_overlaps(runs: list[Run], **kwargs: Any) -> None:
    overlaps = overlapping_runs(runs, **kwargs)
    assert overlaps == [], "two runs of one job overlapped:\n" + "\n".join(
        f"  {a} and {b}" for a, b in overlaps
    )


# --- 1. one locked row ----------------------------------------------------------------


async def test_a_row_locked_by_another_session_delays_nothing_else(
    db: TestDatabase, start_runtime: StartRuntime, log: AttemptLog
) -> None:
    # A forgotten SELECT ... FOR UPDATE in psql holds one running job's row for longer
    # than stale_after. The job finishes meanwhile; other jobs come and go.
    runtime = await start_runtime(guarantee_app(log))
    conn = await db.connect()
    stranger = await db.connect()
    try:
        (locked_id,) = await insert(conn, db, "g.work", [{"seconds": 1.0}])
        await wait_status(conn, db, locked_id, "processing")
        before = await insert(conn, db, "g.work", [{"seconds": 1.5}] * 10)
        lock = stranger.transaction()
        await lock.start()
        await stranger.execute(f"SELECT 1 FROM {db.jobs} WHERE id = $1 FOR UPDATE", locked_id)
        locked_at = time.time()

        async def locked_job_ran_out() -> bool:
            runs = await log.written_runs(conn)
            return any(r.job_id == locked_id and r.ended_at is not None for r in runs)

        await eventually(locked_job_ran_out, timeout=10, what="the locked job's run to end")
        # The replica tells the reaper the row is alive though its heartbeat ages.
        listed = await eventually(
            lambda: conn.fetchval(
                f'SELECT $1 = ANY(locked_job_ids) FROM "{db.schema}".replicas WHERE id = $2',
                locked_id,
                runtime.owner_id,
            ),
            timeout=5,
            what="the locked job listed on the replica row",
        )
        assert listed
        # Jobs that run and end while the row stays locked complete: no completion batch
        # waits behind the locked row.
        during = await insert(conn, db, "g.work", [{"seconds": 0.3}] * 10)

        async def during_completed() -> bool:
            done = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE id = ANY($1) AND status = 'completed'",
                during,
            )
            return done == len(during)

        await eventually(during_completed, timeout=10, what="jobs to complete beside the lock")
        # Hold the lock past stale_after (and a reaper pass or two).
        await asyncio.sleep(max(0.0, locked_at + STALE_AFTER + 2 - time.time()))
        assert (
            await conn.fetchval(f"SELECT status FROM {db.jobs} WHERE id = $1", locked_id)
            == "processing"
        ), "the locked job's completion cannot be written while it is locked"
        await lock.commit()
        unlocked_at = time.time()
        await wait_until_all_ended(conn, db, timeout=15)
        rows = await conn.fetch(
            f"SELECT id, status, attempts, errors, "
            f"extract(epoch FROM finished_at)::float8 AS finished FROM {db.jobs}"
        )
        await idle(runtime)
        runs = await log.written_runs(conn)
    finally:
        await stranger.close()
        await conn.close()
    by_id = {row["id"]: row for row in rows}
    assert {row["status"] for row in rows} == {"completed"}
    rescued = {row["id"]: row["errors"] for row in rows if json.loads(row["errors"])}
    assert rescued == {}, "no job may be rescued while its attempt is alive"
    assert {row["attempts"] for row in rows} == {1}
    # finished_at is the writing transaction's start; its statement may have begun
    # waiting for the row (at most the completer's 500 ms lock wait) before the commit.
    assert by_id[locked_id]["finished"] >= unlocked_at - 0.55, "written once the lock was gone"
    assert max(by_id[i]["finished"] for i in during) < unlocked_at
    assert len(runs) == 1 + len(before) + len(during)
    no_overlaps(runs)


async def test_the_reaper_spares_a_stale_row_only_while_its_live_owner_lists_it(
    db: TestDatabase,
) -> None:
    conn = await db.connect()
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    try:
        owner = "r-1-abcdef"
        listed, unlisted = await conn.fetchval(
            f"WITH j AS (INSERT INTO {db.jobs} (type, status, attempts, owner, started_at, "
            f"heartbeat_at) SELECT 't', 'processing', 1, $1, now() - interval '1 minute', "
            f"now() - interval '1 minute' FROM generate_series(1, 2) RETURNING id) "
            f"SELECT array_agg(id ORDER BY id) FROM j",
            owner,
        )
        await conn.execute(
            f'INSERT INTO "{db.schema}".replicas (id, name, host, pid, version, '
            f"locked_job_ids, locked_job_ids_at) VALUES ($1, 'r', 'h', 1, 'v', $2, now())",
            owner,
            [listed],
        )
        reaper = Reaper(pool, db.schema, App(), stale_after=STALE_AFTER, interval=1,
                        replica_seen_within=STALE_AFTER, metrics=Metrics())  # fmt: skip
        assert [job_id for job_id, _, _ in await reaper.rescue_stale()] == [unlisted]
        # A listing as old as stale_after no longer vouches for the row.
        await conn.execute(
            f"UPDATE \"{db.schema}\".replicas SET locked_job_ids_at = now() - interval '1 hour'"
        )
        assert [job_id for job_id, _, _ in await reaper.rescue_stale()] == [listed]
    finally:
        await pool.close()
        await conn.close()


# --- 2. attempts are (job id, attempt) -------------------------------------------------


async def test_a_late_outcome_never_frees_a_newer_attempt_of_the_same_job(
    db: TestDatabase, start_runtime: StartRuntime, log: AttemptLog
) -> None:
    # The job is rescued from under attempt 1 (as after a pause past stale_after) and
    # this same leader claims it again: attempt 2 runs longer than stale_after, and
    # attempt 1's late (fenced) outcome arrives while it runs.
    app = guarantee_app(log)
    runtime = await start_runtime(app)
    conn = await db.connect()
    try:
        (job_id,) = await insert(conn, db, "g.twice", [{"seconds": STALE_AFTER + 1}])

        async def first_attempt_running() -> bool:
            return any(r.job_id == job_id for r in await fetch_runs(conn, db.schema))

        await eventually(first_attempt_running, timeout=10, what="attempt 1 to start")
        reaper = Reaper(runtime.pool, db.schema, app, stale_after=0.001, interval=1,
                        replica_seen_within=STALE_AFTER, metrics=Metrics())  # fmt: skip
        assert [status for _, _, status in await reaper.rescue_stale()] == ["pending"]
        row = await wait_status(conn, db, job_id, "completed", timeout=30)
        await idle(runtime)
        runs = await log.written_runs(conn)
    finally:
        await conn.close()
    assert row["attempts"] == 2, "attempt 2 was never rescued: its heartbeat went on"
    assert len(json.loads(row["errors"])) == 1, "only the rescue we forced"
    assert json.loads(row["result"]) == {"attempt": 2}
    assert [(r.attempt, r.outcome) for r in runs] == [(1, "cancelled"), (2, "completed")]
    no_overlaps(runs)


# --- 3. a claim cut short ---------------------------------------------------------------


@pytest.fixture
async def proxy(db: TestDatabase) -> AsyncIterator[TcpProxy]:
    tcp = await TcpProxy(db.dsn).start()
    yield tcp
    await tcp.close()


async def start_behind_proxy(
    db: TestDatabase, proxy: TcpProxy, app: App, **overrides: str
) -> Runtime:
    """A replica whose pool goes through the proxy (its election connection does not)."""
    from dispatcher.core.config import load_settings

    values = {**FAST_SETTINGS, "schema": db.schema, "replica_id": "proxied",
              "election_dsn": db.dsn, **overrides}  # fmt: skip
    settings, _ = load_settings(env={f"DISPATCHER_{k.upper()}": v for k, v in values.items()})
    runtime = Runtime(app, settings, dsn=proxy.dsn)
    await runtime.start()
    return runtime


async def claim_with_reply_held(
    conn: asyncpg.Connection,
    db: TestDatabase,
    runtime: Runtime,
    proxy: TcpProxy,
    type_: str,
    payloads: list[dict[str, object]],
) -> list[int]:
    """Insert jobs while the replies to the replica's claims are held, until one claim
    took them all: it committed in the database and its reply waits in the proxy."""
    # One job through first: the claim loop is up, and waiting for the next wake-up.
    (warm_up,) = await insert(conn, db, type_, [{"seconds": 0}])
    await wait_status(conn, db, warm_up, "completed")
    proxy.hold_replies(to=CLAIM_STATEMENT)
    ids = await insert(conn, db, type_, payloads)

    async def claimed() -> bool:
        # Read before the rows: a reply in the proxy means its claim has committed.
        held = proxy.held_replies > 0
        taken = await conn.fetchval(
            f"SELECT count(*) FROM {db.jobs} WHERE id = ANY($1) AND status = 'processing' "
            "AND owner = $2",
            ids,
            runtime.owner_id,
        )
        if held and taken == 0:
            # The claim held was sent before the insert committed (a poll, or the
            # warm-up's freed slot) and found nothing: let its reply through, so the
            # replica claims again, and hold that one.
            proxy.release_replies()
            proxy.hold_replies(to=CLAIM_STATEMENT)
        return taken == len(ids)

    await eventually(claimed, timeout=10, what="one claim to take them all")
    return ids


async def test_a_replica_stopped_with_a_claim_reply_in_flight_starts_its_rows(
    db: TestDatabase, proxy: TcpProxy, log: AttemptLog
) -> None:
    # SIGTERM arrives while a claim's reply is unread; the rows it committed are
    # started (and drained) or handed back, never left processing under a dead owner.
    runtime = await start_behind_proxy(db, proxy, guarantee_app(log))
    conn = await db.connect()
    try:
        ids = await claim_with_reply_held(
            conn, db, runtime, proxy, "g.work_once", [{"seconds": 0.05}] * 20
        )
        stopping = asyncio.create_task(runtime.stop())
        await eventually(
            lambda: asyncio.sleep(0, not runtime.elector.is_leader()),
            timeout=10,
            what="the replica to step down",
        )
        proxy.release_replies()
        await asyncio.wait_for(stopping, 60)
        rows = await conn.fetch(f"SELECT status, attempts FROM {db.jobs} WHERE id = ANY($1)", ids)
        left = await conn.fetchval(
            f"SELECT count(*) FROM {db.jobs} WHERE status = 'processing' AND owner = $1",
            runtime.owner_id,
        )
        runs = await log.written_runs(conn)
    finally:
        await conn.close()
    assert left == 0, "no row may stay processing under the stopped replica"
    assert [(r["status"], r["attempts"]) for r in rows] == [("completed", 1)] * len(ids)
    assert runtime.drained is True
    assert runtime.running_by_type() == {}
    assert sorted(r.job_id for r in runs if r.job_id in ids) == sorted(ids), "each ran once"
    no_overlaps(runs)


async def test_a_claim_whose_reply_is_lost_is_handed_back_at_once(
    db: TestDatabase, proxy: TcpProxy, log: AttemptLog
) -> None:
    # The connection dies after the claim committed, before its reply arrived.
    runtime = await start_behind_proxy(db, proxy, guarantee_app(log))
    conn = await db.connect()
    try:
        ids = await claim_with_reply_held(
            conn, db, runtime, proxy, "g.work_once", [{"seconds": 0.05}] * 20
        )
        await proxy.cut()
        # Handed back (attempt refunded), claimed again and run once: long before the
        # reaper could call them stale.
        await wait_until_all_ended(conn, db, timeout=15)
        rows = await conn.fetch(
            f"SELECT status, attempts, errors FROM {db.jobs} WHERE id = ANY($1)", ids
        )
        await idle(runtime)
        runs = await log.written_runs(conn)
    finally:
        await conn.close()
        await runtime.stop()
    assert [(r["status"], r["attempts"], r["errors"]) for r in rows] == [
        ("completed", 1, "[]")
    ] * len(ids)
    assert sorted(r.job_id for r in runs if r.job_id in ids) == sorted(ids), "each ran once"
    no_overlaps(runs)


async def test_a_claim_reply_read_after_the_rows_were_rescued_starts_nothing(
    db: TestDatabase, proxy: TcpProxy, log: AttemptLog
) -> None:
    # The claim committed, then its reply was held up (a paused process, a stalled
    # network) until the reaper had rescued its rows as stale. Starting them when the
    # reply finally arrives would run each job twice: now, and as its retry.
    runtime = await start_behind_proxy(db, proxy, guarantee_app(log))
    conn = await db.connect()
    try:
        ids = await claim_with_reply_held(
            conn, db, runtime, proxy, "g.work", [{"seconds": 0.2}] * 5
        )

        async def rescued() -> bool:
            n = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE id = ANY($1) AND status = 'pending' "
                "AND errors <> '[]'",
                ids,
            )
            return n == len(ids)

        await eventually(rescued, timeout=STALE_AFTER + 10, what="the reaper to rescue them")
        proxy.release_replies()
        await wait_until_all_ended(conn, db, timeout=20)
        await idle(runtime)
        runs = await log.written_runs(conn)
    finally:
        await conn.close()
        await runtime.stop()
    assert sorted(r.job_id for r in runs if r.job_id in ids) == sorted(ids), "each ran once"
    assert {r.attempt for r in runs if r.job_id in ids} == {2}


async def test_worker_mode_stop_with_a_claim_reply_in_flight_starts_its_rows(
    db: TestDatabase, proxy: TcpProxy, log: AttemptLog
) -> None:
    runtime = await start_behind_proxy(db, proxy, guarantee_app(log), mode="all")
    conn = await db.connect()
    try:
        ids = await claim_with_reply_held(
            conn, db, runtime, proxy, "g.work_once", [{"seconds": 0.05}] * 20
        )
        stopping = asyncio.create_task(runtime.stop())
        await eventually(
            lambda: asyncio.sleep(0, runtime.stopping), timeout=5, what="the stop to begin"
        )
        proxy.release_replies()
        await asyncio.wait_for(stopping, 60)
        rows = await conn.fetch(f"SELECT status, attempts FROM {db.jobs} WHERE id = ANY($1)", ids)
        runs = await log.written_runs(conn)
    finally:
        await conn.close()
    assert [(r["status"], r["attempts"]) for r in rows] == [("completed", 1)] * len(ids)
    assert runtime.drained is True
    assert runtime.running_by_type() == {}
    assert sorted(r.job_id for r in runs if r.job_id in ids) == sorted(ids), "each ran once"
    no_overlaps(runs)


# --- 4. plain def executors are live until their thread returns ------------------------


async def test_a_thread_past_its_timeout_keeps_its_attempt_live_until_it_returns(
    db: TestDatabase, start_runtime: StartRuntime, log: AttemptLog
) -> None:
    runtime = await start_runtime(guarantee_app(log))
    conn = await db.connect()
    try:
        (job_id,) = await insert(conn, db, "g.stubborn", [{"seconds": 1.5}])
        row = await wait_status(conn, db, job_id, "failed", timeout=20)
        await idle(runtime)
        runs = await log.written_runs(conn)
    finally:
        await conn.close()
    errors = json.loads(row["errors"])
    assert [e["error"] for e in errors] == ["timed out after 0.5s"] * 2
    assert [r.attempt for r in runs] == [1, 2]
    no_overlaps(runs)


async def test_shutdown_hands_a_threads_job_back_only_once_the_thread_returned(
    db: TestDatabase,
    start_runtime: StartRuntime,
    log: AttemptLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In-process (no process of its own to end), a thread that ignores job.cancelled
    # outlasts the shutdown timeout and the grace after it: its attempt stays live until
    # the thread returns, and only then is the job handed back to the other replica.
    from dispatcher.services import draining

    monkeypatch.setattr(draining, "SHUTDOWN_GRACE", 0.5)
    app = guarantee_app(log)
    first = await start_runtime(app, name="first", shutdown_timeout="0.5")
    await eventually(
        lambda: asyncio.sleep(0, first.elector.is_leader()), timeout=10, what="first leads"
    )
    second = await start_runtime(app, name="second")
    conn = await db.connect()
    try:
        (job_id,) = await insert(conn, db, "g.stubborn_once", [{"seconds": 3.0}])
        await wait_status(conn, db, job_id, "processing")
        await first.stop()
        row = await wait_status(conn, db, job_id, "completed", timeout=20)
        await idle(second)
        runs = await log.written_runs(conn)
    finally:
        await conn.close()
    assert first.drained is True
    assert row["owner"] == second.owner_id and row["attempts"] == 1
    assert len(runs) == 2
    no_overlaps(runs)


# --- 5. a cancel NOTIFY is a hint -------------------------------------------------------


async def test_a_strangers_cancel_notify_cancels_nothing(
    db: TestDatabase, start_runtime: StartRuntime, log: AttemptLog
) -> None:
    runtime = await start_runtime(guarantee_app(log))
    conn = await db.connect()
    role = f"stranger_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        (job_id,) = await insert(conn, db, "g.work", [{"seconds": 2.0}])
        await wait_status(conn, db, job_id, "processing")
        stranger = await asyncpg.connect(db.dsn, user=role)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await stranger.execute(f"UPDATE {db.jobs} SET cancel_requested = true")
            for _ in range(3):
                await stranger.execute(
                    "SELECT pg_notify($1, $2)", f"{db.schema}.cancel", str(job_id)
                )
        finally:
            await stranger.close()
        row = await wait_status(conn, db, job_id, "completed", timeout=10)
        await idle(runtime)
        runs = await log.written_runs(conn)
    finally:
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()
    assert row["cancel_requested"] is False
    assert json.loads(row["result"]) == {"attempt": 1}
    assert [(r.attempt, r.outcome) for r in runs] == [(1, "completed")]
