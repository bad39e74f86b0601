"""A producer process for chaos runs: plain SQL inserts at a steady rate, with bursts.

    python -m tests.support.chaos_producer DSN SCHEMA --rate 40 --duration 45
        [--burst-every 10 --burst-size 200] [--min-seconds 0.02 --max-seconds 0.2]

Inserts ``rate`` chaos.work jobs per second in one statement per 100 ms tick, plus a
burst of ``burst-size`` every ``burst-every`` seconds, riding out database restarts.
Prints one JSON line at the end: jobs acknowledged, and jobs whose INSERT outcome is
unknown (the connection died during the commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import asyncpg

TICK = 0.1


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--duration", type=float, default=45)
    parser.add_argument("--burst-every", type=float, default=10)
    parser.add_argument("--burst-size", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=0.02)
    parser.add_argument("--max-seconds", type=float, default=0.2)
    args = parser.parse_args()
    sql = (
        f'INSERT INTO "{args.schema}".jobs (type, payload) '
        "SELECT 'chaos.work', jsonb_build_object('seconds', s) FROM unnest($1::float8[]) AS s"
    )
    rng = random.Random()
    acknowledged = unknown = 0
    conn: asyncpg.Connection | None = None
    started = time.monotonic()
    next_burst = started + args.burst_every
    owed = 0.0
    while time.monotonic() - started < args.duration:
        tick_start = time.monotonic()
        owed += args.rate * TICK
        count, owed = int(owed), owed - int(owed)
        if tick_start >= next_burst:
            count += args.burst_size
            next_burst += args.burst_every
        if count:
            seconds = [rng.uniform(args.min_seconds, args.max_seconds) for _ in range(count)]
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(args.dsn, timeout=2)
            except Exception:
                conn = None  # nothing sent: these jobs were simply not produced
            else:
                try:
                    await conn.execute(sql, seconds, timeout=5)
                    acknowledged += count
                except asyncpg.PostgresError:
                    conn = None  # the server refused the statement: rolled back
                except Exception:
                    unknown += count  # lost in flight: it may or may not have committed
                    conn.terminate()
                    conn = None
        await asyncio.sleep(max(0.0, TICK - (time.monotonic() - tick_start)))
    if conn is not None:
        await conn.close()
    print(json.dumps({"acknowledged": acknowledged, "unknown": unknown}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
