"""A producer process for chaos runs: plain SQL inserts at a steady rate, with bursts.

    python -m tests.support.chaos_producer DSN SCHEMA --rate 40
        [--burst-every 10 --burst-size 200] [--min-seconds 0.02 --max-seconds 0.2]
        [--duration SECONDS]

Inserts ``rate`` chaos.work jobs per second of wall-clock time, in one statement per
100 ms tick, plus a burst of ``burst-size`` every ``burst-every`` seconds, riding out
database restarts. It produces until its stdin closes or it gets SIGTERM (or SIGINT),
whichever comes first: the chaos harness decides when the load ends. ``--duration`` is
only an upper bound, for a run by hand. At the end it prints one JSON line: jobs
acknowledged, and jobs whose INSERT outcome is unknown (the connection died during the
commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import threading
import time

import asyncpg

TICK = 0.1


def stop_when_told(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set on SIGTERM, SIGINT, or the end of stdin."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def read_stdin() -> None:
        while sys.stdin.read(4096):
            pass
        loop.call_soon_threadsafe(stop.set)

    # A daemon thread: a stop by signal must not wait for stdin to end.
    threading.Thread(target=read_stdin, daemon=True).start()
    return stop


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--duration", type=float, help="stop after this many seconds at most")
    parser.add_argument("--burst-every", type=float, default=10)
    parser.add_argument("--burst-size", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=0.02)
    parser.add_argument("--max-seconds", type=float, default=0.2)
    args = parser.parse_args()
    sql = (
        f'INSERT INTO "{args.schema}".jobs (type, payload) '
        "SELECT 'chaos.work', jsonb_build_object('seconds', s) FROM unnest($1::float8[]) AS s"
    )
    stop = stop_when_told(asyncio.get_running_loop())
    rng = random.Random()
    acknowledged = unknown = 0
    conn: asyncpg.Connection | None = None
    started = last_tick = time.monotonic()
    next_burst = started + args.burst_every
    owed = 0.0
    while not stop.is_set():
        tick_start = time.monotonic()
        if args.duration is not None and tick_start - started >= args.duration:
            break
        # Owed by the clock, not by the tick count: a slow tick does not lower the rate.
        owed += args.rate * (tick_start - last_tick)
        last_tick = tick_start
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
