"""A PostgreSQL primary failover under load (issue 13): the primary crashes
(``pg_ctl stop -m immediate``) while jobs run and a producer enqueues, its synchronous
standby is promoted, and two real replicas on a multi-host DSN
(``target_session_attrs=read-write``) reconnect to it, elect a leader under a new term
and carry on. Every job acknowledged to a producer completes; no attempt of a job runs
beside another.

The replicas run with the production defaults (lease 10 s, stale_after 30 s, election
every 0.5 s), so the printed figures are what an operator would see; a row stranded
`processing` until the reaper's stale_after could not complete inside the 20 s bound.

    timeout 600 .venv/bin/python -m pytest -q tests/chaos/test_primary_failover.py -s
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from typing import Any

import asyncpg
import pytest

from dispatcher.producers.async_client import AsyncClient
from dispatcher.producers.client import Client
from tests.chaos.conftest import StartChaosReplicas
from tests.support.attempt_log import fetch_runs, overlapping_runs
from tests.support.database import TestDatabase, migrated_schema
from tests.support.processes import ReplicaProcess
from tests.support.replicated_postgres import replicated_postgres
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

# The bounds, measured from the moment the promoted standby takes writes.
LEADER_BACK_WITHIN = 5.0
COMPLETED_WITHIN = 20.0
RATE = 40  # jobs a second, one INSERT each
JOB_SECONDS = (0.05, 1.5)  # long enough that dozens are running at the crash
LOAD_BEFORE_CRASH = 3 * RATE  # jobs acknowledged before the crash
RUNNING_AT_CRASH = 15
# Between the crash and the promotion: an HA manager (Patroni, CloudNativePG) takes a
# while to call a primary dead, and meanwhile the replicas find no writable server.
# Nothing is asserted on this pause; it only makes the outage last.
OUTAGE = 2.0
ACKED_AFTER_PROMOTION = 20
REPLICA_ENV = {"CHAOS_CONCURRENCY": "200", "CHAOS_TYPE_LIMIT": "200"}


class Producer:
    """Enqueues ``RATE`` chaos.work jobs a second with the sync Client (psycopg) on a
    thread, one INSERT per job, until stopped. A job is acknowledged once enqueue()
    returned its row; one whose enqueue raised may or may not have committed."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.failed = 0
        self.errors: list[str] = []
        self._acknowledged: list[tuple[int, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the producer did not stop within 30s"

    def acked_ids(self) -> list[int]:
        with self._lock:
            return [job_id for job_id, _ in self._acknowledged]

    def acked_since(self, wall_time: float) -> int:
        with self._lock:
            return sum(1 for _, at in self._acknowledged if at >= wall_time)

    def _run(self) -> None:
        rng = random.Random()
        # A short pool timeout: while no server takes writes an enqueue fails fast and
        # the producer goes on at its rate, as an application would.
        with Client(self.dsn, schema=self.schema, max_size=2, timeout=1.0) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                try:
                    job = client.enqueue("chaos.work", {"seconds": rng.uniform(*JOB_SECONDS)})
                except Exception as exc:  # whatever the outage looks like: go on
                    self.failed += 1
                    if len(self.errors) < 5:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    with self._lock:
                        self._acknowledged.append((job.id, time.time()))
                # Paced by the clock, without a catch-up burst after a stall.
                next_at = max(next_at + 1 / RATE, time.monotonic() - 1 / RATE)
                self._stop.wait(max(0.0, next_at - time.monotonic()))


async def fetchval(dsn: str, sql: str, *args: object) -> Any:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def wait_all_completed(
    dsn: str, schema: str, ids: list[int], *, deadline: float, replicas: list[ReplicaProcess]
) -> float:
    """Wait until every job of ``ids`` completed; the wall-clock time the last one did.
    On timeout, fail naming the jobs that did not (missing or not completed)."""

    async def last_completed() -> float | None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            row = await conn.fetchrow(
                f'SELECT count(*) AS done, extract(epoch FROM max(finished_at)) AS "last" '
                f"FROM \"{schema}\".jobs WHERE id = ANY($1) AND status = 'completed'",
                ids,
            )
        finally:
            await conn.close()
        return float(row["last"]) if row["done"] == len(ids) else None

    try:
        return await eventually(
            last_completed,
            timeout=deadline - time.time(),
            what="every acknowledged job to complete",
            every=0.1,
        )
    except AssertionError:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            present = await conn.fetchval(
                f'SELECT count(*) FROM "{schema}".jobs WHERE id = ANY($1)', ids
            )
            stuck = await conn.fetch(
                f"SELECT id, status, owner, attempts, heartbeat_at, errors "
                f"FROM \"{schema}\".jobs WHERE id = ANY($1) AND status <> 'completed' "
                "ORDER BY id LIMIT 20",
                ids,
            )
        finally:
            await conn.close()
        raise AssertionError(
            f"{len(ids) - present} acknowledged jobs missing on the new primary; not "
            f"completed: {[dict(row) for row in stuck]}; replica logs:\n"
            + "\n".join(f"{r.name}:\n{r.log_tail(15)}" for r in replicas)
        ) from None


def log_events(replicas: list[ReplicaProcess], event: str) -> list[dict[str, Any]]:
    """The replicas' JSON log lines of ``event`` (their logs also hold plain lines)."""
    found = []
    for replica in replicas:
        for line in replica.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{event}"' in line:
                entry = json.loads(line)
                if entry.get("event") == event:
                    found.append({"replica": replica.name, **entry})
    return found


async def test_primary_failover_loses_no_acknowledged_job_and_runs_none_twice(
    replicas: list[ReplicaProcess], start_chaos_replicas: StartChaosReplicas
) -> None:
    with replicated_postgres() as cluster:
        primary, new_primary = cluster.primary.dsn(), cluster.standby.dsn()
        schema = await migrated_schema(primary)
        leader = f'"{schema}".leader'
        try:
            await start_chaos_replicas(TestDatabase(cluster.multi_host_dsn(), schema), REPLICA_ENV)
            await eventually(
                lambda: fetchval(primary, f"SELECT term FROM {leader} WHERE lease_until > now()"),
                timeout=30,
                what="a leader on the primary",
            )
            async_client = await AsyncClient.connect(cluster.multi_host_dsn(), schema=schema)
            producer = Producer(cluster.multi_host_dsn(), schema)
            producer.start()
            try:
                before = await async_client.enqueue("chaos.work", {"seconds": 0.1})

                async def loaded() -> int | None:
                    running = await fetchval(
                        primary,
                        f'SELECT count(*) FROM "{schema}".attempts_log WHERE ended_at IS NULL',
                    )
                    enough = len(producer.acked_ids()) >= LOAD_BEFORE_CRASH
                    return running if enough and running >= RUNNING_AT_CRASH else None

                running_at_crash = await eventually(
                    loaded,
                    timeout=30,
                    what=f"{LOAD_BEFORE_CRASH} jobs enqueued and {RUNNING_AT_CRASH} running; "
                    f"producer errors: {producer.errors}",
                    every=0.05,
                )
                old_term = await fetchval(primary, f"SELECT term FROM {leader}")
                acked_before = len(producer.acked_ids())
                stopped_at = await asyncio.to_thread(cluster.stop_primary)
                await asyncio.sleep(OUTAGE)  # the injected fault: no primary for OUTAGE s
                # Figures count from the promote command: an upper bound, promotion included.
                promoted_at = time.time()
                writable_at = await asyncio.to_thread(cluster.promote_standby)

                async def new_leader() -> tuple[float, int] | None:
                    term = await fetchval(
                        new_primary,
                        f"SELECT term FROM {leader} WHERE lease_until > now() AND term > $1",
                        old_term,
                    )
                    return (time.time(), term) if term else None

                leader_back_at, new_term = await eventually(
                    new_leader, timeout=30, what="a leader under a new term on the new primary"
                )
                # The async client's pooled connection died with the old primary.
                after = await async_client.enqueue("chaos.work", {"seconds": 0.1})
                await eventually(
                    lambda: asyncio.sleep(
                        0, producer.acked_since(promoted_at) >= ACKED_AFTER_PROMOTION
                    ),
                    timeout=30,
                    what=f"the producer to get {ACKED_AFTER_PROMOTION} jobs acknowledged by the "
                    f"new primary; its errors: {producer.errors}",
                    every=0.05,
                )
            finally:
                await asyncio.to_thread(producer.stop)
                await async_client.close()
            acked = [before.id, after.id, *producer.acked_ids()]
            last_completed_at = await wait_all_completed(
                new_primary,
                schema,
                acked,
                deadline=promoted_at + COMPLETED_WITHIN + 10,
                replicas=replicas,
            )
            conn = await asyncpg.connect(new_primary, timeout=5)
            try:
                runs = await fetch_runs(conn, schema)
                jobs = await conn.fetchval(f'SELECT count(*) FROM "{schema}".jobs')
                retried = await conn.fetch(
                    f'SELECT id, attempts, errors FROM "{schema}".jobs '
                    "WHERE id = ANY($1) AND attempts > 1",
                    acked,
                )
            finally:
                await conn.close()
            alive = {replica.name: replica.alive for replica in replicas}
        finally:
            exit_codes = {replica.name: replica.stop() for replica in replicas}

    leader_back = leader_back_at - promoted_at
    last_done = last_completed_at - promoted_at
    handed_back = [
        i for e in log_events(replicas, "claimed_rows_handed_back") for i in e["job_ids"]
    ]
    print(
        f"\nprimary failover: promoted {promoted_at - stopped_at:.2f}s after the crash "
        f"(writable {(writable_at - promoted_at) * 1000:.0f} ms later); leader back after "
        f"{leader_back * 1000:.0f} ms (term {old_term} -> {new_term}); "
        f"last acknowledged job completed after {last_done:.1f}s; jobs {jobs} "
        f"({len(acked)} acknowledged, {acked_before} before the crash, {running_at_crash} "
        f"running at the crash, {producer.failed} enqueues failed in the outage); "
        f"attempts {len(runs)}; jobs retried {len(retried)}; rows handed back {handed_back}"
    )
    for row in retried:
        print(f"  retried job {row['id']}: attempts {row['attempts']}, errors {row['errors']}")
    assert all(alive.values()), f"a replica died: {alive}"
    assert set(exit_codes.values()) == {0}, f"exit codes after SIGTERM: {exit_codes}"
    assert log_events(replicas, "service_crashed") == []
    assert overlapping_runs(runs) == []
    assert leader_back <= LEADER_BACK_WITHIN, f"leader back after {leader_back:.2f}s"
    assert last_done <= COMPLETED_WITHIN, f"last acknowledged job completed after {last_done:.1f}s"
