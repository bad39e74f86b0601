"""Benchmark 2: burn-down throughput of one real replica against raw SQL, per concurrency.

N ``demo.noop`` jobs are inserted, then one ``dispatcher run dispatcher.examples:app``
process (default settings plus ``DISPATCHER_CONCURRENCY``: the global limit of running
jobs) drains them. Throughput is read from the table: jobs / (last finished_at - first
started_at). For each concurrency C (16, 100 and 1000 by default) it is compared with
raw SQL draining the same jobs with at most C processing at once (bench/raw_sql.py's
N-slot baseline): the target is a ratio of at least 70% at each. The single-connection
raw-SQL ceiling, which knows no concurrency, is measured and compared as before, so the
history in bench/results stays comparable.

Each round measures the ceiling, then for each concurrency its baseline and the
burn-down, alternating; medians of the rounds (three by default) are compared.

    python -m bench.burndown [--jobs 20000] [--concurrency 16,100,1000] [--rounds 3]
                             [--profile FILE]

``--profile FILE`` records the replica of the last burn-down (the last round, the last
concurrency) with py-spy (see bench/profile.py) and prints where its samples went.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    Database,
    Replica,
    Result,
    database,
    machine_busy_seconds,
    process_cpu_seconds,
)
from bench.profile import Profiler, summarize
from bench.raw_sql import CONCURRENCIES, ceiling, insert_noops, parse_ints, slots_baseline

TARGET = 0.70  # of the N-slot baseline, at each concurrency


# Whether the replica is done, asked every 100 ms while it runs: two index probes. A
# count(*) of the table here was a sequential scan (about 10 ms of server time each;
# more beside 1,000,000 finished rows), 15% of the server's time in a 1,000-slot
# burn-down (pg_stat_statements) on two cores where the server is the busier side,
# and the raw-SQL baseline it is compared with has no such observer. Sequential scans
# are off for this session: statistics taken while every job was pending make one
# look as cheap as a probe, and it then reads the whole table once the queue is empty.
JOBS_LEFT = (
    "SELECT EXISTS (SELECT 1 FROM {jobs} WHERE status = 'pending') "
    "OR EXISTS (SELECT 1 FROM {jobs} WHERE status = 'processing')"
)


# Whether the replica has started a job yet: CPU is counted from then on, not while
# the process imports and elects itself. Two index probes; "none pending" counts too,
# since a small burn-down can start and finish every job between two polls.
STARTED = (
    "SELECT EXISTS (SELECT 1 FROM {jobs} WHERE status = 'processing') "
    "OR NOT EXISTS (SELECT 1 FROM {jobs} WHERE status = 'pending')"
)


@dataclass(frozen=True)
class BurnDown:
    """One burn-down: its rate, and the CPU spent from the first start to the end."""

    rate: float  # jobs / (last finished_at - first started_at), from the table
    jobs: int
    replica_cpu: float  # seconds of the replica process (NaN where /proc is missing)
    machine_cpu: float  # busy seconds of every core of the machine, the same window

    @property
    def replica_us_per_job(self) -> float:
        return self.replica_cpu / self.jobs * 1e6

    @property
    def machine_us_per_job(self) -> float:
        return self.machine_cpu / self.jobs * 1e6


async def burn_down(
    db: Database,
    jobs: int,
    concurrency: int,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    profile: Path | None = None,
    cwd: Path | None = None,
) -> BurnDown:
    """Drain ``jobs`` pre-inserted no-ops with one replica: its rate, and the CPU it
    cost. ``cwd``: the checkout the replica runs (see :class:`bench.common.Replica`)."""
    await insert_noops(db, jobs)
    replica = Replica(db, env={"DISPATCHER_CONCURRENCY": str(concurrency), **(env or {})}, cwd=cwd)
    profiler = Profiler(replica.pid, profile) if profile else None
    conn = await db.connect()
    deadline = time.monotonic() + timeout

    async def check(poll: float) -> None:
        if time.monotonic() > deadline or replica.process.poll() is not None:
            left = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE status IN ('pending', 'processing')"
            )
            raise RuntimeError(f"burn-down stalled with {left} jobs left ({replica.log.name})")
        await asyncio.sleep(poll)

    try:
        await conn.execute("SET enable_seqscan = off")
        started = STARTED.format(jobs=db.jobs)
        while not await conn.fetchval(started):
            await check(0.005)
        replica_cpu, machine_cpu = process_cpu_seconds(replica.pid), machine_busy_seconds()
        jobs_left = JOBS_LEFT.format(jobs=db.jobs)
        while await conn.fetchval(jobs_left):
            await check(0.1)
        replica_cpu = process_cpu_seconds(replica.pid) - replica_cpu
        machine_cpu = machine_busy_seconds() - machine_cpu
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
    done = int(row["n"])
    return BurnDown(done / float(row["seconds"]), done, replica_cpu, machine_cpu)


@dataclass
class Runs:
    """One concurrency's measurements, a figure per round."""

    baselines: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)


def runs(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


async def main_async(args: argparse.Namespace) -> Result:
    """The ceiling, then each concurrency's baseline and burn-down, ``rounds`` times;
    medians are compared, so one noisy moment on a shared machine does not decide a
    ratio."""
    result = Result("burndown")
    ceilings: list[float] = []
    by_concurrency = {c: Runs() for c in args.concurrency}
    with database() as db:
        for round_ in range(args.rounds):
            ceilings.append(await ceiling(db, args.jobs, [100, 500], Result("scratch")))
            for i, concurrency in enumerate(args.concurrency):
                measured = by_concurrency[concurrency]
                measured.baselines.append(await slots_baseline(db, args.jobs, concurrency))
                await db.reset()
                last = round_ == args.rounds - 1 and i == len(args.concurrency) - 1
                profile = args.profile if last else None
                burned = await burn_down(db, args.jobs, concurrency, profile=profile)
                measured.rates.append(burned.rate)
        await db.drop()
    best = statistics.median(ceilings)
    result.add(
        f"raw SQL ceiling (1 connection, no limit), median of {args.rounds}",
        f"{best:,.0f} jobs/s (runs: {runs(ceilings)})",
        ceiling=best,
        ceilings=ceilings,
        jobs=args.jobs,
    )
    figures: dict[str, dict[str, object]] = {}
    for concurrency, measured in by_concurrency.items():
        baseline = statistics.median(measured.baselines)
        rate = statistics.median(measured.rates)
        figures[str(concurrency)] = {
            "baseline": baseline,
            "baselines": measured.baselines,
            "dispatcher": rate,
            "runs": measured.rates,
            "ratio": rate / baseline,
            "ratio_to_ceiling": rate / best,
        }
        result.add(
            f"concurrency {concurrency}: raw SQL, {concurrency} slots, median",
            f"{baseline:,.0f} jobs/s (runs: {runs(measured.baselines)})",
        )
        result.add(
            f"concurrency {concurrency}: dispatcher burn-down, median",
            f"{rate:,.0f} jobs/s (runs: {runs(measured.rates)})",
        )
        met = "met" if rate / baseline >= TARGET else "NOT met"
        result.add(
            f"concurrency {concurrency}: ratio to raw SQL at {concurrency} slots",
            f"{rate / baseline:.0%} (target >= {TARGET:.0%}: {met}); "
            f"to the ceiling {rate / best:.0%}",
        )
    # The figures earlier lines have, for the largest concurrency (1000 by default):
    # the burn-down and its ratio to the ceiling.
    top = max(by_concurrency)
    result.add(
        f"ratio to the raw-SQL ceiling (concurrency {top})",
        f"{figures[str(top)]['ratio_to_ceiling']:.0%}",
        concurrency=top,
        dispatcher=figures[str(top)]["dispatcher"],
        runs=figures[str(top)]["runs"],
        ratio=figures[str(top)]["ratio_to_ceiling"],
        concurrencies=args.concurrency,
        by_concurrency=figures,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=parse_ints, default=CONCURRENCIES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="py-spy raw output of the last burn-down")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    result.print_table()
    result.save()
    if args.profile:
        print(summarize(args.profile))


if __name__ == "__main__":
    main()
