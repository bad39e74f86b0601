"""Benchmark 7: memory of one replica running 10,000 concurrent sleeping jobs.

One replica with DISPATCHER_CONCURRENCY=10000; its resident set is sampled from
/proc while idle, then while 10,000 ``demo.sleep`` jobs (30 s each) all run. Reports
MiB per 1,000 in-flight jobs: (peak - idle) / (jobs / 1000).

    python -m bench.memory [--jobs 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.common import Database, Replica, Result, database, wait_for_leader


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def measure(db: Database, jobs: int, seconds: float) -> tuple[float, float, int]:
    replica = Replica(db, env={"DISPATCHER_CONCURRENCY": str(jobs)})
    conn = await db.connect()
    try:
        await wait_for_leader(db)
        await asyncio.sleep(2.0)  # settled: pools open, first claims done
        idle = rss_mib(replica.pid)
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, payload) SELECT 'demo.sleep', "
            "jsonb_build_object('seconds', $2::float8) FROM generate_series(1, $1)",
            jobs,
            seconds,
        )
        peak = idle
        running = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            running = max(
                running,
                await conn.fetchval(f"SELECT count(*) FROM {db.jobs} WHERE status = 'processing'"),
            )
            peak = max(peak, rss_mib(replica.pid))
            await asyncio.sleep(0.2)
        return idle, peak, running
    finally:
        await conn.close()
        replica.process.kill()
        replica.stop()


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("memory")
    with database() as db:
        await db.reset()
        idle, peak, running = await measure(db, args.jobs, args.seconds)
        per_thousand = (peak - idle) / (running / 1000) if running else float("nan")
        result.add("replica RSS idle", f"{idle:.1f} MiB", idle_mib=idle)
        result.add(f"replica RSS with {running:,} jobs in flight", f"{peak:.1f} MiB", peak_mib=peak,
                   in_flight=running)  # fmt: skip
        result.add("per 1,000 in-flight jobs", f"{per_thousand:.2f} MiB", mib_per_1000=per_thousand)
        await db.drop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30)
    result = asyncio.run(main_async(parser.parse_args()))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
