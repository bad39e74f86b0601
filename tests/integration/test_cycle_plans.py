"""The cycle pool's statements, planned once, stay in proportion to their batch
whatever the statistics they were planned on (dispatcher/database/pool.py).

A plan made once is kept until the table's statistics change, and it is often made
when they are least typical: on a new table, or one that was empty when last
analyzed. Each statement is planned the way the cycle pool plans it (a prepared
statement, force_generic_plan, CYCLE_PLANNING), on four tables, and its plan must
read no more of jobs than its batch: no sequential scan of jobs, no scan of a whole
index of jobs, and no nested loop that reads the batch again for each row of jobs; nor
be compiled by JIT on every run (before PostgreSQL 16 a disabled node costs 10^10,
over jit_above_cost: 1.4 s a claim).
"""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg
import pytest

from dispatcher.core.queries import queries_for
from dispatcher.database.pool import CYCLE_PLANNING
from tests.support.database import TestDatabase

CYCLE_STATEMENTS = ("claim_jobs", "complete_and_claim_jobs", "complete_jobs")

TABLES = {
    "new, never analyzed": [],
    "empty when analyzed": ["ANALYZE {jobs}"],
    "20,000 pending": [
        "INSERT INTO {jobs} (type) SELECT 't' FROM generate_series(1, 20000)",
        "ANALYZE {jobs}",
    ],
    "100,000 finished, 50 pending": [
        "INSERT INTO {jobs} (type, status, attempts, started_at, finished_at) "
        "SELECT 't', 'completed', 1, now(), now() FROM generate_series(1, 100000)",
        "INSERT INTO {jobs} (type) SELECT 't' FROM generate_series(1, 50)",
        "ANALYZE {jobs}",
    ],
}


@pytest.mark.parametrize("table", TABLES)
async def test_plans_made_once_read_only_their_batch(db: TestDatabase, table: str) -> None:
    conn = await db.connect()
    try:
        for statement in TABLES[table]:
            await conn.execute(statement.format(jobs=db.jobs))
        for name, value in CYCLE_PLANNING.items():
            await conn.execute(f"SET {name} = {value}")
        q = queries_for(db.schema)
        plans = {name: await generic_plan(conn, q[name]) for name in CYCLE_STATEMENTS}
    finally:
        await conn.close()
    for name, explained in plans.items():
        plan = explained["Plan"]
        assert unbounded_reads(plan) == [], f"{name} planned on a table {table}:\n{plan}"
        assert "JIT" not in explained, f"{name} is compiled by JIT on every run"


async def test_without_the_cycle_settings_a_plan_made_on_an_empty_table_reads_it_whole(
    db: TestDatabase,
) -> None:
    # The check above can fail: planned once with the default settings, on a table that
    # was empty when analyzed, the statements walk jobs (their reads are not bounded).
    conn = await db.connect()
    try:
        await conn.execute(f"ANALYZE {db.jobs}")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        q = queries_for(db.schema)
        problems = [
            problem
            for name in CYCLE_STATEMENTS
            for problem in unbounded_reads((await generic_plan(conn, q[name]))["Plan"])
        ]
    finally:
        await conn.close()
    assert problems, "expected some unbounded read without CYCLE_PLANNING"


async def generic_plan(conn: asyncpg.Connection, sql: str) -> dict[str, Any]:
    """EXPLAIN (FORMAT JSON) of ``sql`` planned once for any parameters (a prepared
    statement's generic plan: PostgreSQL 15 has no EXPLAIN (GENERIC_PLAN))."""
    params = max((int(n) for n in re.findall(r"\$(\d+)", sql)), default=0)
    await conn.execute(f"PREPARE cycle_plan AS {sql}")
    try:
        nulls = ", ".join(["NULL"] * params)
        text = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE cycle_plan({nulls})")
    finally:
        await conn.execute("DEALLOCATE cycle_plan")
    explained: dict[str, Any] = json.loads(text)[0]
    return explained


def unbounded_reads(plan: dict[str, Any]) -> list[str]:
    """What in ``plan`` reads more of jobs than the batch asks for."""
    found: list[str] = []
    for node in nodes(plan):
        kind = node["Node Type"]
        if node.get("Relation Name") == "jobs":
            if kind == "Seq Scan":
                found.append("a sequential scan of jobs")
            elif kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node:
                found.append(f"a scan of all of {node['Index Name']}")
        if kind == "Nested Loop":
            outer, inner = node["Plans"]
            reads_jobs = any(n.get("Relation Name") == "jobs" for n in nodes(outer))
            rescans_batch = any(n["Node Type"] == "Function Scan" for n in nodes(inner))
            if reads_jobs and rescans_batch:
                found.append("the batch read again for each row of jobs")
    return found


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """``plan`` and every node under it."""
    found = [plan]
    for child in plan.get("Plans", []):
        found += nodes(child)
    return found
