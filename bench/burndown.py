"""Benchmark 2: burn-down throughput of one real replica against the raw-SQL ceiling.

N ``demo.noop`` jobs are inserted, then one ``dispatcher run dispatcher.examples:app``
process (default settings plus ``DISPATCHER_CONCURRENCY``, 1000 here: the global
limit of running jobs) drains them. Throughput is read from the table: jobs / (last
finished_at - first started_at). The raw-SQL ceiling is measured in the same run,
alternating with the burn-down, three rounds; the medians are compared.

    python -m bench.burndown [--jobs 20000] [--concurrency 1000] [--profile FILE]

``--profile FILE`` records the replica of the last round with py-spy (see
bench/profile.py) and prints where its samples went.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from bench.common import Database, Replica, Result, database
from bench.profile import Profiler, summarize
from bench.raw_sql import ceiling, insert_noops

CONCURRENCY = 1000


async def burn_down(
    db: Database,
    jobs: int,
    concurrency: int,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    profile: Path | None = None,
) -> float:
    """Drain ``jobs`` pre-inserted no-ops with one replica; jobs per second."""
    await insert_noops(db, jobs)
    replica = Replica(db, env={"DISPATCHER_CONCURRENCY": str(concurrency), **(env or {})})
    profiler = Profiler(replica.pid, profile) if profile else None
    conn = await db.connect()
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE status IN ('pending', 'processing')"
            )
            if left == 0:
                break
            if time.monotonic() > deadline or replica.process.poll() is not None:
                raise RuntimeError(f"burn-down stalled with {left} jobs left ({replica.log.name})")
            await asyncio.sleep(0.1)
        row = await conn.fetchrow(
            f"SELECT count(*) AS n, extract(epoch FROM max(finished_at) - min(started_at))::float8 "
            f"AS seconds FROM {db.jobs} WHERE starts_with(owner, $1)",
            replica.owner_prefix,
        )
    finally:
        await conn.close()
        replica.stop()
        if profiler:
            profiler.stop()
    return float(row["n"]) / float(row["seconds"])


async def main_async(args: argparse.Namespace) -> Result:
    """Ceiling and burn-down alternate ``rounds`` times; medians are compared, so one
    noisy moment on a shared machine does not decide the ratio."""
    result = Result("burndown")
    ceilings, rates = [], []
    with database() as db:
        for round_ in range(args.rounds):
            ceilings.append(await ceiling(db, args.jobs, [100, 500], Result("scratch")))
            await db.reset()
            profile = args.profile if round_ == args.rounds - 1 else None
            rates.append(await burn_down(db, args.jobs, args.concurrency, profile=profile))
        await db.drop()
    best, rate = statistics.median(ceilings), statistics.median(rates)
    result.add(
        f"raw SQL ceiling, median of {args.rounds}",
        f"{best:,.0f} jobs/s (runs: {', '.join(f'{c:,.0f}' for c in ceilings)})",
        ceiling=best,
        ceilings=ceilings,
    )
    result.add(
        f"dispatcher burn-down ({args.jobs:,} jobs, concurrency {args.concurrency}), median",
        f"{rate:,.0f} jobs/s (runs: {', '.join(f'{r:,.0f}' for r in rates)})",
        jobs=args.jobs,
        concurrency=args.concurrency,
        dispatcher=rate,
        runs=rates,
    )
    result.add("ratio to the raw-SQL ceiling", f"{rate / best:.0%}", ratio=rate / best)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="py-spy raw output of the last round")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    result.print_table()
    result.save()
    if args.profile:
        print(summarize(args.profile))


if __name__ == "__main__":
    main()
