"""Benchmark 1: what Postgres alone can do on the same schema, with no dispatcher.

Two baselines, both draining pending ``demo.noop`` rows with no work in between.

The single-connection ceiling (``ceiling``): one connection claims a batch with
``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT b) RETURNING`` and
completes it with ``UPDATE ... WHERE id = ANY($1)``; the best batch size wins. It has
no concurrency limit. It stays because its history in bench/results is the longest,
and latency.py and table_growth.py use its statements.

The N-slot baseline (``slots_baseline``): the honest limit of a job runner allowed at
most N jobs processing at once, written by hand with asyncpg, that the burn-down at
concurrency N is compared with:

- One statement per turn (``STEP``): a data-modifying CTE marks the jobs the previous
  turn claimed completed (no-ops: they ended as soon as they were claimed) and claims
  as many pending jobs as slots just freed, ``FOR UPDATE SKIP LOCKED``. One round
  trip and one commit per turn, the fewest a runner can use: every job must be
  claimed and its end written, and here the end of one batch rides on the claim of
  the next. Both in one transaction, so no committed moment sees more than N jobs
  processing.
- All N slots on one connection by default. Splitting them over k connections, each
  owning N/k (``--loops``, ``STEP_SHARED``: completions there must skip rows another
  loop's claim holds, or the loops deadlock), should overlap Python with Postgres,
  but measured here (2 cores, durable commits, 20,000 jobs, medians of 4 alternating
  runs) it only lost: 1, 2 and 4 connections drained 14.6k, 5.0k and 2.6k jobs/s with
  16 slots; 44k, 23k and 14k with 100; 62k, 62k and 45k with 1,000; 69k, 69k and 56k
  with 2,000. Each turn is one commit: k loops run more commits per second than one,
  but not k times as many (they share two cores, the WAL flush, and the head of the
  claim index), while each commit carries 1/k of the jobs. ``python -m bench.raw_sql
  --loops 1,2,4`` measures it again.
- Sessions plan every run (``plan_cache_mode=force_custom_plan``), as the
  dispatcher's pool does: a cached generic plan cannot see the array sizes.
- Throughput is read from the table as the burn-down's is: jobs / (last
  ``finished_at`` - first ``started_at``), so the ratio compares like with like.

    python -m bench.raw_sql [--jobs 20000] [--batches 100,500] [--concurrency 16,100,1000]
                            [--loops 1]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg

from bench.common import Database, Result, database

# Claims up to {limit} due no-ops, in claim order; the rows say they were claimed (the
# N-slot baseline's shared step returns completed rows beside them).
_CLAIM_FOR_SLOTS = """
UPDATE {jobs} SET status = 'processing', attempts = attempts + 1, started_at = now(),
       heartbeat_at = now(), owner = 'raw-sql', term = 0
WHERE id IN (
    SELECT id FROM {jobs}
    WHERE status = 'pending' AND type = 'demo.noop' AND run_at <= now()
    ORDER BY priority, run_at, id
    LIMIT {limit}
    FOR UPDATE SKIP LOCKED
)
RETURNING id, true AS claimed
"""
CLAIM = _CLAIM_FOR_SLOTS.replace("{limit}", "$1")
COMPLETE = "UPDATE {jobs} SET status = 'completed', finished_at = now() WHERE id = ANY($1)"
# One connection: complete the loop's jobs $1 (all finished) and claim its $2 slots in
# one round trip. The claim cannot pick the rows being completed: the statement's
# snapshot sees them processing.
STEP = """
WITH completed AS (
    UPDATE {jobs} SET status = 'completed', finished_at = now()
    WHERE id = ANY($1::bigint[])
)
""" + _CLAIM_FOR_SLOTS.replace("{limit}", "$2")
# Several connections: a claim whose snapshot predates another loop's last commit
# locks that loop's just-claimed rows while it rechecks them (and finds them no longer
# pending), holding the lock to its end. Completion and claim in one transaction
# would then deadlock, each loop's completion waiting for the other's claim; so the
# completion skips locked rows (written next turn), and the claim takes only the
# slots whose jobs were written.
STEP_SHARED = (
    """
WITH completed AS (
    UPDATE {jobs} SET status = 'completed', finished_at = now()
    WHERE id IN (SELECT id FROM {jobs} WHERE id = ANY($1::bigint[]) FOR UPDATE SKIP LOCKED)
    RETURNING id, false AS claimed
),
claimed AS ("""
    + _CLAIM_FOR_SLOTS.replace(
        "{limit}", "$2 - cardinality($1::bigint[]) + (SELECT count(*) FROM completed)"
    )
    + """)
SELECT * FROM claimed UNION ALL SELECT * FROM completed
"""
)
CONCURRENCIES = [16, 100, 1000]
LOOPS = 1  # connections the N-slot baseline splits its slots over (see above)


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


def shares(slots: int, loops: int) -> list[int]:
    """``slots`` split over ``loops`` as evenly as whole slots allow."""
    return [slots // loops + (1 if i < slots % loops else 0) for i in range(loops)]


async def _turns(conn: asyncpg.Connection, step: str, slots: int, *, shared: bool) -> None:
    held: list[int] = []  # processing under this loop: no-ops, all finished at once
    while True:
        rows = await conn.fetch(step, held, slots)
        claimed = [row[0] for row in rows if row[1]]
        if shared:
            written = {row[0] for row in rows if not row[1]}
            claimed += [job for job in held if job not in written]
        held = claimed
        if not held:
            return


async def slots_baseline(db: Database, jobs: int, concurrency: int, *, loops: int = LOOPS) -> float:
    """Drain ``jobs`` fresh no-ops with at most ``concurrency`` processing at once over
    ``loops`` connections, in a fresh schema; jobs per second, read from the table as
    the burn-down's is."""
    await db.reset()
    await insert_noops(db, jobs)
    split = shares(concurrency, min(concurrency, loops))
    shared = len(split) > 1
    step = (STEP_SHARED if shared else STEP).format(jobs=db.jobs)
    settings = {"plan_cache_mode": "force_custom_plan"}
    conns = [await asyncpg.connect(db.dsn, server_settings=settings) for _ in split]
    try:
        await asyncio.gather(
            *(_turns(c, step, n, shared=shared) for c, n in zip(conns, split, strict=True))
        )
        row = await conns[0].fetchrow(
            f"SELECT count(*) AS n, extract(epoch FROM max(finished_at) - min(started_at))::float8 "
            f"AS seconds FROM {db.jobs} WHERE status = 'completed'"
        )
    finally:
        for conn in conns:
            await conn.close()
    if row["n"] != jobs:
        raise RuntimeError(f"the {concurrency}-slot baseline completed {row['n']} of {jobs} jobs")
    return float(row["n"]) / float(row["seconds"])


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("raw_sql")
    with database() as db:
        await ceiling(db, args.jobs, args.batches, result)
        for concurrency in args.concurrency:
            for loops in sorted({min(loops, concurrency) for loops in args.loops}):
                rate = await slots_baseline(db, args.jobs, concurrency, loops=loops)
                result.add(
                    f"raw SQL, {concurrency} slots on {loops} connection(s)",
                    f"{rate:,.0f} jobs/s",
                    **{f"slots_{concurrency}_loops_{loops}": rate},
                )
        await db.drop()
    return result


def parse_ints(text: str) -> list[int]:
    """A comma list of positive integers (an argparse type), e.g. ``16,100,1000``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 16,100, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batches", type=parse_ints, default=[100, 500])
    parser.add_argument("--concurrency", type=parse_ints, default=CONCURRENCIES)
    parser.add_argument("--loops", type=parse_ints, default=[LOOPS])
    result = asyncio.run(main_async(parser.parse_args()))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
