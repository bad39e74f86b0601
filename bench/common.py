"""What every benchmark shares: a database, replica processes, timing, reporting.

Every benchmark measures a baseline in the same run on the same database and reports
ratios, because this machine (2 cores, shared) is noisy: absolute numbers are context.
The database is ``DISPATCHER_BENCH_DSN`` if set, else a private embedded PostgreSQL
(server defaults: durable commits) under a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from dispatcher.core.log import configure_logging
from dispatcher.database.migrate import migrate
from dispatcher.database.ports import free_listen_port

# Benchmarks print tables on stdout; in-process services log warnings only (stderr).
configure_logging("console", "warning")

# Where JSON lines go; the smoke test points this elsewhere.
RESULTS = Path(
    os.environ.get("DISPATCHER_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)


@dataclass
class Database:
    dsn: str
    schema: str

    @property
    def jobs(self) -> str:
        return f'"{self.schema}".jobs'

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn)

    async def reset(self) -> None:
        """A freshly migrated schema (drops the previous one)."""
        conn = await self.connect()
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            await migrate(conn, self.schema)
            await conn.execute(f"VACUUM ANALYZE {self.jobs}")
        finally:
            await conn.close()

    async def drop(self) -> None:
        conn = await self.connect()
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()


@contextlib.contextmanager
def database_beside(db: Database, suffix: str = "_full") -> Iterator[Database]:
    """A second schema on the same server (a baseline beside the measured one)."""
    yield Database(db.dsn, db.schema + suffix)


@contextlib.contextmanager
def database() -> Iterator[Database]:
    """The benchmark database: DISPATCHER_BENCH_DSN, or a private embedded server."""
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    dsn = os.environ.get("DISPATCHER_BENCH_DSN")
    if dsn:
        yield Database(dsn, schema)
        return
    from dispatcher.database.embedded import EmbeddedPostgres

    home = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
    server = EmbeddedPostgres(home, settings={"max_connections": "200"})
    server.ensure_running()
    try:
        yield Database(server.dsn(), schema)
    finally:
        server.stop(mode="fast")


class Replica:
    """A real ``dispatcher run`` process (logs to a temporary file)."""

    def __init__(self, db: Database, *, name: str = "bench", app: str = "dispatcher.examples:app",
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:  # fmt: skip
        """``cwd``: the folder it runs in; ``python -m`` imports the dispatcher package
        found there first (bench/ab.py runs other revisions' checkouts this way)."""
        self.name = name
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"bench-{name}-", suffix=".log", delete=False
        )
        self.port = free_listen_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "run", app],
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "DISPATCHER_DSN": db.dsn,
                "DISPATCHER_SCHEMA": db.schema,
                "DISPATCHER_REPLICA_ID": name,
                "DISPATCHER_HTTP_HOST": "127.0.0.1",
                "DISPATCHER_HTTP_PORT": str(self.port),
                "DISPATCHER_LOG_FORMAT": "json",
                "DISPATCHER_LOG_LEVEL": "warning",
                **(env or {}),
            },
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def owner_prefix(self) -> str:
        """How its owner id (name-pid-suffix) starts, as written on claimed jobs."""
        return f"{self.name}-{self.pid}-"

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> float:
        at = time.time()
        self.process.send_signal(sig)
        return at

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            # Fields after the command name, which may hold spaces: utime and stime are
            # the 14th and 15th of the whole line.
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core of the machine spent busy (not idle, not waiting for I/O)
    since boot, in seconds (Linux /proc/stat; NaN elsewhere)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            ticks = [int(value) for value in handle.readline().split()[1:]]
    except OSError:
        return float("nan")
    # user nice system idle iowait irq softirq steal; guest time is counted in user.
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


async def wait_for_leader(db: Database, timeout: float = 30) -> tuple[str, int]:
    """(holder, term) of a current lease."""
    conn = await db.connect()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = await conn.fetchrow(
                f'SELECT holder, term FROM "{db.schema}".leader WHERE lease_until > now()'
            )
            if row is not None:
                return row["holder"], row["term"]
            await _sleep(0.01)
    finally:
        await conn.close()
    raise RuntimeError(f"no leader within {timeout}s")


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Result:
    """One benchmark's outcome: rows of a table, and the figures for the JSON line."""

    benchmark: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, label: str, value: str, **figures: Any) -> None:
        self.rows.append((label, value))
        self.figures.update(figures)

    def print_table(self) -> None:
        width = max(len(label) for label, _ in self.rows)
        print(f"\n{self.benchmark}")
        print("-" * (width + 30))
        for label, value in self.rows:
            print(f"{label.ljust(width)}  {value}")

    def save(self) -> None:
        RESULTS.mkdir(exist_ok=True)
        line = {
            "benchmark": self.benchmark,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            **self.figures,
        }
        with open(RESULTS / f"{self.benchmark}.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load1": round(os.getloadavg()[0], 2),
    }
