"""Chaos harness: real replicas, a steady producer, faults on a schedule, and checks
computed from the database.

It starts a PostgreSQL of its own (faults stop and restart it: never the machine's
shared server), N ``dispatcher run tests.support.chaos_app:app`` processes, and a
producer process inserting jobs with plain SQL until the harness closes its stdin.
Faults, one every ``fault_interval``, in a cycle reshuffled after each round: kill -9 of
the leader, SIGSTOP of the leader for longer than the lease and ``stale_after`` (then
SIGCONT), SIGTERM of the leader (graceful hand-over), a PostgreSQL restart,
``pg_terminate_backend`` of every replica connection, and the faults aimed at particular
jobs of tests/chaos/faults.py (a row lock held past ``stale_after``, SIGTERM with plain
def threads outliving the shutdown, SIGTERM with a claim in flight, a stranger's cancel
NOTIFY). Stopped and killed replicas are restarted. The load stops only once every kind
of the profile's list was injected (and its ``duration`` has passed): however slow the
machine, no fault is skipped.

Checks afterwards: every inserted job completed; no two attempts of a job overlap
(a run its process did not see end, ends when the process did: the kill -9, or the exit
the harness waited for; overlaps involving a SIGSTOPped replica are reported apart: the
pause outlived ``stale_after`` so the reaper rightly retried, and only the owning
attempt's result may be stored); each type's limit never exceeded; every fault's
failover time (fault, or the database's return, to the first claim by the new leader);
no replica crashed unless killed; and each job fault's own check (faults.py).

    python -m tests.chaos.harness --profile long --minutes 10    # what `make chaos` runs
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg

from dispatcher.core.config import load_settings
from dispatcher.database.migrate import migrate
from dispatcher.services.draining import EXIT_THREADS_UNSTOPPABLE
from tests.chaos.faults import JOB_FAULTS, Fault, JobFaults
from tests.support.chaos_app import ATTEMPTS_LOG
from tests.support.private_postgres import private_postgres
from tests.support.processes import ReplicaProcess
from tests.support.runtimes import fast_env

PROCESS_FAULTS = ("kill9", "sigstop", "sigterm", "restart_postgres", "terminate_connections")
# The first round's order (later rounds are reshuffled). sigterm_sync's handed-back
# jobs run for ~16 s on the next leader: the faults right after it do not SIGTERM the
# leader, so a short run does not spend that time waiting on them.
FAULTS = (
    "kill9", "sigstop", "sigterm_sync", "lock_row", "stranger_cancel", "sigterm",
    "stop_claim_in_flight", "restart_postgres", "terminate_connections",
)  # fmt: skip
assert set(FAULTS) == {*PROCESS_FAULTS, *JOB_FAULTS}
# A graceful shutdown drains for shutdown_timeout (5 s here) and then requeues: well
# under this, or something hangs.
SIGTERM_EXIT_WITHIN = 30.0
SCHEMA = "chaos"
# A replica cut off from the database with plain def threads running exits 75 once it
# notices: on SIGCONT, or after 2.25 s of silence with the fast settings. So within
# this of the end of the SIGSTOP or the outage, or it is a crash.
CUT_OFF_EXIT_WITHIN = 10.0


@dataclass(frozen=True)
class Profile:
    name: str
    replicas: int
    # Seconds of load at least: faults go on, in rounds, until this has passed and every
    # kind of ``faults`` was injected, however long that takes.
    duration: float
    rate: float  # jobs per second, plus bursts
    burst_every: float
    burst_size: int
    fault_interval: float
    type_limit: int
    global_limit: int
    stop_seconds: float  # SIGSTOP length: longer than lease and stale_after
    postgres_down: float
    settings: dict[str, str] = field(default_factory=dict)
    faults: tuple[str, ...] = FAULTS


FAST = fast_env(log_level="info")

SHORT = Profile(
    name="short",
    replicas=3,
    duration=0,  # one round of faults, as long as it takes
    rate=40,
    burst_every=9,
    burst_size=60,
    fault_interval=5,
    type_limit=10,
    global_limit=100,
    stop_seconds=4.5,
    postgres_down=1.0,
    settings=FAST,
)
LONG = replace(
    SHORT, name="long", replicas=5, duration=600, rate=85, burst_every=20, burst_size=300,
    fault_interval=12, type_limit=25,
)  # fmt: skip


@dataclass
class Report:
    profile: str
    duration: float
    inserted: int
    uncertain_inserts: int
    jobs: int
    completed: int
    lost: int
    attempts: int
    faults: list[Fault]
    overlaps: int
    sigstop_overlaps: int
    foreign_results: int
    max_concurrency: int
    type_limit: int
    crashed: list[str]
    cut_off_exits: list[str]
    job_fault_rows: list[tuple[str, str]]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def failover_by_kind(self) -> dict[str, list[float]]:
        found: dict[str, list[float]] = defaultdict(list)
        for fault in self.faults:
            if fault.failover is not None:
                found[fault.kind].append(fault.failover)
        return found

    def table(self) -> str:
        counts: dict[str, int] = defaultdict(int)
        for fault in self.faults:
            counts[fault.kind] += 1
        rows = [
            ("profile", self.profile),
            ("run duration (load, faults, drain)", f"{self.duration:.0f} s"),
            ("jobs inserted (acknowledged)", f"{self.inserted}"),
            ("jobs in the table", f"{self.jobs}"),
            ("jobs completed", f"{self.completed}"),
            ("lost (not completed)", f"{self.lost}"),
            ("attempts recorded", f"{self.attempts}"),
            ("faults", ", ".join(f"{k} {counts[k]}" for k in FAULTS if counts[k])),
            ("overlapping attempts (unexplained)", f"{self.overlaps}"),
            ("overlapping attempts after SIGSTOP > stale_after", f"{self.sigstop_overlaps}"),
            ("max concurrency seen / type limit", f"{self.max_concurrency} / {self.type_limit}"),
            ("replicas crashed (not killed by us)", f"{len(self.crashed)}"),
            ("replicas that exited 75, cut off with threads running", f"{len(self.cut_off_exits)}"),
            *self.job_fault_rows,
        ]
        for kind in FAULTS:
            values = self.failover_by_kind().get(kind)
            if values:
                rows.append(
                    (
                        f"failover after {kind} p50 / max",
                        f"{statistics.median(values) * 1000:.0f} ms / {max(values) * 1000:.0f} ms",
                    )
                )
        width = max(len(k) for k, _ in rows)
        lines = [f"| {'measure'.ljust(width)} | value |", f"| {'-' * width} | --- |"]
        lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
        if self.problems:
            lines.append("")
            lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


class ChaosRun:
    """One chaos run under ``workdir`` (logs, the database)."""

    def __init__(self, profile: Profile, workdir: Path, *, seed: int = 1) -> None:
        self.profile = profile
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.replicas: dict[str, ReplicaProcess] = {}
        self.retired: list[ReplicaProcess] = []  # stopped or killed incarnations
        # pid -> when the process ended as the harness saw it (the kill -9, right after
        # waiting for its exit, or when _watch_exits saw it gone): the end of its runs
        # that recorded none
        self.exited: dict[int, float] = {}
        self.killed: set[int] = set()  # pids of kill -9: their exit is no crash
        self.exited_alone: set[int] = set()  # pids that exited with no signal from us
        # pid -> every (SIGSTOP, SIGCONT) it went through (one process can be the leader,
        # and be stopped, more than once)
        self.stopped: dict[int, list[tuple[float, float]]] = defaultdict(list)
        self.faults: list[Fault] = []
        self.hung: list[str] = []
        self.dsn = ""
        self.producer: subprocess.Popen[str] | None = None
        settings, _ = load_settings(env=profile.settings)
        self.job_faults = JobFaults(self, SCHEMA, settings)

    def say(self, line: str) -> None:
        print(f"[chaos {time.strftime('%H:%M:%S')}] {line}", flush=True)

    # --- processes ---------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {
            **self.profile.settings,
            "DISPATCHER_DSN": self.dsn,
            "DISPATCHER_SCHEMA": SCHEMA,
            "CHAOS_TYPE_LIMIT": str(self.profile.type_limit),
            "CHAOS_CONCURRENCY": str(self.profile.global_limit),
        }

    def start_replica(self, name: str) -> ReplicaProcess:
        index = sum(1 for r in self.retired if r.name == name)
        replica = ReplicaProcess(
            "tests.support.chaos_app:app",
            name=name,
            env=self._env(),
            log_path=self.workdir / f"{name}.{index}.log",
        )
        self.replicas[name] = replica
        return replica

    def retire(self, replica: ReplicaProcess) -> None:
        self.retired.append(replica)

    async def stop_and_restart(self, replica: ReplicaProcess, fault: Fault) -> None:
        """SIGTERM ``replica`` (``fault.at``), wait for its exit (``fault.exited_at``,
        ``fault.exit_code``; killed if it ignores SIGTERM), start it again, healthy."""
        fault.at = replica.signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(replica.process.wait, SIGTERM_EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            self.hung.append(f"{replica.name} (pid {replica.pid}) ignored SIGTERM for "
                             f"{SIGTERM_EXIT_WITHIN:.0f}s; killed")  # fmt: skip
            replica.process.kill()
            await asyncio.to_thread(replica.process.wait, 10)
        # Taken right after the wait returns: at most a thread wake-up after the exit.
        # A replica that hands back the jobs of threads still running makes them due
        # 1 s later, then exits: their next runs start after this.
        fault.exited_at = self.exited.setdefault(replica.pid, time.time())
        fault.exit_code = replica.process.returncode
        self.retire(replica)  # a non-zero exit shows up as a crash in the checks
        await asyncio.to_thread(self.start_replica(replica.name).wait_healthy)

    async def _watch_exits(self) -> None:
        """Note when each replica process ends, whoever ends it: a replica may also exit
        on its own (the runtime exits 75 when cut off from the database with plain def
        threads still running), and its runs that recorded no end ended then."""
        while True:
            for replica in list(self.replicas.values()):
                if replica.pid not in self.exited and not replica.alive:
                    self.exited[replica.pid] = time.time()
            await asyncio.sleep(0.02)

    async def _restart_exited(self) -> None:
        """Restart replicas that exited on their own (judged in the checks)."""
        for name, replica in list(self.replicas.items()):
            if not replica.alive:
                code = replica.process.returncode
                self.say(f"{name} (pid {replica.pid}) exited {code} on its own; restarting")
                self.exited_alone.add(replica.pid)
                self.retire(replica)
                await asyncio.to_thread(self.start_replica(name).wait_healthy)

    async def leader(self) -> tuple[ReplicaProcess, int] | None:
        """The replica process holding a current lease, and its term."""
        try:
            conn = await asyncpg.connect(self.dsn, timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        try:
            row = await conn.fetchrow(
                f'SELECT holder, term FROM "{SCHEMA}".leader WHERE lease_until > now()'
            )
        finally:
            await conn.close()
        if row is None:
            return None
        pid = int(row["holder"].split("-")[-2])
        for replica in self.replicas.values():
            if replica.pid == pid and replica.alive:
                return replica, row["term"]
        return None

    async def wait_leader(self, timeout: float = 30) -> tuple[ReplicaProcess, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = await self.leader()
            if found is not None:
                return found
            await asyncio.sleep(0.05)
        raise RuntimeError(f"no leader within {timeout:.0f}s")

    # --- faults ---------------------------------------------------------------------------

    async def inject(self, kind: str, server: Any) -> None:
        if kind in JOB_FAULTS:
            faults = await self.job_faults.inject(kind)
        else:
            faults = [await self._inject_process_fault(kind, server)]
        self.faults.extend(faults)
        for fault in faults:
            line = f"fault {kind}"
            if fault.target is not None:
                line += f" on {fault.target} (pid {fault.target_pid})"
            if fault.old_term is not None:
                line += f", leader's term {fault.old_term}"
            if fault.exited_at is not None:
                line += f", exited {fault.exit_code} after {fault.exited_at - fault.at:.1f} s"
            if fault.job_ids:
                line += f", {len(fault.job_ids)} jobs at risk"
            self.say(line)

    async def _inject_process_fault(self, kind: str, server: Any) -> Fault:
        leader, term = await self.wait_leader()
        fault = Fault(kind, time.time(), leader.name, leader.pid, term)
        if kind == "kill9":
            fault.at = leader.signal(signal.SIGKILL)
            self.exited[leader.pid] = fault.at
            self.killed.add(leader.pid)
            await asyncio.to_thread(leader.process.wait, 10)
            self.retire(leader)
            await asyncio.to_thread(self.start_replica(leader.name).wait_healthy)
        elif kind == "sigstop":
            fault.at = leader.signal(signal.SIGSTOP)
            await asyncio.sleep(self.profile.stop_seconds)
            fault.resumed_at = leader.signal(signal.SIGCONT)
            self.stopped[leader.pid].append((fault.at, fault.resumed_at))
        elif kind == "sigterm":
            await self.stop_and_restart(leader, fault)
        elif kind == "restart_postgres":
            fault.target = fault.target_pid = None
            await asyncio.to_thread(server.stop, "fast")
            await asyncio.sleep(self.profile.postgres_down)
            await asyncio.to_thread(server.start)
            fault.resumed_at = time.time()
        elif kind == "terminate_connections":
            fault.target = fault.target_pid = None
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'dispatcher%' AND pid <> pg_backend_pid()"
                )
            finally:
                await conn.close()
        else:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        return fault

    async def _inject_faults(self, server: Any) -> None:
        """One fault every ``fault_interval``, in rounds (the profile's order, then
        reshuffled), until every kind was injected and ``duration`` has passed; then one
        more interval of load, so the cluster takes load after the last fault too."""
        p = self.profile
        started = time.monotonic()
        cycle = list(p.faults)
        index = 0
        while index < len(cycle) or time.monotonic() - started + p.fault_interval < p.duration:
            await asyncio.sleep(p.fault_interval)
            await self._restart_exited()
            await self.inject(cycle[index % len(cycle)], server)
            index += 1
            if index % len(cycle) == 0:
                self.rng.shuffle(cycle)
        await asyncio.sleep(p.fault_interval)

    # --- the run --------------------------------------------------------------------------------

    async def run(self) -> Report:
        try:
            return await self._run()
        finally:
            # Whatever happened, leave no replica running against a stopped database.
            for replica in [*self.replicas.values(), *self.retired]:
                if replica.alive:
                    replica.process.kill()
                    replica.process.wait(10)
            if self.producer is not None and self.producer.poll() is None:
                self.producer.kill()
                self.producer.wait(10)

    async def _run(self) -> Report:
        p = self.profile
        with private_postgres(self.workdir / "postgres") as server:
            self.dsn = server.dsn()
            conn = await asyncpg.connect(self.dsn)
            try:
                await migrate(conn, SCHEMA)
                await conn.execute(ATTEMPTS_LOG.format(schema=f'"{SCHEMA}"'))
                await self.job_faults.prepare(conn)
            finally:
                await conn.close()
            for i in range(p.replicas):
                self.start_replica(f"r{i}")
            for replica in self.replicas.values():
                await asyncio.to_thread(replica.wait_healthy)
            watch_exits = asyncio.create_task(self._watch_exits())
            try:
                return await self._load_and_check(server)
            finally:
                watch_exits.cancel()

    async def _load_and_check(self, server: Any) -> Report:
        p = self.profile
        await self.wait_leader()
        # It produces until its stdin closes (below): the harness decides.
        self.producer = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited on
            [sys.executable, "-m", "tests.support.chaos_producer", self.dsn, SCHEMA,
             "--rate", str(p.rate),
             "--burst-every", str(p.burst_every), "--burst-size", str(p.burst_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        started = time.monotonic()
        self.say(
            f"profile {p.name}: {p.replicas} replicas, faults {', '.join(p.faults)}, "
            f"at least {p.duration:.0f} s of load"
        )
        await self._inject_faults(server)
        # communicate() closes the producer's stdin: its signal to stop and report.
        out, _ = await asyncio.to_thread(self.producer.communicate, None, 60)
        produced = json.loads(out.strip().splitlines()[-1])
        self.say(
            f"load done after {time.monotonic() - started:.0f} s: "
            f"{produced['acknowledged']} jobs acknowledged; draining"
        )
        await self._drain(timeout=120)
        for replica in list(self.replicas.values()):
            if not replica.alive:
                self.exited_alone.add(replica.pid)
            code = replica.stop(timeout=SIGTERM_EXIT_WITHIN)
            self.exited.setdefault(replica.pid, time.time())
            if code not in (0, None) and replica.process.returncode == -signal.SIGKILL:
                self.hung.append(f"{replica.name} (pid {replica.pid}) ignored SIGTERM")
            self.retire(replica)
        return await self._check(produced, time.monotonic() - started)

    async def _drain(self, timeout: float) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                left = await conn.fetchval(
                    f'SELECT count(*) FROM "{SCHEMA}".jobs '
                    "WHERE status IN ('pending', 'processing')"
                )
                unended = await conn.fetchval(
                    f'SELECT count(*) FROM "{SCHEMA}".attempts_log WHERE ended_at IS NULL '
                    "AND pid <> ALL($1::int[])",
                    list(self.exited),
                )
                if left == 0 and unended == 0:
                    return
                await asyncio.sleep(0.2)
            self.say(f"drain timed out after {timeout:.0f} s: {left} jobs left, {unended} runs")
        finally:
            await conn.close()

    # --- checks ---------------------------------------------------------------------------

    async def _check(self, produced: dict[str, int], duration: float) -> Report:
        conn = await asyncpg.connect(self.dsn)
        try:
            jobs = await conn.fetch(
                f'SELECT id, status, attempts, result, term, started_at FROM "{SCHEMA}".jobs'
            )
            log = await conn.fetch(
                "SELECT l.job_id, l.attempt, l.replica, l.pid, l.started_at, l.ended_at, "
                f'l.outcome, j.type FROM "{SCHEMA}".attempts_log l '
                f'LEFT JOIN "{SCHEMA}".jobs j ON j.id = l.job_id'
            )
            for fault in self.faults:
                since = fault.resumed_at if fault.kind == "restart_postgres" else fault.at
                if fault.old_term is None or since is None:
                    continue  # not aimed at the leader: no failover to measure
                first = await conn.fetchval(
                    f'SELECT extract(epoch FROM min(started_at)) FROM "{SCHEMA}".jobs '
                    "WHERE term > $1 AND started_at > to_timestamp($2)",
                    fault.old_term,
                    since,
                )
                if first is not None:
                    fault.failover = max(0.0, float(first) - since)
            job_fault_problems, job_fault_rows = await self.job_faults.check(conn, self.faults)
        finally:
            await conn.close()

        problems: list[str] = []
        completed = sum(1 for j in jobs if j["status"] == "completed")
        lost = len(jobs) - completed
        if lost:
            problems.append(f"{lost} jobs did not complete")
        if len(jobs) < produced["acknowledged"]:
            problems.append(f"{produced['acknowledged'] - len(jobs)} acknowledged jobs missing")

        no_end = [r for r in log if r["ended_at"] is None and r["pid"] not in self.exited]
        if no_end:
            problems.append(
                f"{len(no_end)} runs recorded no end and their process's end is unknown "
                f"(e.g. job {no_end[0]['job_id']} on pid {no_end[0]['pid']})"
            )
        intervals = self._intervals(log)
        examples: list[str] = []
        overlaps, sigstop_overlaps = self._overlaps(intervals, examples)
        if overlaps:
            problems.append(f"{overlaps} overlapping attempts not explained by SIGSTOP")
            problems.extend(examples)
        self._save_timeline()
        extra = self._extra_results(jobs, log)
        if extra:
            problems.append(f"{extra} jobs whose stored result is not their owning attempt's")
        peaks = self._max_concurrency(intervals)
        for type_, peak in sorted(peaks.items()):
            if peak > self.profile.type_limit:
                problems.append(
                    f"{type_}: concurrency {peak} exceeded the type limit {self.profile.type_limit}"
                )
        crashed, cut_off_exits = self._unexpected_exits()
        if crashed:
            problems.append(f"replicas crashed: {crashed}")
        problems.extend(self.hung)
        problems.extend(job_fault_problems)
        return Report(
            profile=self.profile.name,
            duration=duration,
            inserted=produced["acknowledged"],
            uncertain_inserts=produced["unknown"],
            jobs=len(jobs),
            completed=completed,
            lost=lost,
            attempts=len(log),
            faults=self.faults,
            overlaps=overlaps,
            sigstop_overlaps=sigstop_overlaps,
            foreign_results=extra,
            max_concurrency=max(peaks.values(), default=0),
            type_limit=self.profile.type_limit,
            crashed=crashed,
            cut_off_exits=cut_off_exits,
            job_fault_rows=job_fault_rows,
            problems=problems,
        )

    def _unexpected_exits(self) -> tuple[list[str], list[str]]:
        """Replicas that exited non-zero though not killed: crashes, and the deliberate
        exits 75 of replicas that a fault cut off from the database (a SIGSTOP, a
        PostgreSQL restart) while their plain def threads ran: a replica cannot stop
        those threads, so it exits as soon as it finds itself cut off."""
        stopped_by = {f.target_pid: f.kind for f in self.faults if f.exited_at is not None}
        outages = [
            (f.at, f.resumed_at or f.at) for f in self.faults if f.kind == "restart_postgres"
        ]
        crashed: list[str] = []
        cut_off: list[str] = []
        for r in self.retired:
            code = r.process.returncode
            if r.pid in self.killed or code in (0, None):
                continue
            how = f"stopped by {stopped_by.get(r.pid, 'the end of the run')}"
            was_cut_off = False
            if r.pid in self.exited_alone:
                how = "on its own"
                end = self.exited.get(r.pid, time.time())
                was_cut_off = any(
                    start <= end <= resumed + CUT_OFF_EXIT_WITHIN
                    for start, resumed in [*self.stopped.get(r.pid, []), *outages]
                )
            line = f"{r.name} (pid {r.pid}, {how}) exited {code}"
            (cut_off if was_cut_off and code == EXIT_THREADS_UNSTOPPABLE else crashed).append(line)
        return crashed, cut_off

    def _save_timeline(self) -> None:
        """Faults, exits, kills and pauses, for a post-mortem next to the logs."""
        timeline = {
            "faults": [vars(f) for f in self.faults],
            "exited": self.exited,
            "killed": sorted(self.killed),
            "exited_alone": sorted(self.exited_alone),
            "stopped": self.stopped,
            "hung": self.hung,
        }
        (self.workdir / "timeline.json").write_text(json.dumps(timeline, indent=1, default=str))

    def _intervals(self, log: list[asyncpg.Record]) -> list[dict[str, Any]]:
        """Each run as [start, end]: its recorded end, or else its process's end."""
        out = []
        for row in log:
            end = row["ended_at"]
            if end is None:
                end = self.exited.get(row["pid"])
            if end is None:
                continue  # reported as a problem of its own
            # The first SIGSTOP that caught this attempt running, if any.
            stop = next(
                (w for w in self.stopped.get(row["pid"], []) if row["started_at"] < w[0] < end),
                None,
            )
            out.append({**dict(row), "end": end, "paused": stop is not None, "stop": stop})
        return out

    @staticmethod
    def _overlaps(intervals: list[dict[str, Any]], examples: list[str]) -> tuple[int, int]:
        by_job: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for item in intervals:
            by_job[item["job_id"]].append(item)
        unexplained = explained = 0
        for attempts in by_job.values():
            attempts.sort(key=lambda a: a["started_at"])
            for a, b in itertools.pairwise(attempts):
                if b["started_at"] < a["end"]:
                    if a["paused"] or b["paused"]:
                        explained += 1
                    else:
                        unexplained += 1
                        if len(examples) < 10:
                            examples.append(
                                f"job {a['job_id']}: attempt {a['attempt']} (pid {a['pid']}) "
                                f"{a['started_at']:.3f}-{a['end']:.3f} overlaps attempt "
                                f"{b['attempt']} (pid {b['pid']}) from {b['started_at']:.3f}"
                            )
        return unexplained, explained

    @staticmethod
    def _extra_results(jobs: list[asyncpg.Record], log: list[asyncpg.Record]) -> int:
        """Jobs whose stored result did not come from their last (owning) attempt."""
        bad = 0
        for job in jobs:
            if job["status"] != "completed" or job["result"] is None:
                continue
            result = json.loads(job["result"])
            if result["attempt"] != job["attempts"]:
                bad += 1
        return bad

    @staticmethod
    def _max_concurrency(intervals: list[dict[str, Any]]) -> dict[str, int]:
        """Per type, the peak of attempts running at once. A SIGSTOPped replica runs
        nothing while stopped and its jobs are rescued meanwhile: its attempts count
        until the stop."""
        events: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for item in intervals:
            end = item["stop"][0] if item["paused"] else item["end"]
            events[item["type"]].append((item["started_at"], 1))
            events[item["type"]].append((end, -1))
        peaks = {}
        for type_, type_events in events.items():
            type_events.sort()
            running = peak = 0
            for _, delta in type_events:
                running += delta
                peak = max(peak, running)
            peaks[type_] = peak
        return peaks


def run_profile(profile: Profile, workdir: Path | None = None) -> Report:
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{profile.name}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISPATCHER_LOG_FORMAT", "json")
    return asyncio.run(ChaosRun(profile, workdir).run())


def main() -> int:
    parser = argparse.ArgumentParser(description="dispatcher chaos run")
    parser.add_argument("--profile", choices=["short", "long"], default="long")
    parser.add_argument(
        "--minutes", type=float, help="load duration at least (default: the profile's)"
    )
    parser.add_argument("--replicas", type=int)
    parser.add_argument(
        "--faults", help=f"comma-separated kinds, in order (default: all of {','.join(FAULTS)})"
    )
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    profile = SHORT if args.profile == "short" else LONG
    if args.minutes:
        profile = replace(profile, duration=args.minutes * 60)
    if args.replicas:
        profile = replace(profile, replicas=args.replicas)
    if args.faults:
        kinds = tuple(args.faults.split(","))
        if unknown := set(kinds) - set(FAULTS):
            parser.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
        profile = replace(profile, faults=kinds)
    report = run_profile(profile, args.workdir)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
