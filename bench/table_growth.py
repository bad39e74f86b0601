"""Benchmark 6: burn-down with a million finished rows in the table, and while the
reaper prunes them.

The same burn-down (N demo.noop jobs, one replica) on an empty table and beside
1,000,000 completed rows (finished an hour ago, inside retention), alternating three
rounds (medians compared); then once with the rows finished two days ago, so the
leader's reaper deletes them during the run.
A fourth measurement times the leader's claim statement (250 jobs at a time) while
the reaper prunes a million rows to the end: the longest claim shows whether pruning
blocks claims.

    python -m bench.table_growth [--jobs 20000] [--finished 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import timedelta

from bench.burndown import burn_down
from bench.common import Database, Result, database, database_beside, percentile
from bench.raw_sql import COMPLETE
from dispatcher.core.app import App
from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.services.reaper import Reaper

# The burn-downs' concurrency, as bench.burndown's history line (1000).
CONCURRENCY = 1000

# Retention one day; the benchmark's settings make the leader reap often.
REAPER_ENV = {"DISPATCHER_REAPER_INTERVAL": "0.5"}


async def add_finished(db: Database, rows: int, age: timedelta) -> None:
    conn = await db.connect()
    try:
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, status, attempts, started_at, finished_at) "
            "SELECT 'demo.noop', 'completed', 1, now() - $2::interval, now() - $2::interval "
            "FROM generate_series(1, $1)",
            rows,
            age,
        )
        await conn.execute(f"VACUUM ANALYZE {db.jobs}")
    finally:
        await conn.close()


async def claims_while_pruning(db: Database, finished: int) -> tuple[list[float], float, int]:
    """Durations (ms) of the leader's own claim statement, 250 jobs at a time, while a
    reaper prunes ``finished`` old rows to the end; (durations, seconds, rows pruned)."""
    import asyncpg

    await add_finished(db, finished, timedelta(days=2))
    conn = await db.connect()
    await conn.execute(
        f"INSERT INTO {db.jobs} (type) SELECT 'demo.noop' FROM generate_series(1, 200000)"
    )
    await conn.execute(f"ANALYZE {db.jobs}")
    q = queries_for(db.schema)
    owner = "bench-claimer"
    term = (
        await conn.fetchrow(q["leader_try_elect"], f"dispatcher:leader:{db.schema}", owner, 600.0)
    )["term"]
    # Claims are fenced by their owner's replica row, as a runtime's registry keeps it.
    await conn.execute(q["replica_heartbeat"], owner, owner, "bench", 0, "bench", "leader", [])
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    reaper = Reaper(
        pool,
        db.schema,
        App(),
        stale_after=30,
        interval=1,
        replica_seen_within=30,
        metrics=Metrics(),
    )
    durations: list[float] = []
    pruned = 0

    async def prune_all() -> None:
        nonlocal pruned
        while deleted := await reaper.prune_finished():
            pruned += deleted

    try:
        started = time.perf_counter()
        pruning = asyncio.create_task(prune_all())
        while not pruning.done():
            t0 = time.perf_counter()
            rows = await conn.fetch(
                q["claim_jobs"],
                term,
                owner,
                ["demo.noop"],
                [250],
                250,
                [5],
                [None],
                1,
                [None],
                [None],
                [None],
            )
            durations.append((time.perf_counter() - t0) * 1000)
            ids = [r["id"] for r in rows]
            await conn.execute(COMPLETE.format(jobs=db.jobs), ids)
            await asyncio.sleep(0.005)
        await pruning
        prune_seconds = time.perf_counter() - started
    finally:
        await pool.close()
        await conn.close()
    return durations, prune_seconds, pruned


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("table_growth")
    with database() as empty, database_beside(empty) as full:
        await full.reset()
        await add_finished(full, args.finished, timedelta(hours=1))
        empty_rates, full_rates = [], []
        for _ in range(args.rounds):  # alternate, so noise hits both alike
            await empty.reset()
            empty_rates.append((await burn_down(empty, args.jobs, CONCURRENCY)).rate)
            full_rates.append((await burn_down(full, args.jobs, CONCURRENCY)).rate)
            await forget_burned(full)
        rate_empty = statistics.median(empty_rates)
        rate_full = statistics.median(full_rates)
        result.add(
            f"burn-down, empty table (median of {args.rounds})",
            f"{rate_empty:,.0f} jobs/s",
            empty=rate_empty,
            empty_runs=empty_rates,
        )
        result.add(
            f"burn-down, {args.finished:,} finished rows (median of {args.rounds})",
            f"{rate_full:,.0f} jobs/s ({rate_full / rate_empty:.0%} of empty)",
            with_finished=rate_full,
            with_finished_runs=full_rates,
            with_finished_ratio=rate_full / rate_empty,
        )
        await full.drop()

        await empty.reset()
        await add_finished(empty, args.finished, timedelta(days=2))
        pruning = (await burn_down(empty, args.jobs, CONCURRENCY, env=REAPER_ENV)).rate
        result.add(
            f"burn-down while the reaper prunes {args.finished:,} rows",
            f"{pruning:,.0f} jobs/s ({pruning / rate_empty:.0%} of empty)",
            while_pruning=pruning,
            while_pruning_ratio=pruning / rate_empty,
        )

        await empty.reset()
        durations, prune_seconds, pruned = await claims_while_pruning(empty, args.finished)
        result.add(
            "claim statement (250 jobs) while pruning (p50 / p99 / max)",
            f"{percentile(durations, 0.5):.1f} / {percentile(durations, 0.99):.1f} / "
            f"{max(durations):.1f} ms over {len(durations)} claims; {pruned:,} rows pruned "
            f"in {prune_seconds:.1f} s",
            claim_p50_ms=percentile(durations, 0.5),
            claim_p99_ms=percentile(durations, 0.99),
            claim_max_ms=max(durations),
            prune_seconds=prune_seconds,
        )
        await empty.drop()
    return result


async def forget_burned(db: Database) -> None:
    """Delete the jobs a burn-down added, keeping the finished rows it ran beside."""
    conn = await db.connect()
    try:
        await conn.execute(
            f"DELETE FROM {db.jobs} WHERE finished_at > now() - interval '30 minutes'"
        )
        await conn.execute(f"VACUUM ANALYZE {db.jobs}")
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    result = asyncio.run(main_async(parser.parse_args()))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
