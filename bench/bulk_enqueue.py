"""Benchmark 4: ``Client.enqueue_many`` against a raw COPY of the same rows.

Both write N ``demo.noop`` jobs with a small JSON payload into the same schema with
psycopg: the raw side is a bare ``COPY jobs (type, payload) FROM STDIN`` with the
payloads serialized by json.dumps; the client also reserves ids (so it can return
them) and validates its input. Best of three runs each.

    python -m bench.bulk_enqueue [--jobs 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psycopg

from bench.common import Database, Result, database
from dispatcher import Client


def raw_copy(db: Database, payloads: list[dict[str, int]]) -> float:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY {db.jobs} (type, payload) FROM STDIN") as copy:
            for payload in payloads:
                copy.write_row(("demo.noop", json.dumps(payload)))
        return time.perf_counter() - started


def client_enqueue_many(db: Database, payloads: list[dict[str, int]]) -> float:
    with Client(db.dsn, schema=db.schema, min_size=1, max_size=1) as client:
        client.list_jobs(limit=1)  # a connection is open: time only the call
        started = time.perf_counter()
        ids = client.enqueue_many("demo.noop", payloads)
        elapsed = time.perf_counter() - started
    assert len(ids) == len(payloads)
    return elapsed


async def fresh(db: Database) -> None:
    await db.reset()


def main_sync(args: argparse.Namespace) -> Result:
    result = Result("bulk_enqueue")
    payloads = [{"n": n} for n in range(args.jobs)]
    with database() as db:
        raw_times, client_times = [], []
        for _ in range(3):
            asyncio.run(fresh(db))
            raw_times.append(raw_copy(db, payloads))
            asyncio.run(fresh(db))
            client_times.append(client_enqueue_many(db, payloads))
        asyncio.run(db.drop())
    raw_rate = args.jobs / min(raw_times)
    client_rate = args.jobs / min(client_times)
    result.add(f"raw COPY ({args.jobs:,} rows)", f"{raw_rate:,.0f} jobs/s", raw=raw_rate)
    result.add("Client.enqueue_many", f"{client_rate:,.0f} jobs/s", client=client_rate)
    result.add("ratio to raw COPY", f"{client_rate / raw_rate:.0%}", ratio=client_rate / raw_rate)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    result = main_sync(parser.parse_args())
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
