"""One PgQueuer burn-down: install, enqueue N no-ops, drain them, print one JSON line.

Runs with the peers' interpreter (.venv-peers, see bench/requirements-peers.txt), never
ours: it imports nothing from this repository. The orchestrator (bench/peers/__main__.py)
starts it once per grid point.

1. Creates a fresh schema and connects with ``search_path`` set to it, so PgQueuer's
   fixed table names (``pgqueuer``, ``pgqueuer_log``, ...) land there; ``Queries.install``
   creates them with the library's default durability (every table logged, like ours).
2. Enqueues ``--jobs`` jobs for the ``noop`` entrypoint with one batch ``Queries.enqueue``
   (lists of entrypoints, payloads and priorities: one statement).
3. Runs ``QueueManager.run`` in drain mode (it returns once the queue is empty and its
   tasks have finished) with ``--batch`` as ``batch_size`` and ``--concurrency`` as
   ``max_concurrent_tasks`` (this worker's cap on picked jobs). ``--pool 1`` gives the
   manager one asyncpg connection, as PgQueuer's own examples do; ``--pool P`` an asyncpg
   pool of P connections (``Queries.from_asyncpg_pool``), so dequeues, status logs and
   heartbeats stop queueing behind one connection's lock.
4. Throughput from PgQueuer's own log table, like the dispatcher's burn-down reads its
   jobs table: successful jobs / (last ``successful`` log row's ``created`` - first
   ``picked`` row's ``created``), both on the database clock. The in-process wall time
   of ``run`` (startup and the drain-mode exit check included) is printed beside it.
5. Drops the schema.

    .venv-peers/bin/python bench/peers/pgqueuer_worker.py --dsn DSN --jobs 20000 \
        --concurrency 100 --batch 10 --pool 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import asyncpg
from pgqueuer.core.qm import QueueManager
from pgqueuer.domain.models import Job
from pgqueuer.domain.types import QueueExecutionMode
from pgqueuer.queries import Queries

ENTRYPOINT = "noop"


async def connect(dsn: str, schema: str, pool: int) -> asyncpg.Connection | asyncpg.Pool:
    settings = {"search_path": schema}
    if pool <= 1:
        return await asyncpg.connect(dsn, server_settings=settings)
    return await asyncpg.create_pool(dsn, min_size=pool, max_size=pool, server_settings=settings)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    schema = f"peer_pgq_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        setup = await asyncpg.connect(args.dsn, server_settings={"search_path": schema})
        try:
            queries = Queries.from_asyncpg_connection(setup)
            await queries.install()
            await queries.enqueue([ENTRYPOINT] * args.jobs, [None] * args.jobs, [0] * args.jobs)
            await setup.execute("VACUUM ANALYZE pgqueuer")
        finally:
            await setup.close()

        handle = await connect(args.dsn, schema, args.pool)
        try:
            if isinstance(handle, asyncpg.Pool):
                manager = QueueManager(Queries.from_asyncpg_pool(handle))
            else:
                manager = QueueManager(Queries.from_asyncpg_connection(handle))

            @manager.entrypoint(ENTRYPOINT)
            async def noop(job: Job) -> None:
                """Does nothing: the benchmark measures the queue, not the work."""

            started = time.monotonic()
            await manager.run(
                batch_size=args.batch,
                max_concurrent_tasks=args.concurrency,
                mode=QueueExecutionMode.drain,
            )
            wall = time.monotonic() - started
        finally:
            await handle.close()

        row = await admin.fetchrow(
            f"""
            SELECT count(*) FILTER (WHERE status = 'successful') AS done,
                   count(*) FILTER (WHERE status <> 'successful' AND status <> 'picked')
                       AS other,
                   extract(epoch FROM max(created) FILTER (WHERE status = 'successful')
                                    - min(created) FILTER (WHERE status = 'picked'))::float8
                       AS seconds
            FROM "{schema}".pgqueuer_log
            """
        )
        left = await admin.fetchval(f'SELECT count(*) FROM "{schema}".pgqueuer')
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
    done = int(row["done"])
    if done != args.jobs or left:
        raise RuntimeError(f"{done} of {args.jobs} jobs succeeded, {left} left in the queue")
    return {
        "peer": "pgqueuer",
        "config": {"concurrency": args.concurrency, "batch": args.batch, "pool": args.pool},
        "jobs": done,
        "seconds": row["seconds"],
        "rate": done / float(row["seconds"]),
        "wall_rate": done / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--pool", type=int, default=1, help="1: one connection; P: a pool")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
