"""A replica reduced to its elector, run as an OS process by the election tests.

Prints one JSON line per event on stdout: ready, elected, deposed, claimed (with
--claim-type: while it believes it leads it claims one job of that type every 50 ms
through the fenced claim statement), and exited. SIGTERM releases leadership
gracefully and exits 0.

    python -m tests.support.elector_process DSN SCHEMA NAME [--lease S] [--claim-type T]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import Any

import asyncpg

from dispatcher.core.log import configure_logging
from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.services.elector import ElectionTiming, Elector
from dispatcher.services.notifier import Notifier
from dispatcher.services.replicas import incarnation_id


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "at": time.time(), **fields}), flush=True)


async def claim_probe(elector: Elector, dsn: str, schema: str, job_type: str) -> None:
    claim = queries_for(schema)["claim_jobs"]
    # Claims are fenced by their owner's replica row (as a runtime's registry keeps it).
    register = queries_for(schema)["replica_heartbeat"]
    claims = 0
    conn: asyncpg.Connection | None = None
    while True:
        await asyncio.sleep(0.05)  # the probe's pace (see the module docstring)
        term = elector.term
        if not elector.is_leader() or term is None:
            continue
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn)
                await conn.execute(
                    register, elector.owner_id, "probe", "test", 0, "test", "leader", []
                )
            claims += 1
            rows = await conn.fetch(
                claim, term, elector.owner_id, [job_type], [1], 1, [1], [None], claims, [None],
                [None], [None],
                timeout=2,
            )  # fmt: skip
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            conn = None
            continue
        for row in rows:
            emit("claimed", job_id=row["id"], term=term)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("name")
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--claim-type")
    args = parser.parse_args()
    configure_logging("json", "info", replica=args.name)

    owner = incarnation_id(args.name)

    async def elected(term: int) -> None:
        emit("elected", term=term, owner=owner)

    async def deposed(reason: str) -> None:
        emit("deposed", reason=reason, owner=owner)

    notifier = Notifier(args.dsn)
    notifier.start()
    elector = Elector(
        notifier,
        args.schema,
        owner,
        timing=ElectionTiming(lease=args.lease),
        on_elected=elected,
        on_deposed=deposed,
        metrics=Metrics(),
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(elector.run())]
    if args.claim_type:
        tasks.append(
            asyncio.create_task(claim_probe(elector, args.dsn, args.schema, args.claim_type))
        )
    emit("ready", owner=owner)
    await stop.wait()
    await elector.release()
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await notifier.close()
    emit("exited", owner=owner)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
