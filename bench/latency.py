"""Benchmark 3: insert → start latency, idle and under load, against a raw-SQL listener.

500 single-row SQL inserts 20 ms apart; latency is started_at - created_at, both on
the database clock. Baseline in the same run: a raw asyncpg loop that LISTENs on the
insert trigger's channel and claims with one UPDATE ... SKIP LOCKED per notification.
Then the same probe with a steady background load of 1,000 jobs/s.

    python -m bench.latency [--probes 500] [--gap 0.02] [--load 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

from bench.common import Database, Replica, Result, database, percentile, wait_for_leader
from bench.raw_sql import CLAIM, COMPLETE

PROBE = "demo.echo"


async def probe(db: Database, probes: int, gap: float) -> list[float]:
    """Insert probe jobs one by one; their insert → start latencies in ms."""
    conn = await db.connect()
    try:
        ids = []
        for _ in range(probes):
            ids.append(
                await conn.fetchval(
                    f"INSERT INTO {db.jobs} (type, payload) VALUES ($1, '{{}}') RETURNING id",
                    PROBE,
                )
            )
            await asyncio.sleep(gap)
        while True:
            rows = await conn.fetch(
                f"SELECT extract(epoch FROM started_at - created_at)::float8 * 1000 AS ms "
                f"FROM {db.jobs} WHERE id = ANY($1::bigint[]) AND started_at IS NOT NULL",
                ids,
            )
            if len(rows) == len(ids):
                return [r["ms"] for r in rows]
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def background_load(db: Database, per_second: int, stop: asyncio.Event) -> None:
    conn = await db.connect()
    try:
        while not stop.is_set():
            await conn.execute(
                f"INSERT INTO {db.jobs} (type) SELECT 'demo.noop' FROM generate_series(1, $1)",
                per_second // 20,
            )
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def raw_listener(db: Database, stop: asyncio.Event) -> None:
    """The baseline: LISTEN, and on each notification claim and complete with raw SQL."""
    listen = await db.connect()
    work = await db.connect()
    wake = asyncio.Event()
    await listen.add_listener(f"{db.schema}.jobs", lambda *_: wake.set())
    claim = CLAIM.format(jobs=db.jobs).replace("'demo.noop'", "'demo.echo'")
    complete = COMPLETE.format(jobs=db.jobs)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 0.2)
            wake.clear()
            while ids := [r["id"] for r in await work.fetch(claim, 100)]:
                await work.execute(complete, ids)
    finally:
        await listen.close()
        await work.close()


def summarize(result: Result, label: str, key: str, values: list[float]) -> dict[str, float]:
    stats = {q: percentile(values, p) for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
    stats["max"] = max(values)
    result.add(
        label,
        " / ".join(f"{q} {v:.1f}" for q, v in stats.items()) + " ms",
        **{f"{key}_{q}_ms": v for q, v in stats.items()},
    )
    return stats


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("latency")
    with database() as db:
        await db.reset()
        stop = asyncio.Event()
        listener = asyncio.create_task(raw_listener(db, stop))
        await asyncio.sleep(0.2)
        raw = await probe(db, args.probes, args.gap)
        stop.set()
        await listener
        base = summarize(result, "raw SQL listener, idle", "raw_idle", raw)

        await db.reset()
        replica = Replica(db, env={"DISPATCHER_CONCURRENCY": "1000"})
        try:
            await wait_for_leader(db)
            await asyncio.sleep(0.5)
            idle = summarize(
                result, "dispatcher, idle", "idle", await probe(db, args.probes, args.gap)
            )
            result.add(
                "dispatcher / raw at idle (p50, p99)",
                f"{idle['p50'] / base['p50']:.2f}x, {idle['p99'] / base['p99']:.2f}x",
                idle_ratio_p50=idle["p50"] / base["p50"],
                idle_ratio_p99=idle["p99"] / base["p99"],
            )
            stop = asyncio.Event()
            load: Any = asyncio.create_task(background_load(db, args.load, stop))
            await asyncio.sleep(1.0)
            loaded = await probe(db, args.probes, args.gap)
            stop.set()
            await load
            summarize(result, f"dispatcher, {args.load} jobs/s background", "loaded", loaded)
        finally:
            replica.stop()
        await db.drop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probes", type=int, default=500)
    parser.add_argument("--gap", type=float, default=0.02)
    parser.add_argument("--load", type=int, default=1000)
    result = asyncio.run(main_async(parser.parse_args()))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
