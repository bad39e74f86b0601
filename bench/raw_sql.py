"""Benchmark 1: the raw-SQL ceiling on the same schema.

N pending no-op jobs claimed with one batched ``UPDATE ... WHERE id IN (SELECT ... FOR
UPDATE SKIP LOCKED LIMIT b) RETURNING`` and completed with one batched ``UPDATE ...
WHERE id = ANY($1)``, one connection, no work in between: what Postgres alone can do.
The best batch size is the ceiling the dispatcher's burn-down is compared with.

    python -m bench.raw_sql [--jobs 20000] [--batches 100,500]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import Database, Result, database

CLAIM = """
UPDATE {jobs} SET status = 'processing', attempts = attempts + 1, started_at = now(),
       heartbeat_at = now(), owner = 'raw-sql', term = 0
WHERE id IN (
    SELECT id FROM {jobs}
    WHERE status = 'pending' AND type = 'demo.noop' AND run_at <= now()
    ORDER BY priority, run_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
RETURNING id
"""
COMPLETE = "UPDATE {jobs} SET status = 'completed', finished_at = now() WHERE id = ANY($1)"


async def insert_noops(db: Database, n: int) -> None:
    conn = await db.connect()
    try:
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 'demo.noop' FROM generate_series(1, $1)", n
        )
        await conn.execute(f"VACUUM ANALYZE {db.jobs}")
    finally:
        await conn.close()


async def drain(db: Database, batch: int) -> float:
    """Claim and complete everything pending; jobs per second."""
    conn = await db.connect()
    claim, complete = CLAIM.format(jobs=db.jobs), COMPLETE.format(jobs=db.jobs)
    done = 0
    try:
        started = time.perf_counter()
        while True:
            ids = [r["id"] for r in await conn.fetch(claim, batch)]
            if not ids:
                break
            await conn.execute(complete, ids)
            done += len(ids)
        return done / (time.perf_counter() - started)
    finally:
        await conn.close()


async def ceiling(db: Database, jobs: int, batches: list[int], result: Result) -> float:
    best = 0.0
    for batch in batches:
        await db.reset()
        await insert_noops(db, jobs)
        rate = await drain(db, batch)
        best = max(best, rate)
        result.add(f"raw SQL, batch {batch}", f"{rate:,.0f} jobs/s", **{f"raw_batch_{batch}": rate})
    result.add("raw SQL ceiling (best)", f"{best:,.0f} jobs/s", ceiling=best)
    return best


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("raw_sql")
    with database() as db:
        await ceiling(db, args.jobs, args.batches, result)
        await db.drop()
    return result


def parse_batches(text: str) -> list[int]:
    return [int(b) for b in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batches", type=parse_batches, default=[100, 500])
    result = asyncio.run(main_async(parser.parse_args()))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
