"""Benchmark: how soon a job starts once the jobs it depends on completed.

Issue 17's target: in a 1,000-node fan-out/fan-in, the join starts within 50 ms of the
last branch finishing (no poll delay: the completion that ends the last dependency
makes the join pending and NOTIFYs the leader). One real replica
(``dispatcher run dispatcher.examples:app``, ``--concurrency`` slots) runs, per
round, a graph enqueued with ``enqueue_graph``: a root, ``--branches`` branches that
depend on it, and a join that depends on every branch, all ``demo.noop``. From the
table's timestamps (the database clock; a job's finished_at is the start of the
transaction that ended it, its started_at the claim's):

- fan-in: the join's started_at minus the last branch's finished_at (target: 50 ms);
- fan-out: the first branch's started_at minus the root's finished_at;
- branches: the last branch's finished_at minus the first one's started_at, beside the
  same for as many jobs without dependencies (enqueue_many), run in the same round:
  what waiting, counting down and waking cost the burn-down.

    python -m bench.dependencies [--branches 1000] [--rounds 5] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import asyncpg

from bench.common import Database, Replica, Result, database, wait_for_leader
from dispatcher import AsyncClient

TARGET_MS = 50.0
TIMEOUT = 300.0


async def wait_finished(conn: asyncpg.Connection, db: Database, ids: list[int]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        left = await conn.fetchval(
            f"SELECT count(*) FROM {db.jobs} WHERE id = ANY($1) "
            "AND status NOT IN ('completed', 'failed', 'cancelled')",
            ids,
        )
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} jobs unfinished after {TIMEOUT}s")
        await asyncio.sleep(0.02)


async def graph_round(
    conn: asyncpg.Connection, db: Database, client: AsyncClient, branches: int
) -> dict[str, float]:
    names = [f"b{i}" for i in range(branches)]
    graph: dict[str, dict[str, Any]] = {"root": {"type": "demo.noop"}}
    graph.update({name: {"type": "demo.noop", "depends_on": ["root"]} for name in names})
    graph["join"] = {"type": "demo.noop", "depends_on": names}
    ids = await client.enqueue_graph(graph)
    await wait_finished(conn, db, list(ids.values()))
    row = await conn.fetchrow(
        f"""
        WITH b AS (
            SELECT min(started_at) AS first_start, max(finished_at) AS last_finish,
                   count(*) FILTER (WHERE status <> 'completed') AS failed
            FROM {db.jobs} WHERE id = ANY($1)
        )
        SELECT extract(epoch FROM j.started_at - b.last_finish) * 1000 AS fan_in,
               extract(epoch FROM b.first_start - r.finished_at) * 1000 AS fan_out,
               extract(epoch FROM b.last_finish - b.first_start) * 1000 AS branches,
               b.failed + (r.status <> 'completed')::int + (j.status <> 'completed')::int
                   AS failed
        FROM b, {db.jobs} r, {db.jobs} j
        WHERE r.id = $2 AND j.id = $3
        """,
        [ids[name] for name in names],
        ids["root"],
        ids["join"],
    )
    if row["failed"]:
        raise RuntimeError(f"{row['failed']} jobs of the graph did not complete")
    return {key: float(row[key]) for key in ("fan_in", "fan_out", "branches")}


async def flat_round(
    conn: asyncpg.Connection, db: Database, client: AsyncClient, jobs: int
) -> float:
    """Milliseconds from the first start to the last finish of ``jobs`` no-op jobs
    without dependencies."""
    ids = await client.enqueue_many("demo.noop", [None] * jobs)
    await wait_finished(conn, db, ids)
    span = await conn.fetchval(
        f"SELECT extract(epoch FROM max(finished_at) - min(started_at)) * 1000 "
        f"FROM {db.jobs} WHERE id = ANY($1)",
        ids,
    )
    return float(span)


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("dependencies")
    with database() as db:
        await db.reset()
        replica = Replica(db, env={"DISPATCHER_CONCURRENCY": str(args.concurrency)})
        conn = await db.connect()
        client = await AsyncClient.connect(db.dsn, schema=db.schema)
        try:
            await wait_for_leader(db)
            rounds, flat = [], []
            for _ in range(args.rounds):
                rounds.append(await graph_round(conn, db, client, args.branches))
                flat.append(await flat_round(conn, db, client, args.branches))
        finally:
            await client.close()
            await conn.close()
            replica.stop()
        await db.drop()
    fan_in = [r["fan_in"] for r in rounds]
    fan_out = [r["fan_out"] for r in rounds]
    branch_spans = [r["branches"] for r in rounds]
    met = "met" if max(fan_in) <= TARGET_MS else "NOT met"
    n = f"{args.branches:,}"
    result.add(
        f"fan-in of {n}: join start - last branch finish",
        f"median {statistics.median(fan_in):6.1f} ms   max {max(fan_in):6.1f} ms   "
        f"(target <= {TARGET_MS:g} ms: {met})",
        fan_in_median_ms=statistics.median(fan_in),
        fan_in_max_ms=max(fan_in),
        fan_in_runs_ms=fan_in,
    )
    result.add(
        f"fan-out to {n}: first branch start - root finish",
        f"median {statistics.median(fan_out):6.1f} ms   max {max(fan_out):6.1f} ms",
        fan_out_median_ms=statistics.median(fan_out),
        fan_out_max_ms=max(fan_out),
    )
    result.add(
        f"{n} branches (with dependencies): first start to last finish",
        f"median {statistics.median(branch_spans):6.0f} ms",
        branches_median_ms=statistics.median(branch_spans),
    )
    result.add(
        f"{n} jobs without dependencies: first start to last finish",
        f"median {statistics.median(flat):6.0f} ms   "
        f"(graph / flat: {statistics.median(branch_spans) / statistics.median(flat):.2f}x)",
        flat_median_ms=statistics.median(flat),
    )
    result.add(
        "rounds, concurrency", f"{args.rounds}, {args.concurrency}", concurrency=args.concurrency
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--branches", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
