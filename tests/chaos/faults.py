"""The chaos faults aimed at particular jobs, and the checks on those jobs afterwards.

The process and database faults (kill -9, SIGSTOP, SIGTERM of the leader, a PostgreSQL
restart, terminated connections; in harness.py) are judged by the run-wide checks alone:
nothing lost, no overlap, limits kept. Each fault here also inserts the jobs it puts at
risk, records them on its :class:`Fault`, and :meth:`JobFaults.check` holds them to one
guarantee of the runtime afterwards:

* ``lock_row``: another session holds a running job's row lock (``SELECT ... FOR
  UPDATE``) for longer than ``stale_after``. The heartbeat skips the row and the replica
  lists it, so the reaper spares it: the job completes on its first attempt, run once,
  its ``errors`` empty.
* ``sigterm_sync``: SIGTERM of the leader while plain def jobs sleep past its shutdown
  timeout and grace. It hands their jobs back and exits 0 at once; they run again
  elsewhere only after that exit (the overlap check ends the cut-off runs at the exit
  time the harness saw) and complete.
* ``stop_claim_in_flight``: SIGTERM of the leader right as the NOTIFY of a burst of
  max_attempts=1 jobs wakes it to claim, three times. A claim in flight is started or
  handed back, attempt refunded, never left to a rescue: none of those jobs fails.
* ``stranger_cancel``: a role with no privilege sends a cancel NOTIFY for every running
  job. A NOTIFY is only a hint: nothing is cancelled, no row gets cancel_requested.

A fault returns only once its jobs are past the risk it puts them at (the lock released
and the locked job finished; the max_attempts=1 jobs finished; the notified jobs
finished), so the next fault of the cycle, usually aimed at the leader that runs them,
cannot legitimately rescue or fail them. The jobs ``sigterm_sync`` hands back are not
waited for: a later fault may rightly retry them, and the run-wide checks judge them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from dispatcher.core.config import Settings
from dispatcher.services.draining import SHUTDOWN_GRACE
from tests.support.processes import ReplicaProcess
from tests.support.waiting import eventually

JOB_FAULTS = ("lock_row", "sigterm_sync", "stop_claim_in_flight", "stranger_cancel")

STRANGER = "chaos_stranger"  # a login role with no privilege on the schema
# lock_row: the locked job runs this much past stale_after, the lock is held this much
# past it; so the lock outlives stale_after (and a few reaper passes) and is released
# while the job still runs.
LOCKED_JOB_PAST_STALE = 8.0
LOCK_HELD_PAST_STALE = 5.0
# sigterm_sync: threads sleep this much past the shutdown timeout and its grace, so
# they still run when the process hands their jobs back and exits.
SYNC_JOBS = 3
SYNC_PAST_SHUTDOWN = 6.0
# stop_claim_in_flight: SIGTERMs per injection, and the max_attempts=1 burst each time.
CLAIM_STOPS = 3
CLAIM_BURST = 40
CLAIM_JOB_SECONDS = 0.1
# stranger_cancel: jobs long enough to be running when the NOTIFY arrives.
NOTIFIED_JOBS = 5
NOTIFIED_JOB_SECONDS = 3.0
# How long a fault waits for its jobs to start, or to finish.
START_WITHIN = 30.0
FINISH_WITHIN = 60.0


@dataclass
class Fault:
    kind: str
    at: float  # wall clock (shared with the replicas and the database)
    target: str | None = None
    target_pid: int | None = None
    old_term: int | None = None  # None: not aimed at the leader, no failover to measure
    resumed_at: float | None = None  # SIGCONT, the database back, the row lock released
    failover: float | None = None
    exited_at: float | None = None  # the target process seen exited (SIGTERM faults)
    exit_code: int | None = None
    job_ids: list[int] = field(default_factory=list)  # the jobs this fault put at risk


class Cluster(Protocol):
    """What the faults here need of the harness."""

    dsn: str

    async def wait_leader(self, timeout: float = 30) -> tuple[ReplicaProcess, int]: ...

    async def stop_and_restart(self, replica: ReplicaProcess, fault: Fault) -> None:
        """SIGTERM ``replica`` (``fault.at``), wait for its exit (``fault.exited_at``,
        ``fault.exit_code``), start it again and wait until it is healthy."""
        ...


class JobFaults:
    """The faults of :data:`JOB_FAULTS` on ``cluster``, in the schema ``schema``."""

    def __init__(self, cluster: Cluster, schema: str, settings: Settings) -> None:
        self.cluster = cluster
        self.jobs = f'"{schema}".jobs'
        self.attempts_log = f'"{schema}".attempts_log'
        self.cancel_channel = f"{schema}.cancel"
        self.stale_after = settings.stale_after
        self.sync_seconds = settings.shutdown_timeout + SHUTDOWN_GRACE + SYNC_PAST_SHUTDOWN
        self.problems: list[str] = []  # waits that timed out during the faults

    async def prepare(self, conn: asyncpg.Connection) -> None:
        """Create the stranger role (the harness's private server trusts every login)."""
        # A reused workdir (--workdir) still has it.
        with contextlib.suppress(asyncpg.DuplicateObjectError):
            await conn.execute(f"CREATE ROLE {STRANGER} LOGIN")

    async def inject(self, kind: str) -> list[Fault]:
        inject = {
            "lock_row": self.lock_row,
            "sigterm_sync": self.sigterm_sync,
            "stop_claim_in_flight": self.stop_claim_in_flight,
            "stranger_cancel": self.stranger_cancel,
        }[kind]
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            return await inject(conn)
        finally:
            await conn.close()

    # --- the faults ---------------------------------------------------------------------

    async def lock_row(self, conn: asyncpg.Connection) -> list[Fault]:
        leader, _ = await self.cluster.wait_leader()
        (job_id,) = await self._insert(
            conn, "chaos.work", [self.stale_after + LOCKED_JOB_PAST_STALE]
        )
        fault = Fault("lock_row", time.time(), leader.name, leader.pid, job_ids=[job_id])
        what = f"lock_row: job {job_id} to be processing"
        processing = await self._wait(
            lambda: self._all_have_status(conn, [job_id], "processing"), what, START_WITHIN
        )
        if not processing:
            return [fault]
        locker = await asyncpg.connect(self.cluster.dsn)
        try:
            async with locker.transaction():
                locked = await locker.fetchval(
                    f"SELECT id FROM {self.jobs} WHERE id = $1 AND status = 'processing' "
                    "FOR UPDATE",
                    job_id,
                    timeout=10,
                )
                fault.at = time.time()
                if locked is None:
                    self.problems.append(f"lock_row: job {job_id} ended before it was locked")
                    return [fault]
                # The fault itself: a forgotten transaction holding the row this long.
                await asyncio.sleep(self.stale_after + LOCK_HELD_PAST_STALE)
            fault.resumed_at = time.time()
        finally:
            await locker.close()
        await self._wait(
            lambda: self._finished(conn, [job_id]),
            f"lock_row: locked job {job_id} to finish",
            LOCKED_JOB_PAST_STALE + FINISH_WITHIN,
        )
        return [fault]

    async def sigterm_sync(self, conn: asyncpg.Connection) -> list[Fault]:
        leader, term = await self.cluster.wait_leader()
        ids = await self._insert(conn, "chaos.sync", [self.sync_seconds] * SYNC_JOBS)
        fault = Fault("sigterm_sync", time.time(), leader.name, leader.pid, term, job_ids=ids)

        async def running_on_leader() -> bool:
            # Processing under the leader's owner id, and each thread started (logged).
            owned = await conn.fetchval(
                f"SELECT count(*) FROM {self.jobs} WHERE id = ANY($1) "
                "AND status = 'processing' AND owner LIKE $2",
                ids,
                f"{leader.name}-{leader.pid}-%",
            )
            started = await conn.fetchval(
                f"SELECT count(DISTINCT job_id) FROM {self.attempts_log} "
                "WHERE job_id = ANY($1) AND pid = $2",
                ids,
                leader.pid,
            )
            return bool(owned == started == len(ids))

        what = f"sigterm_sync: jobs {ids} running on the leader {leader.name} (pid {leader.pid})"
        if await self._wait(running_on_leader, what, START_WITHIN):
            await self.cluster.stop_and_restart(leader, fault)
        return [fault]

    async def stop_claim_in_flight(self, conn: asyncpg.Connection) -> list[Fault]:
        faults = []
        for _ in range(CLAIM_STOPS):
            leader, term = await self.cluster.wait_leader()
            ids = await self._insert(
                conn, "chaos.work", [CLAIM_JOB_SECONDS] * CLAIM_BURST, max_attempts=1
            )
            # SIGTERM at once: the insert's NOTIFY is waking the leader to claim them.
            fault = Fault("stop_claim_in_flight", 0.0, leader.name, leader.pid, term, job_ids=ids)
            await self.cluster.stop_and_restart(leader, fault)
            faults.append(fault)
        ids = [i for f in faults for i in f.job_ids]
        await self._wait(
            lambda: self._finished(conn, ids),
            f"stop_claim_in_flight: the {len(ids)} max_attempts=1 jobs to finish",
            FINISH_WITHIN,
        )
        return faults

    async def stranger_cancel(self, conn: asyncpg.Connection) -> list[Fault]:
        own = await self._insert(conn, "chaos.work", [NOTIFIED_JOB_SECONDS] * NOTIFIED_JOBS)
        what = f"stranger_cancel: jobs {own} to be processing"
        processing = await self._wait(
            lambda: self._all_have_status(conn, own, "processing"), what, START_WITHIN
        )
        if not processing:
            return [Fault("stranger_cancel", time.time(), job_ids=own)]
        running = [
            r["id"]
            for r in await conn.fetch(f"SELECT id FROM {self.jobs} WHERE status = 'processing'")
        ]
        stranger = await asyncpg.connect(self.cluster.dsn, user=STRANGER)
        try:
            fault = Fault("stranger_cancel", time.time(), job_ids=running)
            for job_id in running:
                await stranger.execute("SELECT pg_notify($1, $2)", self.cancel_channel, str(job_id))
        finally:
            await stranger.close()
        await self._wait(
            lambda: self._finished(conn, own),
            f"stranger_cancel: jobs {own} to finish",
            NOTIFIED_JOB_SECONDS + FINISH_WITHIN,
        )
        return [fault]

    # --- the checks ---------------------------------------------------------------------

    async def check(
        self, conn: asyncpg.Connection, faults: list[Fault]
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """Problems with the jobs the faults put at risk, and rows for the report."""
        ids = {
            kind: [i for f in faults if f.kind == kind for i in f.job_ids] for kind in JOB_FAULTS
        }
        rows = await conn.fetch(
            f"SELECT j.id, j.status, j.attempts, j.errors, j.cancel_requested, "
            f"(SELECT count(*) FROM {self.attempts_log} l WHERE l.job_id = j.id) AS runs "
            f"FROM {self.jobs} j WHERE j.id = ANY($1)",
            [i for kind_ids in ids.values() for i in kind_ids],
        )
        jobs = {r["id"]: r for r in rows}
        cut_off = await conn.fetchval(
            f"SELECT count(*) FROM {self.attempts_log} "
            "WHERE job_id = ANY($1) AND pid = ANY($2) AND ended_at IS NULL",
            ids["sigterm_sync"],
            [f.target_pid for f in faults if f.kind == "sigterm_sync"],
        )
        problems = list(self.problems)

        def describe(job_id: int) -> str:
            job = jobs.get(job_id)
            if job is None:
                return f"job {job_id} is missing"
            errors = json.loads(job["errors"])
            return (
                f"job {job_id} ended {job['status']} after {job['attempts']} attempts and "
                f"{job['runs']} runs, cancel_requested {job['cancel_requested']}, "
                f"errors {str(errors)[:200]}"
            )

        def completed(job_id: int) -> bool:
            job = jobs.get(job_id)
            return job is not None and job["status"] == "completed"

        locked_ok = [
            i for i in ids["lock_row"]
            if completed(i) and jobs[i]["attempts"] == 1 and jobs[i]["runs"] == 1
            and json.loads(jobs[i]["errors"]) == []
        ]  # fmt: skip
        for job_id in sorted(set(ids["lock_row"]) - set(locked_ok)):
            problems.append(
                f"lock_row: {describe(job_id)}; a locked row's live attempt must never be "
                "rescued (expected completed, 1 attempt, 1 run, no errors)"
            )
        sync_ok = [i for i in ids["sigterm_sync"] if completed(i)]
        for job_id in sorted(set(ids["sigterm_sync"]) - set(sync_ok)):
            problems.append(f"sigterm_sync: {describe(job_id)}; expected completed")
        claimed_ok = [i for i in ids["stop_claim_in_flight"] if completed(i)]
        not_claimed = sorted(set(ids["stop_claim_in_flight"]) - set(claimed_ok))
        if not_claimed:
            problems.append(
                f"stop_claim_in_flight: {len(not_claimed)} max_attempts=1 jobs did not "
                "complete (a claim in flight at SIGTERM must be started or handed back, "
                "never rescued): " + "; ".join(describe(i) for i in not_claimed[:5])
            )
        notified_ok = [
            i for i in ids["stranger_cancel"]
            if completed(i) and not jobs[i]["cancel_requested"]
        ]  # fmt: skip
        for job_id in sorted(set(ids["stranger_cancel"]) - set(notified_ok)):
            problems.append(
                f"stranger_cancel: {describe(job_id)}; a cancel NOTIFY from a role with no "
                "privilege must cancel nothing"
            )
        table = [
            (
                "lock_row: locked jobs done in 1 run, never rescued",
                f"{len(locked_ok)} / {len(ids['lock_row'])}",
            ),
            (
                "sigterm_sync: jobs completed (runs cut off by exit)",
                f"{len(sync_ok)} / {len(ids['sigterm_sync'])} ({cut_off})",
            ),
            (
                "stop_claim_in_flight: max_attempts=1 jobs completed",
                f"{len(claimed_ok)} / {len(ids['stop_claim_in_flight'])}",
            ),
            (
                "stranger_cancel: notified jobs completed, not cancelled",
                f"{len(notified_ok)} / {len(ids['stranger_cancel'])}",
            ),
        ]
        return problems, table

    # --- helpers --------------------------------------------------------------------------

    async def _insert(
        self,
        conn: asyncpg.Connection,
        type: str,
        seconds: list[float],
        *,
        max_attempts: int | None = None,
    ) -> list[int]:
        rows = await conn.fetch(
            f"INSERT INTO {self.jobs} (type, payload, max_attempts) "
            "SELECT $1, jsonb_build_object('seconds', s), $3 FROM unnest($2::float8[]) AS s "
            "RETURNING id",
            type,
            seconds,
            max_attempts,
        )
        return [r["id"] for r in rows]

    async def _all_have_status(self, conn: asyncpg.Connection, ids: list[int], status: str) -> bool:
        found = await conn.fetchval(
            f"SELECT count(*) FROM {self.jobs} WHERE id = ANY($1) AND status = $2", ids, status
        )
        return bool(found == len(ids))

    async def _finished(self, conn: asyncpg.Connection, ids: list[int]) -> bool:
        left = await conn.fetchval(
            f"SELECT count(*) FROM {self.jobs} WHERE id = ANY($1) "
            "AND status IN ('pending', 'processing')",
            ids,
        )
        return bool(left == 0)

    async def _wait(self, check: Callable[[], Awaitable[Any]], what: str, timeout: float) -> bool:
        """Wait for ``check()``; on timeout record a problem and return False (the run
        goes on, so that the report shows everything else too)."""
        try:
            await eventually(check, timeout=timeout, what=what, every=0.05)
        except AssertionError as exc:
            self.problems.append(str(exc))
            return False
        return True
