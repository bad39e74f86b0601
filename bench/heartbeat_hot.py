"""Benchmark: how many job heartbeats are HOT (heap-only) updates.

N processing jobs are heartbeated R times with the runtime's own statement
(heartbeat_jobs), once as migrated (migration 0007: no index on heartbeat_at) and once
with the index it replaced (jobs_processing_heartbeat_idx, keyed on heartbeat_at)
put back: the baseline in the same run. A HOT update writes no index entry and lets
the page be pruned without a vacuum; a non-HOT one adds an entry to every index.

    python -m bench.heartbeat_hot [--jobs 1000] [--beats 30]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg

from bench.common import Database, Result, database, database_beside
from dispatcher.core.queries import queries_for

OLD_INDEX = (
    "CREATE INDEX jobs_processing_heartbeat_idx ON {jobs} (heartbeat_at) "
    "INCLUDE (type, owner) WHERE status = 'processing'"
)


async def heartbeat_updates(db: Database, jobs: int, beats: int) -> tuple[int, int, float]:
    """(updates, HOT updates, seconds) of ``beats`` heartbeats of ``jobs`` jobs."""
    q = queries_for(db.schema)
    # As the runtime's pool: the statement takes arrays a cached generic plan cannot size.
    conn = await asyncpg.connect(db.dsn, server_settings={"plan_cache_mode": "force_custom_plan"})
    try:
        ids = [
            r["id"]
            for r in await conn.fetch(
                f"INSERT INTO {db.jobs} (type, status, attempts, owner, started_at, "
                "heartbeat_at) SELECT 'bench', 'processing', 1, 'bench-owner', now(), now() "
                "FROM generate_series(1, $1) RETURNING id",
                jobs,
            )
        ]
        await conn.execute(f"VACUUM ANALYZE {db.jobs}")
        before = await table_updates(conn, db)
        started = time.perf_counter()
        for _ in range(beats):
            await conn.fetch(q["heartbeat_jobs"], "bench-owner", ids, [1] * len(ids))
        seconds = time.perf_counter() - started
        after = await table_updates(conn, db)
    finally:
        await conn.close()
    return after[0] - before[0], after[1] - before[1], seconds


async def table_updates(conn: asyncpg.Connection, db: Database) -> tuple[int, int]:
    # Statistics reach the shared counters at transaction end, at most once a second
    # (PostgreSQL 15+), unless flushed on request.
    version = await conn.fetchval("SHOW server_version_num")
    if int(version) >= 150000:
        await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
        "WHERE schemaname = $1 AND relname = 'jobs'",
        db.schema,
    )
    return row["n_tup_upd"], row["n_tup_hot_upd"]


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("heartbeat_hot")
    with database() as migrated, database_beside(migrated, "_old_index") as with_old_index:
        await migrated.reset()
        await with_old_index.reset()
        conn = await with_old_index.connect()
        try:
            await conn.execute(OLD_INDEX.format(jobs=with_old_index.jobs))
        finally:
            await conn.close()
        cases = (("as migrated (0007)", migrated), ("heartbeat_at indexed", with_old_index))
        for label, db in cases:
            updates, hot, seconds = await heartbeat_updates(db, args.jobs, args.beats)
            result.add(
                f"{args.beats} heartbeats of {args.jobs:,} jobs, {label}",
                f"{hot / updates:.0%} HOT ({hot:,} of {updates:,}), "
                f"{seconds / args.beats * 1000:.1f} ms per heartbeat",
                updates=updates,
                hot=hot,
                seconds=seconds,
            )
        await with_old_index.drop()
        await migrated.drop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--beats", type=int, default=30)
    result = asyncio.run(main_async(parser.parse_args()))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
