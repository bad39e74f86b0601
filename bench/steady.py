"""Steady state: one replica under a fixed offered rate, through the faults queues meet.

A queue in production is rarely drained from a full table: jobs arrive at a rate,
and what matters is whether they keep finishing at that rate, how long each waits to
start, and what happens when something else on the database misbehaves. So:

* One real ``dispatcher run bench.apps:steady`` process with
  ``DISPATCHER_CONCURRENCY`` = slots (default settings otherwise), whose ``bench.sleep``
  executor waits ``--job-ms`` per job.
* A producer offers R jobs/s for the whole run with plain SQL: every 10 ms it inserts
  ``R * elapsed - inserted`` rows in one INSERT, so the offered rate is exact over time
  however late a tick comes.
* Four phases of ``--phase-seconds`` each, back to back:
  ``clean``; ``idle-in-tx`` (another session holds a REPEATABLE READ transaction with
  an xid for the whole phase, so vacuum can remove no dead row version; committed at
  the phase's end); ``recovery`` (vacuum catches up); ``crash`` (kill -9 of the replica
  at the phase's start, a new one with the same settings ``--restart-after`` s later).

Per phase, from the database clock (``created_at``, ``started_at``, ``finished_at``):
completions (jobs finished in the phase window / its length) against the offered
rate; pickup latency p50/p99 (``started_at - created_at``) of the jobs created in the
phase; the pending count, dead tuples and size of the jobs table at its end. For the
crash: the jobs the killed replica left processing, and the seconds from the kill
until a whole second (bucketed on ``finished_at`` from the kill) completes at least
90% of the offered rate. Latencies are read after the last phase and a drain (the
producer stopped, pending jobs run), so jobs that waited out a phase still count;
any never started are reported.

Dead tuples are ``pg_stat_get_dead_tuples`` after ``pg_stat_force_next_flush()``
(PostgreSQL 15+). That flushes only this session's counters: the replica's backends
report theirs at most once a second, so the figure lags the table by about a second.

Every (rate, slots) pair runs on a freshly migrated schema; all go into one result.

    python -m bench.steady [--rates 500,2000] [--slots 16,100] [--job-ms 1]
                           [--phase-seconds 120] [--restart-after 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import Database, Replica, Result, database
from bench.raw_sql import parse_ints

PHASES = ("clean", "idle-in-tx", "recovery", "crash")
APP = "bench.apps:steady"
JOB_TYPE = "bench.sleep"
TICK = 0.01
RECOVERED_SHARE = 0.9
STARTUP_TIMEOUT = 60.0
# Long enough for the reaper to rescue what a killed replica held (stale_after 30 s,
# reaper every 5 s) and for the new replica to run it.
DRAIN_TIMEOUT = 120.0
REPO = Path(__file__).resolve().parent.parent


def progress(message: str) -> None:
    """Progress goes to stderr: stdout is the table, first line the benchmark's name."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def log_tail(replica: Replica, lines: int = 40) -> str:
    try:
        text = Path(replica.log.name).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {replica.log.name}: {exc.strerror})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"last lines of {replica.log.name}:\n{tail or '(empty)'}"


class ReplicaFailed(RuntimeError):
    def __init__(self, replica: Replica, problem: str) -> None:
        who = f"replica {replica.name} (pid {replica.pid})"
        super().__init__(f"{who} {problem}\n{log_tail(replica)}")


def replica_env(slots: int) -> dict[str, str]:
    # The app module lives in this repository, not in the installed package: make it
    # importable whatever the working directory.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {"DISPATCHER_CONCURRENCY": str(slots), "PYTHONPATH": path}


async def start_leader(db: Database, env: dict[str, str]) -> Replica:
    """A replica, once it holds the lease (so the first phase measures a running one)."""
    replica = Replica(db, name="steady", app=APP, env=env)
    conn = await db.connect()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            code = replica.process.poll()
            if code is not None:
                raise ReplicaFailed(replica, f"exited with code {code} while starting")
            holder = await conn.fetchval(
                f'SELECT holder FROM "{db.schema}".leader WHERE lease_until > now()'
            )
            if holder is not None and holder.startswith(replica.owner_prefix):
                return replica
            await asyncio.sleep(0.05)
        raise ReplicaFailed(replica, f"did not lead within {STARTUP_TIMEOUT:g} s")
    except BaseException:
        replica.stop()
        raise
    finally:
        await conn.close()


async def produce(db: Database, rate: int, job_ms: float) -> None:
    """Offer ``rate`` jobs/s until cancelled."""
    conn = await db.connect()
    payload = json.dumps({"ms": job_ms})
    try:
        began = time.monotonic()
        inserted = 0
        while True:
            due = int(rate * (time.monotonic() - began)) - inserted
            if due > 0:
                await conn.execute(
                    f"INSERT INTO {db.jobs} (type, payload) "
                    "SELECT $1, $2::jsonb FROM generate_series(1, $3)",
                    JOB_TYPE,
                    payload,
                    due,
                )
                inserted += due
            await asyncio.sleep(TICK)
    finally:
        await conn.close()


async def hold_xmin(db: Database) -> asyncpg.Connection:
    """A session whose open transaction keeps every row version since it began."""
    conn = await db.connect()
    try:
        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await conn.fetchval("SELECT txid_current()")
    except BaseException:
        await conn.close()
        raise
    return conn


async def release(conn: asyncpg.Connection) -> None:
    try:
        if not conn.is_closed():
            await conn.execute("COMMIT")
    finally:
        await conn.close()


async def watch(seconds: float, producer: asyncio.Task[None], replica: Replica | None) -> None:
    """Wait ``seconds``, failing fast if the producer or the replica dies meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if producer.done():
            producer.result()
            raise RuntimeError("the producer stopped")
        if replica is not None and (code := replica.process.poll()) is not None:
            raise ReplicaFailed(replica, f"exited with code {code}")
        await asyncio.sleep(min(0.2, left))


@dataclass
class Window:
    """One phase as the database saw it, and the table's state at its end."""

    phase: str
    start: datetime
    end: datetime
    killed_at: datetime | None
    orphaned: int | None
    pending: int
    dead_tuples: int
    autovacuums: int
    table_bytes: int


async def db_now(conn: asyncpg.Connection) -> datetime:
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


async def table_state(conn: asyncpg.Connection, db: Database) -> dict[str, int]:
    pending = await conn.fetchval(f"SELECT count(*) FROM {db.jobs} WHERE status = 'pending'")
    if conn.get_server_version().major >= 15:
        await conn.execute("SELECT pg_stat_force_next_flush()")
    row = await conn.fetchrow(
        "SELECT pg_stat_get_dead_tuples($1::regclass) AS dead, "
        "pg_stat_get_autovacuum_count($1::regclass) AS autovacuums, "
        "pg_total_relation_size($1::regclass) AS bytes",
        db.jobs,
    )
    return {
        "pending": pending,
        "dead_tuples": row["dead"],
        "autovacuums": row["autovacuums"],
        "table_bytes": row["bytes"],
    }


async def run_phases(db: Database, rate: int, slots: int, args: argparse.Namespace) -> list[Window]:
    """The four phases under load, then a drain; cleans up whatever happens."""
    env = replica_env(slots)
    tag = f"{rate}/s, {slots} slots"
    replicas: list[Replica] = []
    held: asyncpg.Connection | None = None
    producer: asyncio.Task[None] | None = None
    monitor = await db.connect()
    windows: list[Window] = []
    try:
        progress(f"[{tag}] starting a replica")
        replicas.append(await start_leader(db, env))
        producer = asyncio.create_task(produce(db, rate, args.job_ms))
        for phase in PHASES:
            progress(f"[{tag}] phase {phase}: {args.phase_seconds:g} s")
            start = await db_now(monitor)
            began = time.monotonic()
            killed_at = orphaned = None
            if phase == "idle-in-tx":
                held = await hold_xmin(db)
            elif phase == "crash":
                dead = replicas[-1]
                dead.kill(signal.SIGKILL)
                killed_at = await db_now(monitor)
                await watch(args.restart_after, producer, None)
                # Rows it held (running, or finished but not yet written): they wait for
                # the reaper (stale_after) and count against the slots meanwhile. Counted
                # now, not at the kill: a completion it had already sent still commits.
                orphaned = await monitor.fetchval(
                    f"SELECT count(*) FROM {db.jobs} "
                    "WHERE status = 'processing' AND starts_with(owner, $1)",
                    dead.owner_prefix,
                )
                progress(f"[{tag}] restarting the replica")
                # Not waiting for it to lead: the wait is part of what the phase measures.
                replicas.append(Replica(db, name="steady", app=APP, env=env))
            await watch(args.phase_seconds - (time.monotonic() - began), producer, replicas[-1])
            end = await db_now(monitor)
            state = await table_state(monitor, db)
            if held is not None:
                await release(held)
                held = None
            windows.append(Window(phase, start, end, killed_at, orphaned, **state))
            progress(
                f"[{tag}] end of {phase}: {state['pending']:,} pending, "
                f"{state['dead_tuples']:,} dead tuples"
            )
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        await drain(monitor, db, tag)
        return windows
    finally:
        if producer is not None and not producer.done():
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
        if held is not None:
            with contextlib.suppress(Exception):
                await release(held)
        for replica in replicas:
            replica.stop()
        await monitor.close()


async def drain(conn: asyncpg.Connection, db: Database, tag: str) -> None:
    """Let the pending jobs start, so that late pickups count in their phase."""
    progress(f"[{tag}] producer stopped; draining the pending jobs")
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        pending = await conn.fetchval(f"SELECT count(*) FROM {db.jobs} WHERE status = 'pending'")
        if pending == 0:
            return
        await asyncio.sleep(0.2)
    progress(f"[{tag}] {pending:,} jobs still pending after {DRAIN_TIMEOUT:g} s")


async def measure(
    conn: asyncpg.Connection, db: Database, window: Window, rate: int
) -> dict[str, Any]:
    """The phase's figures, from the table's timestamps (the database clock)."""
    seconds = (window.end - window.start).total_seconds()
    row = await conn.fetchrow(
        f"""
        SELECT count(*) FILTER (WHERE created_at >= $1 AND created_at < $2) AS created,
               count(*) FILTER (WHERE finished_at >= $1 AND finished_at < $2) AS finished,
               count(*) FILTER (WHERE created_at >= $1 AND created_at < $2
                                  AND started_at IS NULL) AS unstarted,
               percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
                   ORDER BY extract(epoch FROM started_at - created_at)::float8 * 1000)
                   FILTER (WHERE created_at >= $1 AND created_at < $2
                             AND started_at IS NOT NULL) AS pickup_ms
        FROM {db.jobs}
        """,
        window.start,
        window.end,
    )
    p50, p99 = row["pickup_ms"] or (None, None)
    figures: dict[str, Any] = {
        "phase": window.phase,
        "seconds": round(seconds, 3),
        "offered_per_s": row["created"] / seconds,
        "completed_per_s": row["finished"] / seconds,
        "completed_share": row["finished"] / (rate * seconds),
        "pickup_p50_ms": p50,
        "pickup_p99_ms": p99,
        "never_started": row["unstarted"],
        "pending": window.pending,
        "dead_tuples": window.dead_tuples,
        "autovacuums": window.autovacuums,
        "table_bytes": window.table_bytes,
    }
    if window.killed_at is not None:
        figures.update(await crash_recovery(conn, db, window, rate))
    return figures


async def crash_recovery(
    conn: asyncpg.Connection, db: Database, window: Window, rate: int
) -> dict[str, Any]:
    """Seconds from the kill to the end of the first whole second completing at least
    90% of the offered rate, and to the first job finished after the kill."""
    assert window.killed_at is not None
    whole_seconds = int((window.end - window.killed_at).total_seconds())
    rows = await conn.fetch(
        f"""
        SELECT floor(extract(epoch FROM finished_at - $1))::int AS second, count(*) AS finished
        FROM {db.jobs}
        WHERE finished_at >= $1 AND finished_at < $1 + make_interval(secs => $2)
        GROUP BY 1 ORDER BY 1
        """,
        window.killed_at,
        float(whole_seconds),
    )
    recovered = next(
        (r["second"] + 1 for r in rows if r["finished"] >= RECOVERED_SHARE * rate), None
    )
    first = await conn.fetchval(
        f"SELECT extract(epoch FROM min(finished_at) - $1)::float8 FROM {db.jobs} "
        "WHERE finished_at >= $1",
        window.killed_at,
    )
    return {
        "orphaned_by_kill": window.orphaned,
        "recovered_after_s": recovered,
        "first_finish_after_kill_s": first,
    }


def describe(figures: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    text = (
        f"done {figures['completed_per_s']:,.0f}/s ({figures['completed_share']:.0%}), "
        f"pickup p50 {ms(figures['pickup_p50_ms'])} / p99 {ms(figures['pickup_p99_ms'])} ms, "
        f"{figures['pending']:,} pending, {figures['dead_tuples']:,} dead, "
        f"{figures['table_bytes'] / 2**20:.0f} MiB"
    )
    if figures["never_started"]:
        text += f", {figures['never_started']:,} never started"
    if figures["phase"] == "crash":
        recovered = figures["recovered_after_s"]
        text += f", {figures['orphaned_by_kill']} orphaned by the kill"
        text += (
            f", back to {RECOVERED_SHARE:.0%} after {recovered} s"
            if recovered is not None
            else f", not back to {RECOVERED_SHARE:.0%} within the phase"
        )
    return text


async def main_async(args: argparse.Namespace) -> Result:
    result = Result("steady")
    runs = []
    with database() as db:
        for rate in args.rates:
            for slots in args.slots:
                await db.reset()
                windows = await run_phases(db, rate, slots, args)
                conn = await db.connect()
                try:
                    phases = [await measure(conn, db, w, rate) for w in windows]
                finally:
                    await conn.close()
                for figures in phases:
                    result.add(f"{rate:,}/s, {slots} slots, {figures['phase']}", describe(figures))
                runs.append({"rate": rate, "slots": slots, "phases": phases})
        await db.drop()
    result.figures.update(
        job_ms=args.job_ms,
        phase_seconds=args.phase_seconds,
        restart_after=args.restart_after,
        runs=runs,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=parse_ints, default=[500, 2000], help="jobs/s offered")
    parser.add_argument(
        "--slots", type=parse_ints, default=[16, 100], help="DISPATCHER_CONCURRENCY"
    )
    parser.add_argument("--job-ms", type=float, default=1.0, help="each job's duration")
    parser.add_argument("--phase-seconds", type=float, default=120.0)
    parser.add_argument("--restart-after", type=float, default=5.0, help="crash → new replica")
    args = parser.parse_args()
    if not 0 <= args.restart_after < args.phase_seconds:
        # Otherwise the new replica starts after the crash phase is over: nothing to see.
        parser.error("--restart-after must be at least 0 and less than --phase-seconds")
    result = asyncio.run(main_async(args))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
