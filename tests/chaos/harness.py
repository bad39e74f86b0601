"""Chaos harness: real replicas, a steady producer, faults on a schedule, and checks
computed from the database.

It starts a PostgreSQL of its own (faults stop and restart it: never the machine's
shared server), N ``dispatcher run tests.support.chaos_app:app`` processes, and a
producer process inserting jobs with plain SQL. Faults, in a cycle: kill -9 of the
leader, SIGSTOP of the leader for longer than the lease and ``stale_after`` (then
SIGCONT), SIGTERM of the leader (graceful hand-over), a PostgreSQL restart, and
``pg_terminate_backend`` of every replica connection. Killed replicas are restarted.

Checks afterwards: every inserted job completed; no two attempts of a job overlap
(overlaps involving a SIGSTOPped replica are reported apart: the pause outlived
``stale_after`` so the reaper rightly retried, and only the owning attempt's result
may be stored); the per-type limit never exceeded; every fault's failover time
(fault, or the database's return, to the first claim by the new leader); no replica
crashed unless killed.

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

from dispatcher.migrate import migrate
from tests.support.chaos_app import ATTEMPTS_LOG
from tests.support.private_postgres import private_postgres
from tests.support.processes import ReplicaProcess
from tests.support.runtimes import fast_env

FAULTS = ("kill9", "sigstop", "sigterm", "restart_postgres", "terminate_connections")
# A graceful shutdown drains for shutdown_timeout (5 s here) and then requeues: well
# under this, or something hangs.
SIGTERM_EXIT_WITHIN = 30.0
SCHEMA = "chaos"


@dataclass(frozen=True)
class Profile:
    name: str
    replicas: int
    duration: float  # seconds of load
    rate: float  # jobs per second, plus bursts
    burst_every: float
    burst_size: int
    fault_interval: float
    type_limit: int
    global_limit: int
    stop_seconds: float  # SIGSTOP length: longer than lease and stale_after
    postgres_down: float
    settings: dict[str, str] = field(default_factory=dict)


FAST = fast_env(log_level="info")

SHORT = Profile(
    name="short",
    replicas=3,
    duration=45,
    rate=40,
    burst_every=9,
    burst_size=60,
    fault_interval=7,
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
class Fault:
    kind: str
    at: float  # wall clock (shared with the replicas and the database)
    target: str | None = None
    target_pid: int | None = None
    old_term: int | None = None
    resumed_at: float | None = None  # SIGCONT, or the database back
    failover: float | None = None


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
        self.killed_pids: dict[int, float] = {}  # pid -> time of kill -9
        # pid -> every (SIGSTOP, SIGCONT) it went through (one process can be the leader,
        # and be stopped, more than once)
        self.stopped: dict[int, list[tuple[float, float]]] = defaultdict(list)
        self.faults: list[Fault] = []
        self.hung: list[str] = []
        self.dsn = ""

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
        raise RuntimeError("no leader")

    # --- faults ---------------------------------------------------------------------------

    async def inject(self, kind: str, server: Any) -> Fault:
        found = await self.wait_leader()
        leader, term = found
        fault = Fault(kind, time.time(), leader.name, leader.pid, term)
        if kind == "kill9":
            fault.at = leader.signal(signal.SIGKILL)
            self.killed_pids[leader.pid] = fault.at
            leader.process.wait(10)
            self.retire(leader)
            self.start_replica(leader.name).wait_healthy()
        elif kind == "sigstop":
            fault.at = leader.signal(signal.SIGSTOP)
            await asyncio.sleep(self.profile.stop_seconds)
            fault.resumed_at = leader.signal(signal.SIGCONT)
            self.stopped[leader.pid].append((fault.at, fault.resumed_at))
        elif kind == "sigterm":
            fault.at = leader.signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(leader.process.wait, SIGTERM_EXIT_WITHIN)
            except subprocess.TimeoutExpired:
                self.hung.append(f"{leader.name} (pid {leader.pid}) ignored SIGTERM for "
                                 f"{SIGTERM_EXIT_WITHIN:.0f}s; killed")  # fmt: skip
                leader.process.kill()
                leader.process.wait(10)
            self.retire(leader)  # a non-zero exit shows up as a crash in the checks
            self.start_replica(leader.name).wait_healthy()
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
        self.faults.append(fault)
        self.say(f"fault {kind} (leader was {leader.name}, term {term})")
        return fault

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

    async def _run(self) -> Report:
        p = self.profile
        with private_postgres(self.workdir / "postgres") as server:
            self.dsn = server.dsn()
            conn = await asyncpg.connect(self.dsn)
            try:
                await migrate(conn, SCHEMA)
                await conn.execute(ATTEMPTS_LOG.format(schema=f'"{SCHEMA}"'))
            finally:
                await conn.close()
            for i in range(p.replicas):
                self.start_replica(f"r{i}")
            for replica in self.replicas.values():
                await asyncio.to_thread(replica.wait_healthy)
            await self.wait_leader()
            producer = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited on
                [sys.executable, "-m", "tests.support.chaos_producer", self.dsn, SCHEMA,
                 "--rate", str(p.rate), "--duration", str(p.duration),
                 "--burst-every", str(p.burst_every), "--burst-size", str(p.burst_size)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            started = time.monotonic()
            self.say(f"profile {p.name}: {p.replicas} replicas, {p.duration:.0f} s of load")
            cycle = list(FAULTS)
            index = 0
            while time.monotonic() - started < p.duration - p.fault_interval / 2:
                await asyncio.sleep(p.fault_interval)
                if time.monotonic() - started >= p.duration:
                    break
                await self.inject(cycle[index % len(cycle)], server)
                index += 1
                if index % len(cycle) == 0:
                    self.rng.shuffle(cycle)
            out, _ = await asyncio.to_thread(producer.communicate, None, p.duration + 60)
            produced = json.loads(out.strip().splitlines()[-1])
            self.say(f"load done: {produced['acknowledged']} jobs acknowledged; draining")
            await self._drain(timeout=120)
            for replica in list(self.replicas.values()):
                code = replica.stop(timeout=SIGTERM_EXIT_WITHIN)
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
                    list(self.killed_pids),
                )
                if left == 0 and unended == 0:
                    return
                await asyncio.sleep(0.2)
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
                f"SELECT job_id, attempt, replica, pid, started_at, ended_at, outcome "
                f'FROM "{SCHEMA}".attempts_log'
            )
            for fault in self.faults:
                since = fault.resumed_at if fault.kind == "restart_postgres" else fault.at
                first = await conn.fetchval(
                    f'SELECT extract(epoch FROM min(started_at)) FROM "{SCHEMA}".jobs '
                    "WHERE term > $1 AND started_at > to_timestamp($2)",
                    fault.old_term,
                    since,
                )
                if first is not None and since is not None:
                    fault.failover = max(0.0, float(first) - since)
        finally:
            await conn.close()

        problems: list[str] = []
        completed = sum(1 for j in jobs if j["status"] == "completed")
        lost = len(jobs) - completed
        if lost:
            problems.append(f"{lost} jobs did not complete")
        if len(jobs) < produced["acknowledged"]:
            problems.append(f"{produced['acknowledged'] - len(jobs)} acknowledged jobs missing")

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
        peak = self._max_concurrency(intervals)
        if peak > self.profile.type_limit:
            problems.append(f"concurrency {peak} exceeded the type limit {self.profile.type_limit}")
        crashed = [
            f"{r.name} (pid {r.pid}) exited {r.process.returncode}"
            for r in self.retired
            if r.pid not in self.killed_pids and r.process.returncode not in (0, None)
        ]
        if crashed:
            problems.append(f"replicas crashed: {crashed}")
        problems.extend(self.hung)
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
            max_concurrency=peak,
            type_limit=self.profile.type_limit,
            crashed=crashed,
            problems=problems,
        )

    def _save_timeline(self) -> None:
        """Faults, kills and pauses, for a post-mortem next to the logs."""
        timeline = {
            "faults": [vars(f) for f in self.faults],
            "killed": self.killed_pids,
            "stopped": self.stopped,
            "hung": self.hung,
        }
        (self.workdir / "timeline.json").write_text(json.dumps(timeline, indent=1, default=str))

    def _intervals(self, log: list[asyncpg.Record]) -> list[dict[str, Any]]:
        """Each attempt as [start, end] with its end known: recorded, or the kill."""
        out = []
        for row in log:
            end = row["ended_at"]
            if end is None:
                end = self.killed_pids.get(row["pid"])
            if end is None:
                continue  # a kill before the end was written: covered by killed_pids
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
    def _max_concurrency(intervals: list[dict[str, Any]]) -> int:
        """Peak of attempts running at once. A SIGSTOPped replica runs nothing while
        stopped and its jobs are rescued meanwhile: its attempts count until the stop."""
        events = []
        for item in intervals:
            end = item["stop"][0] if item["paused"] else item["end"]
            events.append((item["started_at"], 1))
            events.append((end, -1))
        events.sort()
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        return peak


def run_profile(profile: Profile, workdir: Path | None = None) -> Report:
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{profile.name}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISPATCHER_LOG_FORMAT", "json")
    return asyncio.run(ChaosRun(profile, workdir).run())


def main() -> int:
    parser = argparse.ArgumentParser(description="dispatcher chaos run")
    parser.add_argument("--profile", choices=["short", "long"], default="long")
    parser.add_argument("--minutes", type=float, help="load duration (default: the profile's)")
    parser.add_argument("--replicas", type=int)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    profile = SHORT if args.profile == "short" else LONG
    if args.minutes:
        profile = replace(profile, duration=args.minutes * 60)
    if args.replicas:
        profile = replace(profile, replicas=args.replicas)
    report = run_profile(profile, args.workdir)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
