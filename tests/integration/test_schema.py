"""The jobs table as other services see it: plain SQL inserts, defaults, constraints,
and the statement-level NOTIFY."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re

import asyncpg
import pytest

from dispatcher.core.queries import queries_for
from tests.support.database import TestDatabase, register_owner


async def test_a_plain_sql_insert_gets_every_default(db: TestDatabase) -> None:
    conn = await db.connect()
    try:
        row = await conn.fetchrow(
            f"INSERT INTO \"{db.schema}\".jobs (type, payload) VALUES ('email.send', "
            """'{"to": "a@b.c"}') RETURNING *, now() AS inserted_at"""
        )
        assert row["id"] >= 1
        assert row["status"] == "pending"
        assert row["priority"] == 0
        assert row["run_at"] == row["inserted_at"] == row["created_at"]
        assert row["attempts"] == 0
        # NULL = the executor's setting, fixed on the row at claim time.
        assert row["max_attempts"] is None
        assert row["timeout"] is None
        assert row["unique_key"] is None
        for column in ("started_at", "finished_at", "heartbeat_at", "owner", "term"):
            assert row[column] is None, column
        assert row["progress"] is None and row["result"] is None and row["last_error"] is None
        assert row["errors"] == "[]"
        assert row["cancel_requested"] is False

        bare = await conn.fetchrow(
            f"INSERT INTO \"{db.schema}\".jobs (type) VALUES ('x') RETURNING payload"
        )
        assert bare["payload"] == "{}"
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("columns", "values", "constraint"),
    [
        ("type", "''", "type_must_not_be_empty"),
        ("type", "'   '", "type_must_not_be_empty"),
        ("type, max_attempts", "'t', 0", "max_attempts_must_be_at_least_1"),
        ("type, status", "'t', 'running'", "status_must_be_a_known_job_status"),
        ("type, timeout", "'t', -5", "timeout_must_be_positive_seconds"),
        ("type, timeout", "'t', 'NaN'", "timeout_must_be_positive_seconds"),
        ("type, attempts", "'t', -1", "attempts_must_not_be_negative"),
        ("type, unique_key", "'t', ''", "unique_key_must_not_be_empty"),
        ("type, errors", "'t', '{}'", "errors_must_be_a_json_array"),
    ],
)
async def test_rows_that_can_never_run_are_refused_with_a_named_reason(
    db: TestDatabase, columns: str, values: str, constraint: str
) -> None:
    conn = await db.connect()
    try:
        with pytest.raises(asyncpg.CheckViolationError) as raised:
            await conn.execute(f'INSERT INTO "{db.schema}".jobs ({columns}) VALUES ({values})')
        assert constraint in str(raised.value)
    finally:
        await conn.close()


async def test_missing_type_is_refused(db: TestDatabase) -> None:
    conn = await db.connect()
    try:
        with pytest.raises(asyncpg.NotNullViolationError, match='"type"'):
            await conn.execute(f"INSERT INTO \"{db.schema}\".jobs (payload) VALUES ('{{}}')")
    finally:
        await conn.close()


async def test_an_insert_of_too_many_types_to_name_notifies_every_type(db: TestDatabase) -> None:
    listener = await db.connect()
    writer = await db.connect()
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(
            f"{db.schema}.jobs", lambda _conn, _pid, _channel, payload: received.put_nowait(payload)
        )
        await writer.execute(
            f'INSERT INTO "{db.schema}".jobs (type) '
            "SELECT 'a-type-with-a-rather-long-name-' || n FROM generate_series(1, 300) AS n"
        )
        assert await asyncio.wait_for(received.get(), timeout=10) == "*"
    finally:
        await listener.close()
        await writer.close()


async def test_bulk_insert_of_10000_rows_notifies_exactly_once(db: TestDatabase) -> None:
    listener = await db.connect()
    writer = await db.connect()
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(
            f"{db.schema}.jobs", lambda _conn, _pid, _channel, payload: received.put_nowait(payload)
        )
        await writer.execute(
            f'INSERT INTO "{db.schema}".jobs (type, payload) '
            "SELECT 'bulk', jsonb_build_object('n', n) FROM generate_series(1, 10000) AS n"
        )
        # A marker insert in a later transaction: notifications arrive in commit order,
        # so once the marker's arrives, everything the bulk insert sent has too.
        await writer.execute(f"INSERT INTO \"{db.schema}\".jobs (type) VALUES ('marker')")
        first = await asyncio.wait_for(received.get(), timeout=10)
        marker = await asyncio.wait_for(received.get(), timeout=10)
        # Each names its types with their earliest run_at (see claim_cursors.py).
        bulk_at = await writer.fetchval(
            f"SELECT extract(epoch FROM min(run_at)) FROM \"{db.schema}\".jobs WHERE type = 'bulk'"
        )
        assert json.loads(first) == {"bulk": float(bulk_at)}
        assert list(json.loads(marker)) == ["marker"]
        assert received.empty(), f"{received.qsize()} extra notifications"
        count = await writer.fetchval(
            f"SELECT count(*) FROM \"{db.schema}\".jobs WHERE type = 'bulk'"
        )
        assert count == 10000
    finally:
        await listener.close()
        await writer.close()


async def test_copy_notifies_once_too(db: TestDatabase) -> None:
    listener = await db.connect()
    writer = await db.connect()
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(
            f"{db.schema}.jobs", lambda _conn, _pid, _channel, payload: received.put_nowait(payload)
        )
        await writer.copy_records_to_table(
            "jobs", schema_name=db.schema, columns=["type"], records=[("c",)] * 5000
        )
        await writer.execute(f"INSERT INTO \"{db.schema}\".jobs (type) VALUES ('marker')")
        await asyncio.wait_for(received.get(), timeout=10)
        await asyncio.wait_for(received.get(), timeout=10)
        assert received.empty()
    finally:
        await listener.close()
        await writer.close()


async def test_claim_and_reap_queries_use_their_partial_indexes(db: TestDatabase) -> None:
    conn = await db.connect()
    try:
        await conn.execute(
            f'INSERT INTO "{db.schema}".jobs (type, status, finished_at) '
            "SELECT 'done', 'completed', now() FROM generate_series(1, 20000)"
        )
        await conn.execute(
            f"INSERT INTO \"{db.schema}\".jobs (type) SELECT 'todo' FROM generate_series(1, 50)"
        )
        await conn.execute(f'ANALYZE "{db.schema}".jobs')
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                f"EXPLAIN SELECT id FROM \"{db.schema}\".jobs WHERE status = 'pending' "
                "AND type = 'todo' AND run_at <= now() ORDER BY priority, run_at, id LIMIT 10"
            )
        )
        assert "jobs_pending_claim_idx" in plan, plan
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                f"EXPLAIN SELECT id FROM \"{db.schema}\".jobs WHERE status = 'processing' "
                "AND heartbeat_at < now() - interval '30 seconds'"
            )
        )
        assert "jobs_processing_idx" in plan, plan
    finally:
        await conn.close()


async def elect_claimer(conn: asyncpg.Connection, schema: str) -> None:
    """Make owner "claimer" a registered replica leading a term (what claim_jobs fences on)."""
    await register_owner(conn, schema, "claimer")
    await conn.execute(
        queries_for(schema)["leader_try_elect"], f"dispatcher:leader:{schema}", "claimer", 60.0
    )


async def claim_args(
    conn: asyncpg.Connection,
    schema: str,
    *,
    free: int = 250,
    batch: int | None = None,
    hint: int | None = None,
    since: tuple[dt.datetime, int] | None = None,
) -> tuple[object, ...]:
    """claim_jobs' arguments for "claimer" (elect_claimer) under its term: up to ``free``
    't' jobs, ``batch`` in all (default ``free``), priority hint ``hint``, scan start
    after ``since``."""
    term = await conn.fetchval(f'SELECT term FROM "{schema}".leader')
    return (
        term, "claimer", ["t"], [free], free if batch is None else batch, [3], [None], 1,
        [hint], [since[0] if since else None], [since[1] if since else None],
    )  # fmt: skip


async def claim_buffers(conn: asyncpg.Connection, schema: str) -> tuple[int, int]:
    """(rows claimed, shared buffers read to find them) by one claim of up to 250 't'
    jobs, run under EXPLAIN ANALYZE and rolled back."""
    q = queries_for(schema)
    args = await claim_args(conn, schema)
    plan = (await explain_rolled_back(conn, "ANALYZE, BUFFERS", q["claim_jobs"], args)).split("\n")
    # PostgreSQL 18 prints actual rows with decimals ("rows=10.00").
    claimed = int(float(plan[0].split("rows=")[-1].split()[0]))
    # The finding of the jobs alone: the plan of the "picked" CTE (the update after it
    # writes into every index, whose depth grows with the table).
    picking = plan[next(i for i, line in enumerate(plan) if "CTE picked" in line) :]
    buffers = next(line for line in picking if "Buffers:" in line)
    touched = sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", buffers))
    return claimed, touched


async def test_the_claim_never_walks_jobs_scheduled_later(db: TestDatabase) -> None:
    # 100,000 jobs scheduled tomorrow at a better priority sit first in the claim index;
    # each claim once read past all of them to reach the due ones (16.5 ms instead of
    # 0.07 ms for 150,000). A claim now probes each priority for due jobs.
    conn = await db.connect()
    try:
        await elect_claimer(conn, db.schema)
        await conn.execute(f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, 10)")
        await conn.execute(f"ANALYZE {db.jobs}")
        claimed, without_future = await claim_buffers(conn, db.schema)
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, priority, run_at) "
            "SELECT 't', -1, now() + interval '1 day' FROM generate_series(1, 100000)"
        )
        await conn.execute(f"ANALYZE {db.jobs}")
        claimed_beside, with_future = await claim_buffers(conn, db.schema)
    finally:
        await conn.close()
    assert claimed == claimed_beside == 10
    # A walk through 100,000 index entries reads hundreds of pages; a probe a few.
    assert with_future - without_future < 30, (without_future, with_future)


async def test_a_claim_locks_no_more_due_jobs_than_it_may_take(db: TestDatabase) -> None:
    # More slots free than one claim may take ($5, a quarter of the limit at 1,000
    # slots): the claim locked as many due jobs as the type had free slots, then kept
    # the first $5, so at 1,000 slots it locked 750 rows to start 250. A row lock is a
    # write (the row's xmax and a WAL record), and the next claim meets those rows again.
    # A row locked and let go keeps the claim's transaction id as its xmax.
    conn = await db.connect()
    try:
        await elect_claimer(conn, db.schema)
        await conn.execute(f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, 1000)")
        claimed = await conn.fetch(
            queries_for(db.schema)["claim_jobs"],
            *await claim_args(conn, db.schema, free=750, batch=250),
        )
        locked_not_taken = await conn.fetchval(
            f"SELECT count(*) FROM {db.jobs} WHERE status = 'pending' AND xmax::text <> '0'"
        )
    finally:
        await conn.close()
    assert len(claimed) == 250
    assert locked_not_taken == 0, f"{locked_not_taken} due jobs locked and left pending"


async def test_a_claim_from_where_the_last_one_stopped_spares_the_walk_a_held_snapshot_leaves(
    db: TestDatabase,
) -> None:
    # Another session's snapshot keeps the index entries of every job claimed since it
    # began, and the claim's range scan from the first due job visited each of them.
    # Started after the last job the type's last claim took, it does not.
    conn = await db.connect()
    holder = await db.connect()
    try:
        await elect_claimer(conn, db.schema)
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT txid_current()")
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, 20000)"
        )
        # As the last claims left them: processing or done, in one COPY's run_at.
        await conn.execute(
            f"UPDATE {db.jobs} SET status = 'completed', finished_at = now() WHERE type = 't'"
        )
        last = await conn.fetchrow(f"SELECT run_at, id FROM {db.jobs} ORDER BY id DESC LIMIT 1")
        await conn.execute(f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, 10)")
        await conn.execute(f"ANALYZE {db.jobs}")
        walked = await range_scan_buffers(conn, db.schema, None)
        started_after = await range_scan_buffers(conn, db.schema, (last[0], last[1]))
    finally:
        await holder.close()
        await conn.close()
    # Buffers, not entries: the scan reads each page of the 20,000 dead versions and
    # their index entries once (about 380 here, 9.5 ms), and 4 when it starts after
    # them (0.02 ms).
    assert walked > 200, walked
    assert started_after < 20, started_after


async def range_scan_buffers(
    conn: asyncpg.Connection, schema: str, since: tuple[dt.datetime, int] | None
) -> int:
    """Buffers the claim's range scan of the claim index reads in one claim of 't' jobs
    at priority hint 0 starting after ``since``, under EXPLAIN ANALYZE, rolled back."""
    q = queries_for(schema)
    args = await claim_args(conn, schema, hint=0, since=since)
    plan = (await explain_rolled_back(conn, "ANALYZE, BUFFERS", q["claim_jobs"], args)).split("\n")
    scan = next(i for i, line in enumerate(plan) if "ROW(run_at, id) >" in line)
    buffers = next(line for line in plan[scan:] if "Buffers:" in line)
    return sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", buffers))


async def claim_rows(
    conn: asyncpg.Connection,
    schema: str,
    hint: int | None,
    n: int,
    since: tuple[dt.datetime, int] | None = None,
) -> list[asyncpg.Record]:
    """Claim up to ``n`` 't' jobs with priority hint ``hint`` (and scan start
    ``since``), rolled back."""
    q = queries_for(schema)
    args = await claim_args(conn, schema, free=n, hint=hint, since=since)
    claim = conn.transaction()
    await claim.start()
    try:
        rows: list[asyncpg.Record] = await conn.fetch(q["claim_jobs"], *args)
    finally:
        await claim.rollback()
    return rows


@pytest.mark.parametrize("hint", [None, -5, -2, 0, 1, 3, 7])
async def test_a_priority_hint_never_hides_a_job(db: TestDatabase, hint: int | None) -> None:
    # The hint is only where the scan starts: jobs at a better priority, at the hint's,
    # and at worse ones are all claimed, in priority order, whatever it says.
    conn = await db.connect()
    try:
        await elect_claimer(conn, db.schema)
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, priority) SELECT 't', p FROM unnest($1::int[]) p",
            [3, 0, -2, 0, 3, -2],
        )
        claimed = [r["priority"] for r in await claim_rows(conn, db.schema, hint, 10)]
        first_two = [r["priority"] for r in await claim_rows(conn, db.schema, hint, 2)]
    finally:
        await conn.close()
    assert claimed == [-2, -2, 0, 0, 3, 3]
    assert first_two == [-2, -2]


async def test_a_scan_start_skips_only_the_jobs_before_it_at_the_hints_priority(
    db: TestDatabase,
) -> None:
    conn = await db.connect()
    try:
        await elect_claimer(conn, db.schema)
        rows = await conn.fetch(
            f"INSERT INTO {db.jobs} (type, priority) SELECT 't', p FROM unnest($1::int[]) p "
            "RETURNING id, priority, run_at",
            [3, 0, -2, 0, 3, -2, 0],
        )
        at_zero = [r for r in rows if r["priority"] == 0]  # one run_at: the id decides
        since = (at_zero[0]["run_at"], at_zero[0]["id"])
        claimed = await claim_rows(conn, db.schema, 0, 10, since)
    finally:
        await conn.close()
    assert [r["priority"] for r in claimed] == [-2, -2, 0, 0, 3, 3]
    assert {r["id"] for r in claimed if r["priority"] == 0} == {r["id"] for r in at_zero[1:]}


async def test_a_right_priority_hint_spares_the_walk_a_held_snapshot_leaves(
    db: TestDatabase,
) -> None:
    # Another session's snapshot (a long transaction) keeps the index entries of every
    # job claimed since it began: the claim's first probe for the best pending priority
    # visited each of them. Started at the priority the last claim took, it does not.
    conn = await db.connect()
    holder = await db.connect()
    try:
        await elect_claimer(conn, db.schema)
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT txid_current()")
        await conn.execute(f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, 3000)")
        await conn.execute(
            f"UPDATE {db.jobs} SET status = 'completed', finished_at = now() WHERE type = 't'"
        )
        await conn.execute(f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, 10)")
        fetches = {hint: await probe_heap_fetches(conn, db.schema, hint) for hint in (None, 0)}
    finally:
        await holder.close()
        await conn.close()
    assert fetches[None] >= 3000, fetches
    assert fetches[0] < 100, fetches


async def test_the_wait_for_the_next_due_job_starts_at_the_hint_too(db: TestDatabase) -> None:
    # next_due_in (run after every claim that left slots free) probed a type's best
    # pending priority from the start of the type, walking what a held snapshot keeps.
    conn = await db.connect()
    holder = await db.connect()
    try:
        q = queries_for(db.schema)
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT txid_current()")
        await conn.execute(f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, 3000)")
        await conn.execute(
            f"UPDATE {db.jobs} SET status = 'completed', finished_at = now() WHERE type = 't'"
        )
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, run_at) VALUES ('t', now() + interval '1 hour')"
        )
        fetches = {}
        for hint in (None, 0):
            plan = await explain_rolled_back(
                conn, "ANALYZE, BUFFERS", q["next_due_in"], (["t"], [hint])
            )
            fetches[hint] = sum(int(float(n)) for n in re.findall(r"Heap Fetches: ([\d.]+)", plan))
        due_in = await conn.fetchval(q["next_due_in"], ["t"], [0])
    finally:
        await holder.close()
        await conn.close()
    assert 3500 < due_in <= 3600
    assert fetches[None] >= 3000, fetches
    assert fetches[0] < 100, fetches


async def test_statements_that_find_our_rows_by_id_probe_them_however_many_dead_entries(
    db: TestDatabase,
) -> None:
    # Completions, heartbeats and progress find a replica's running rows by id. The
    # processing index once held (type, owner): the planner scanned it for an owner (its
    # statistics count the live rows, not the dead entries that pile up between vacuums
    # and under a snapshot held elsewhere) and read 900+ buffers to complete 8 jobs
    # through a held snapshot. Keyed on id (migration 0010) it is probed row by row.
    conn = await db.connect()
    holder = await db.connect()
    try:
        q = queries_for(db.schema)
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, 20000)"
        )
        # Statistics as a busy queue's often are: taken when nothing was processing.
        await conn.execute(f"ANALYZE {db.jobs}")
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT txid_current()")
        # 20,000 jobs that ran under this owner since the snapshot began: dead entries.
        await conn.execute(
            f"UPDATE {db.jobs} SET status = 'processing', owner = 'o', attempts = 1, "
            "started_at = now(), heartbeat_at = now()"
        )
        await conn.execute(f"UPDATE {db.jobs} SET status = 'completed', finished_at = now()")
        ids = await conn.fetch(
            f"INSERT INTO {db.jobs} (type, status, owner, attempts, started_at, heartbeat_at) "
            "SELECT 'u', 'processing', 'o', 1, now(), now() FROM generate_series(1, 8) "
            "RETURNING id"
        )
        await conn.execute("SET plan_cache_mode = force_custom_plan")  # as the runtime pool
        job_ids = [r["id"] for r in ids]
        n = len(job_ids)
        statements = {
            "complete_jobs": (
                "o", job_ids, [1] * n, ["completed"] * n, ["null"] * n, [None] * n,
                [None] * n, [0.0] * n, "500ms",
            ),
            "heartbeat_jobs": ("o", job_ids, [1] * n),
            "update_progress": ("o", job_ids, [1] * n, ["{}"] * n),
        }  # fmt: skip
        buffers = {}
        for name, args in statements.items():
            plan = await explain_rolled_back(conn, "ANALYZE, BUFFERS", q[name], args)
            assert "Seq Scan on jobs" not in plan, f"{name}:\n{plan}"
            buffers[name] = int(re.findall(r"Buffers: shared hit=(\d+)", plan)[0])
    finally:
        await holder.close()
        await conn.close()
    # Some 100 buffers for 8 rows written (heap, and each index the new versions
    # enter); a scan of the 20,000 dead entries adds hundreds.
    assert all(b < 300 for b in buffers.values()), buffers


async def test_batch_statements_cost_in_proportion_to_the_batch_whatever_the_statistics(
    db: TestDatabase,
) -> None:
    # Statistics taken while nothing ran (a busy queue's usual state after autovacuum;
    # a replica's owner id is never in them) made the running rows look like one, and
    # the planner joined each row it found to a rescan of the whole batch: 250 x 250
    # rows for 250 jobs, 47 ms instead of 4 for a completion. Completions, heartbeats
    # and progress writes now find the rows by id and read the batch once.
    conn = await db.connect()
    try:
        q = queries_for(db.schema)
        await conn.execute(f"ALTER TABLE {db.jobs} SET (autovacuum_enabled = false)")
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 't' FROM generate_series(1, 30000)"
        )
        # 20,000 jobs ran before the statistics were taken, none is running now.
        await conn.execute(
            f"UPDATE {db.jobs} SET status = 'processing', owner = 'o', attempts = 1, "
            "started_at = now(), heartbeat_at = now() WHERE id <= 20000"
        )
        await conn.execute(
            f"UPDATE {db.jobs} SET status = 'completed', finished_at = now() WHERE id <= 20000"
        )
        await conn.execute(f"VACUUM ANALYZE {db.jobs}")
        n = 250
        job_ids = [
            r["id"]
            for r in await conn.fetch(
                f"UPDATE {db.jobs} SET status = 'processing', owner = 'o', attempts = 1, "
                "started_at = now(), heartbeat_at = now() WHERE id > 20000 AND id <= $1 "
                "RETURNING id",
                20000 + n,
            )
        ]
        await conn.execute("SET plan_cache_mode = force_custom_plan")  # as the runtime pool
        statements = {
            "heartbeat_jobs": ("o", job_ids, [1] * n),
            "update_progress": ("o", job_ids, [1] * n, ["{}"] * n),
            "complete_jobs": (
                "o", job_ids, [1] * n, ["completed"] * n, ["null"] * n, [None] * n,
                [None] * n, [0.0] * n, "500ms",
            ),
        }  # fmt: skip
        plans, written = {}, {}
        for name, args in statements.items():
            plans[name] = await explain_rolled_back(conn, "ANALYZE", q[name], args)
            written[name] = len(await conn.fetch(q[name], *args))
    finally:
        await conn.close()
    for name, plan in plans.items():
        batch_scans = re.findall(r"(?:Function|CTE) Scan on [hpo](?:_\d+)? .* loops=(\d+)", plan)
        assert batch_scans and set(batch_scans) == {"1"}, f"{name}:\n{plan}"
        removed = [int(r) for r in re.findall(r"Rows Removed by Join Filter: (\d+)", plan)]
        assert all(r < n for r in removed), f"{name}:\n{plan}"
    assert written == {"heartbeat_jobs": n, "update_progress": n, "complete_jobs": n}


async def explain_rolled_back(
    conn: asyncpg.Connection, options: str, sql: str, args: tuple[object, ...]
) -> str:
    """EXPLAIN (``options``) of ``sql`` run with ``args`` in a transaction rolled back."""
    statement = conn.transaction()
    await statement.start()
    try:
        rows = await conn.fetch(f"EXPLAIN ({options}) " + sql, *args)
    finally:
        await statement.rollback()
    return "\n".join(r[0] for r in rows)


async def probe_heap_fetches(conn: asyncpg.Connection, schema: str, hint: int | None) -> int:
    """Heap fetches of the claim's priority probes (the "priorities" CTE), under
    EXPLAIN ANALYZE of one claim of 't' jobs with ``hint``, rolled back."""
    q = queries_for(schema)
    args = await claim_args(conn, schema, hint=hint)
    plan = (await explain_rolled_back(conn, "ANALYZE, BUFFERS", q["claim_jobs"], args)).split("\n")
    start = next(i for i, line in enumerate(plan) if "CTE priorities" in line)
    end = next(i for i, line in enumerate(plan) if "CTE picked" in line)
    return sum(
        int(float(n)) for n in re.findall(r"Heap Fetches: ([\d.]+)", "\n".join(plan[start:end]))
    )


async def test_one_active_job_per_type_and_unique_key(db: TestDatabase) -> None:
    conn = await db.connect()
    try:
        table = f'"{db.schema}".jobs'
        await conn.execute(f"INSERT INTO {table} (type, unique_key) VALUES ('t', 'k')")
        with pytest.raises(asyncpg.UniqueViolationError, match="jobs_unique_active_idx"):
            await conn.execute(f"INSERT INTO {table} (type, unique_key) VALUES ('t', 'k')")
        # Another type, or a finished job with the key, does not conflict.
        await conn.execute(f"INSERT INTO {table} (type, unique_key) VALUES ('other', 'k')")
        await conn.execute(f"UPDATE {table} SET status = 'completed' WHERE type = 't'")
        await conn.execute(f"INSERT INTO {table} (type, unique_key) VALUES ('t', 'k')")
    finally:
        await conn.close()
