"""Group commit: batching, fencing, isolation of an outcome the database refuses, and
attempts taken from their owner."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.services.completer import Completer
from dispatcher.services.executor import CancelReason, Outcome, OutcomeKind
from tests.support.apps import make_app
from tests.support.database import TestDatabase, register_owner
from tests.support.runtimes import StartRuntime, held_attempt
from tests.support.waiting import eventually


async def claim(conn: asyncpg.Connection, db: TestDatabase, owner: str, n: int) -> list[int]:
    """Claim n jobs the way the leader does (term 1 under holder ``owner``)."""
    await conn.execute(f'UPDATE "{db.schema}".leader SET term = 1, holder = $1', owner)
    await register_owner(conn, db.schema, owner)
    await conn.execute(f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, $1)", n)
    rows = await conn.fetch(
        queries_for(db.schema)["claim_jobs"],
        1,
        owner,
        ["t"],
        [n],
        n,
        [3],
        [None],
        1,
        [None],
        [None],
        [None],
    )
    return sorted(r["id"] for r in rows)


async def test_one_statement_for_a_batch_and_a_bad_outcome_is_isolated(db: TestDatabase) -> None:
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    conn = await db.connect()
    batches: list[tuple[list[Outcome], dict[tuple[int, int], str]]] = []
    metrics = Metrics()
    completer = Completer(
        pool, db.schema, "me", lambda b, w: batches.append((b, w)), metrics=metrics
    )
    task = asyncio.create_task(completer.run())
    try:
        ids = await claim(conn, db, "me", 50)
        for job_id in ids[:-1]:
            completer.submit(Outcome(job_id, 1, "t", OutcomeKind.COMPLETED, result_json='{"ok":1}'))
        # JSON that jsonb refuses gets past no check of ours only if someone forges it:
        completer.submit(Outcome(ids[-1], 1, "t", OutcomeKind.COMPLETED, result_json="{bad"))
        assert await completer.flush(10)
        rows = {
            r["id"]: r
            for r in await conn.fetch(f"SELECT id, status, result, last_error FROM {db.jobs}")
        }
    finally:
        task.cancel()
        await pool.close()
        await conn.close()
    assert [rows[i]["status"] for i in ids[:-1]] == ["completed"] * 49
    assert json.loads(rows[ids[0]]["result"]) == {"ok": 1}
    bad = rows[ids[-1]]
    assert bad["status"] == "failed"
    assert bad["last_error"].startswith("the outcome could not be stored: ")
    assert sum(len(b) for b, _ in batches) == 50
    assert len(batches) == 1, "the whole batch is released after one write pass"


async def test_outcomes_of_attempts_we_no_longer_own_are_fenced(db: TestDatabase) -> None:
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    conn = await db.connect()
    written: list[dict[tuple[int, int], str]] = []
    metrics = Metrics()
    completer = Completer(pool, db.schema, "me", lambda b, w: written.append(w), metrics=metrics)
    task = asyncio.create_task(completer.run())
    try:
        (job_id,) = await claim(conn, db, "me", 1)
        # The reaper rescued it and another owner runs attempt 2 now.
        await conn.execute(
            f"UPDATE {db.jobs} SET owner = 'other', attempts = 2 WHERE id = $1", job_id
        )
        completer.submit(Outcome(job_id, 1, "t", OutcomeKind.COMPLETED))
        assert await completer.flush(10)
        status = await conn.fetchval(f"SELECT status FROM {db.jobs} WHERE id = $1", job_id)
    finally:
        task.cancel()
        await pool.close()
        await conn.close()
    assert written == [{}]
    assert status == "processing"
    assert metrics.registry.get_sample_value("dispatcher_jobs_fenced_total", {"type": "t"}) == 1


async def test_a_running_attempt_taken_from_its_owner_is_stopped(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runtime = await start_runtime(make_app())
    conn = await db.connect()
    try:
        job_id = await conn.fetchval(
            f"INSERT INTO {db.jobs} (type) VALUES ('t.long_then_quick') RETURNING id"
        )
        attempt = await eventually(
            lambda: asyncio.sleep(0, held_attempt(runtime, job_id)),
            timeout=10,
            what="the job to start",
        )
        await conn.execute(
            f"UPDATE {db.jobs} SET owner = 'someone-else', attempts = 2 WHERE id = $1", job_id
        )
        await eventually(
            lambda: asyncio.sleep(0, held_attempt(runtime, job_id) is None),
            timeout=5,
            what="the attempt to be stopped and its slot freed",
        )
        assert attempt.cancel_reason is CancelReason.TAKEN_OVER
        row = await conn.fetchrow(f"SELECT status, owner FROM {db.jobs} WHERE id = $1", job_id)
    finally:
        await conn.close()
    assert (row["status"], row["owner"]) == ("processing", "someone-else")
