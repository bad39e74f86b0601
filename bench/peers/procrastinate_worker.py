"""One Procrastinate burn-down: apply the schema, defer N no-ops, drain, print one JSON line.

Runs with the peers' interpreter (.venv-peers, see bench/requirements-peers.txt), never
ours: it imports nothing from this repository. The orchestrator (bench/peers/__main__.py)
starts it once per grid point.

1. Creates a fresh schema; every connection of the app's ``PsycopgConnector`` pool
   sets ``search_path`` to it (libpq ``options``), so ``App.schema_manager
   .apply_schema_async`` creates Procrastinate's fixed-name tables and functions there.
2. Defers ``--jobs`` jobs of the ``noop`` task with one ``Task.batch_defer_async``
   (one ``procrastinate_defer_jobs`` call for all of them).
3. Runs ``App.run_worker_async`` with ``wait=False`` (the worker stops once a fetch
   finds no job, after its running jobs end), ``concurrency=--concurrency`` and the
   connector's pool at ``--pool`` connections (``min_size = max_size``; the library's
   default pool is psycopg's, 4 connections). Every job is one
   ``procrastinate_fetch_job_v2`` and one ``procrastinate_finish_job`` call: the
   library has no batch fetch or batch acknowledgement, so the pool size is the knob
   that matters most. Jobs are kept (``delete_jobs`` never, the default), which also
   keeps the event rows read below.
4. Throughput from Procrastinate's own event table, like the dispatcher's burn-down
   reads its jobs table: ``succeeded`` events / (last ``succeeded`` ``at`` - first
   ``started`` ``at``), both on the database clock. The in-process wall time of the
   worker run (startup and shutdown included) is printed beside it.
5. Drops the schema.

    .venv-peers/bin/python bench/peers/procrastinate_worker.py --dsn DSN --jobs 20000 \
        --concurrency 100 --pool 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from typing import Any

import procrastinate
import psycopg

TASK = "noop"

# It warns that a worker in another process could not import tasks of a ``__main__``
# module; this worker runs in this very process, so the warning is noise on stderr.
logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    schema = f"peer_proc_{uuid.uuid4().hex[:8]}"
    admin = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        connector = procrastinate.PsycopgConnector(
            conninfo=args.dsn,
            kwargs={"options": f"-c search_path={schema}"},
            min_size=args.pool,
            max_size=args.pool,
        )
        app = procrastinate.App(connector=connector)

        @app.task(name=TASK)
        async def noop() -> None:
            """Does nothing: the benchmark measures the queue, not the work."""

        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            await noop.batch_defer_async(*({} for _ in range(args.jobs)))
            await admin.execute(f'VACUUM ANALYZE "{schema}".procrastinate_jobs')
            started = time.monotonic()
            await app.run_worker_async(
                concurrency=args.concurrency,
                wait=False,
                install_signal_handlers=False,
                listen_notify=args.listen_notify,
            )
            wall = time.monotonic() - started

        cursor = await admin.execute(
            f"""
            SELECT count(*) FILTER (WHERE type = 'succeeded'),
                   extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')
                                    - min(at) FILTER (WHERE type = 'started'))::float8
            FROM "{schema}".procrastinate_events
            """
        )
        row = await cursor.fetchone()
        cursor = await admin.execute(
            f"""SELECT count(*) FROM "{schema}".procrastinate_jobs WHERE status <> 'succeeded'"""
        )
        other = await cursor.fetchone()
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
    assert row is not None and other is not None
    done, seconds = int(row[0]), float(row[1])
    if done != args.jobs or other[0]:
        raise RuntimeError(f"{done} of {args.jobs} jobs succeeded, {other[0]} did not")
    return {
        "peer": "procrastinate",
        "config": {
            "concurrency": args.concurrency,
            "pool": args.pool,
            "listen_notify": args.listen_notify,
        },
        "jobs": done,
        "seconds": seconds,
        "rate": done / seconds,
        "wall_rate": done / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument(
        "--listen-notify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the library's default; off saves the pool the listening connection",
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
