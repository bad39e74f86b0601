"""Benchmark 5: failover of 3 real replicas under a steady load.

kill -9 of the leader, 5 times (the killed replica is restarted each time); then
graceful SIGTERM hand-overs, 5 times. Failover = fault → first job claimed by the new
leader (min started_at of jobs with a newer term), with demo.noop jobs inserted every
10 ms so there is always one to claim.

    python -m bench.failover [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from bench.common import Database, Replica, Result, database, percentile, wait_for_leader


async def steady_load(db: Database, stop: asyncio.Event) -> None:
    conn = await db.connect()
    try:
        while not stop.is_set():
            try:
                await conn.execute(f"INSERT INTO {db.jobs} (type) VALUES ('demo.noop')")
            except Exception:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def first_claim_after(db: Database, term: int, since: float, timeout: float = 30) -> float:
    conn = await db.connect()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            first = await conn.fetchval(
                f"SELECT extract(epoch FROM min(started_at))::float8 FROM {db.jobs} "
                "WHERE term > $1",
                term,
            )
            if first is not None:
                return max(0.0, first - since)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    raise RuntimeError("no claim by a new leader")


async def rounds(db: Database, sig: signal.Signals, count: int) -> list[float]:
    replicas = {f"r{i}": Replica(db, name=f"r{i}") for i in range(3)}
    stop = asyncio.Event()
    load = asyncio.create_task(steady_load(db, stop))
    figures = []
    try:
        for _ in range(count):
            holder, term = await wait_for_leader(db)
            await asyncio.sleep(1.0)  # standbys settled, jobs flowing
            holder, term = await wait_for_leader(db)
            pid = int(holder.split("-")[-2])
            (name,) = [n for n, r in replicas.items() if r.pid == pid]
            at = replicas[name].kill(sig)
            figures.append(await first_claim_after(db, term, at))
            replicas[name].process.wait(60)
            replicas[name].stop()
            replicas[name] = Replica(db, name=name)
    finally:
        stop.set()
        await load
        for replica in replicas.values():
            replica.stop()
    return figures


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("failover")
    with database() as db:
        for label, key, sig in (
            ("kill -9 of the leader", "kill9", signal.SIGKILL),
            ("graceful SIGTERM of the leader", "sigterm", signal.SIGTERM),
        ):
            await db.reset()
            values = await rounds(db, sig, args.rounds)
            p50 = percentile(values, 0.5)
            result.add(
                f"{label}: failover p50 / max ({len(values)} rounds)",
                f"{p50 * 1000:.0f} ms / {max(values) * 1000:.0f} ms",
                **{f"{key}_p50_ms": p50 * 1000, f"{key}_max_ms": max(values) * 1000,
                   f"{key}_all_ms": [round(v * 1000, 1) for v in values]},
            )  # fmt: skip
        await db.drop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    result = asyncio.run(main_async(parser.parse_args()))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
