"""Rows other services insert with plain SQL that can never run (issue 13): refused at
insert by named constraints, failed by the upgrade if they predate them, and never able
to stop the jobs of other rows or types."""

from __future__ import annotations

import time

import asyncpg
import pytest

from dispatcher.core.app import App
from dispatcher.database.migrate import migrate
from dispatcher.services.job import Job
from tests.support.database import PostgresServer, TestDatabase
from tests.support.hostile_rows import (
    REFUSED_DEPENDENCY_ROWS,
    REFUSED_ROWS,
    REFUSED_TRACE_CONTEXT_ROWS,
)
from tests.support.runtimes import FAST_SETTINGS, StartRuntime
from tests.support.waiting import eventually

STALE_AFTER = float(FAST_SETTINGS["stale_after"])

HOSTILE = REFUSED_ROWS + REFUSED_DEPENDENCY_ROWS + REFUSED_TRACE_CONTEXT_ROWS


@pytest.mark.parametrize(("what", "columns", "values", "constraint"), HOSTILE)
async def test_a_row_that_can_never_run_is_refused_at_insert(
    db: TestDatabase, what: str, columns: str, values: str, constraint: str
) -> None:
    conn = await db.connect()
    try:
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            await conn.execute(f"INSERT INTO {db.jobs} ({columns}) VALUES ({values})")
    finally:
        await conn.close()
    assert refused.value.constraint_name == constraint, what


async def test_the_payload_limit_is_one_function_an_operator_can_change(db: TestDatabase) -> None:
    conn = await db.connect()
    try:
        big = "jsonb_build_object('blob', repeat('x', 2 * 1024 * 1024))"
        await conn.execute(
            f'CREATE OR REPLACE FUNCTION "{db.schema}".max_payload_bytes() RETURNS integer '
            "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 8388608'"
        )
        await conn.execute(f"INSERT INTO {db.jobs} (type, payload) VALUES ('h.ok', {big})")
    finally:
        await conn.close()


async def test_an_upgrade_fails_the_rows_that_can_never_run_and_keeps_the_rest(
    postgres: PostgresServer, unmigrated_schema: str
) -> None:
    # A database at 0004 already holds hostile rows: the upgrade must go through,
    # ending them failed with an error naming the column.
    conn = await asyncpg.connect(postgres.dsn)
    jobs = f'"{unmigrated_schema}".jobs'
    try:
        await migrate(conn, unmigrated_schema, up_to=4)
        good = await conn.fetchval(f"INSERT INTO {jobs} (type) VALUES ('h.ok') RETURNING id")
        done = await conn.fetchval(
            f"INSERT INTO {jobs} (type, status, attempts, payload) VALUES ('h.ok', 'completed', "
            "2147483647, jsonb_build_object('blob', repeat('x', 2 * 1024 * 1024))) RETURNING id"
        )
        hostile = {}
        for what, columns, values, _ in REFUSED_ROWS:
            hostile[what] = await conn.fetchval(
                f"INSERT INTO {jobs} ({columns}) VALUES ({values}) RETURNING id"
            )
        applied = await migrate(conn, unmigrated_schema)
        rows = {r["id"]: r for r in await conn.fetch(f"SELECT id, status, last_error FROM {jobs}")}
    finally:
        await conn.close()
    assert [m.label for m in applied][:2] == [
        "0005_refuse_rows_that_can_never_run",
        "0006_validate_row_constraints",
    ]
    assert rows[good]["status"] == "pending" and rows[done]["status"] == "completed"
    column_named = {
        "attempts": "attempts is", "max_attempts": "max_attempts is", "run_at": "run_at is",
        "processing": "processing job needs an owner", "payload": "payload is",
    }  # fmt: skip
    for what, job_id in hostile.items():
        row = rows[job_id]
        assert row["status"] == "failed", what
        assert row["last_error"].startswith("refused by migration 0005: "), what
        assert any(text in row["last_error"] for text in column_named.values()), row["last_error"]


def hostile_app(ran: list[int]) -> App:
    app = App(concurrency=20)

    @app.executor("h.ok")
    async def ok(job: Job) -> None:
        ran.append(job.id)

    @app.executor("h.one", concurrency=1)
    async def one(job: Job) -> None:
        ran.append(job.id)

    return app


async def test_hostile_rows_beside_a_normal_load_stop_no_other_job(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    ran: list[int] = []
    conn = await db.connect()
    try:
        # What the constraints cannot refuse: processing rows of an owner that does not
        # exist, with a heartbeat from the future or from now, holding h.one's only slot
        # (inserted before the replica starts, so its leader counts them from the first
        # claim: a leader counts rows processing elsewhere when elected).
        ghosts = [
            await conn.fetchval(
                f"INSERT INTO {db.jobs} (type, status, attempts, owner, heartbeat_at, "
                f"started_at) VALUES ('h.one', 'processing', 1, 'ghost', {at}, now()) "
                "RETURNING id",
            )
            for at in ("'9999-01-01'", "now()")
        ]
        await start_runtime(hostile_app(ran))
        good: list[int] = []
        refused: dict[str, str] = {}
        started = time.monotonic()
        for what, columns, values, _ in HOSTILE:
            good += await insert_good(conn, db, 10)
            try:
                await conn.execute(f"INSERT INTO {db.jobs} ({columns}) VALUES ({values})")
            except asyncpg.CheckViolationError as exc:
                refused[what] = exc.constraint_name or ""
            else:
                raise AssertionError(f"accepted: {what}")
        good += await insert_good(conn, db, 3, type="h.one")

        async def all_good_completed() -> bool:
            done = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE id = ANY($1) AND status = 'completed'", good
            )
            return done == len(good)

        await eventually(
            all_good_completed,
            timeout=STALE_AFTER + 15,
            what="every good job to complete (h.one's slot back from the ghosts)",
        )
        took = time.monotonic() - started
        ghost_rows = await conn.fetch(
            f"SELECT last_error FROM {db.jobs} WHERE id = ANY($1) ORDER BY id", ghosts
        )
    finally:
        await conn.close()
    assert refused == {what: constraint for what, _, _, constraint in HOSTILE}
    assert set(good) <= set(ran) and len(ran) == len(set(ran))
    # The ghosts were rescued (then run as retries), freeing h.one's slot.
    assert "in the future" in ghost_rows[0]["last_error"]
    assert "owner stopped heartbeating (owner ghost" in ghost_rows[1]["last_error"]
    print(f"\n  {len(good)} good jobs beside {len(HOSTILE)} hostile rows: all done in {took:.1f} s")


async def insert_good(
    conn: asyncpg.Connection, db: TestDatabase, n: int, *, type: str = "h.ok"
) -> list[int]:
    rows = await conn.fetch(
        f"INSERT INTO {db.jobs} (type, payload) SELECT $1, jsonb_build_object('n', g) "
        "FROM generate_series(1, $2) AS g RETURNING id",
        type,
        n,
    )
    return [r["id"] for r in rows]
