"""Benchmark: the cost of a keyed claim (per-key concurrency) with one hot key.

Issue 17's target: the claim of a type with ``key_concurrency`` stays one statement and
stays fast when one key has 100,000 pending jobs and others have few; a hot key must
not starve the others or slow the claim. Three shapes of the same ``--pending`` jobs
of one type, each in a fresh schema (VACUUM ANALYZE after the insert):

- **even**: spread over ``--keys`` keys (20), ids interleaved;
- **hot**: one key, inserted first (the oldest), then ``--keys`` - 1 cold keys with
  ``--claims`` jobs each (so that every claim finds one under each);
- **unkeyed**: no key, claimed by the ordinary claim statement (``claim_jobs``): the
  reference for what a keyed claim adds.

Each claim is the leader's own statement (``claim_keyed_jobs`` with key limit 1, or
``claim_jobs``) asking for ``--keys`` jobs, timed from the client; the jobs it took are
then completed so their keys are free again for the next. Printed: median and p95 per
claim, jobs per claim, and the ratios hot / even and even / unkeyed (same run).

    python -m bench.keyed_claim [--pending 100000] [--keys 20] [--claims 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from bench.common import Database, Result, database, percentile
from bench.raw_sql import COMPLETE
from dispatcher.core.queries import queries_for

TYPE = "bench.keyed"


async def seed(db: Database, shape: str, pending: int, keys: int, claims: int) -> None:
    await db.reset()
    conn = await db.connect()
    try:
        if shape == "even":
            await conn.execute(
                f"INSERT INTO {db.jobs} (type, concurrency_key) "
                "SELECT $1, 'key-' || (i % $2) FROM generate_series(1, $3) i ORDER BY i",
                TYPE,
                keys,
                pending,
            )
        elif shape == "hot":
            cold = claims * (keys - 1)
            await conn.execute(
                f"INSERT INTO {db.jobs} (type, concurrency_key) "
                "SELECT $1, 'hot' FROM generate_series(1, $2)",
                TYPE,
                pending - cold,
            )
            await conn.execute(
                f"INSERT INTO {db.jobs} (type, concurrency_key) "
                "SELECT $1, 'cold-' || (i % $2) FROM generate_series(1, $3) i ORDER BY i",
                TYPE,
                keys - 1,
                cold,
            )
        else:
            await conn.execute(
                f"INSERT INTO {db.jobs} (type) SELECT $1 FROM generate_series(1, $2)",
                TYPE,
                pending,
            )
        await conn.execute(f"VACUUM ANALYZE {db.jobs}")
    finally:
        await conn.close()


async def time_claims(db: Database, shape: str, keys: int, claims: int) -> tuple[list[float], int]:
    """Durations (ms) of ``claims`` leader claims of ``keys`` jobs, and jobs claimed."""
    q = queries_for(db.schema)
    conn = await asyncpg.connect(db.dsn, server_settings={"plan_cache_mode": "force_custom_plan"})
    try:
        owner = "bench-claimer"
        elected = await conn.fetchrow(
            q["leader_try_elect"], f"dispatcher:leader:{db.schema}", owner, 600.0
        )
        term = elected["term"]
        await conn.execute(q["replica_heartbeat"], owner, owner, "bench", 0, "bench", "leader", [])
        keyed = shape != "unkeyed"
        statement = q["claim_keyed_jobs" if keyed else "claim_jobs"]
        arguments: list[object] = [
            term, owner, [TYPE], [keys], keys, [5], [None], 1, [None], [None], [None],
        ]  # fmt: skip
        if keyed:
            arguments.append([1])
        complete = COMPLETE.format(jobs=db.jobs)
        durations: list[float] = []
        claimed = 0
        for _ in range(claims):
            started = time.perf_counter()
            rows = await conn.fetch(statement, *arguments)
            durations.append((time.perf_counter() - started) * 1000)
            claimed += len(rows)
            await conn.execute(complete, [row["id"] for row in rows])
        return durations, claimed
    finally:
        await conn.close()


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("keyed_claim")
    medians: dict[str, float] = {}
    with database() as db:
        for shape in ("even", "hot", "unkeyed"):
            await seed(db, shape, args.pending, args.keys, args.claims)
            durations, claimed = await time_claims(db, shape, args.keys, args.claims)
            median = statistics.median(durations)
            medians[shape] = median
            result.add(
                f"{shape}: claim of {args.keys} from {args.pending:,} pending",
                f"median {median:6.2f} ms   p95 {percentile(durations, 0.95):6.2f} ms   "
                f"{claimed / args.claims:.1f} jobs/claim",
                **{f"{shape}_median_ms": median, f"{shape}_jobs_per_claim": claimed / args.claims},
            )
        await db.drop()
    hot_ratio = medians["hot"] / medians["even"]
    keyed_ratio = medians["even"] / medians["unkeyed"]
    result.add("hot key / even spread (median)", f"{hot_ratio:.2f}x", hot_over_even=hot_ratio)
    result.add(
        "keyed (even) / unkeyed claim (median)", f"{keyed_ratio:.2f}x", keyed_over_plain=keyed_ratio
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--claims", type=int, default=300)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
