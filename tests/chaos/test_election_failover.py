"""Leader election across real OS processes: kill -9, SIGSTOP, SIGTERM, and a
PostgreSQL restart (of a server this test started itself)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.support.database import TestDatabase, migrated_schema
from tests.support.private_postgres import private_postgres
from tests.support.processes import EventedProcess
from tests.support.waiting import eventually_sync

pytestmark = pytest.mark.chaos


def start_replicas(
    dsn: str, schema: str, tmp_path: Path, count: int = 3, *extra: str
) -> list[EventedProcess]:
    replicas = [
        EventedProcess(
            ["-m", "tests.support.elector_process", dsn, schema, f"r{i}", *extra],
            log_path=tmp_path / f"r{i}.log",
        )
        for i in range(count)
    ]
    for replica in replicas:
        replica.wait_for("ready", timeout=30)
    return replicas


@pytest.fixture
def cleanup() -> Iterator[list[EventedProcess]]:
    started: list[EventedProcess] = []
    yield started
    for process in started:
        process.stop()


def the_leader(replicas: list[EventedProcess], timeout: float = 10) -> EventedProcess:
    def single() -> EventedProcess | None:
        believers = [r for r in replicas if r.alive and r.believes_leader()]
        return believers[0] if len(believers) == 1 else None

    return eventually_sync(single, timeout=timeout, what="exactly one leader")


def new_leader_after(
    replicas: list[EventedProcess], old: EventedProcess, since: float, timeout: float
) -> tuple[EventedProcess, float]:
    """The first replica other than ``old`` elected after ``since``, and when."""

    def elected() -> tuple[EventedProcess, float] | None:
        found = [
            (r, e["at"])
            for r in replicas
            if r is not old
            for e in r.of_kind("elected")
            if e["at"] >= since
        ]
        return min(found, key=lambda pair: pair[1]) if found else None

    return eventually_sync(elected, timeout=timeout, what="a new leader")


def test_sigstop_of_the_leader_is_taken_over_and_fenced(
    db: TestDatabase,
    tmp_path: Path,
    cleanup: list[EventedProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    lease = 3.0

    async def insert_probe_jobs() -> None:
        conn = await asyncpg.connect(db.dsn)
        try:
            await conn.execute(
                f'INSERT INTO "{db.schema}".jobs (type) '
                "SELECT 'probe' FROM generate_series(1, 2000)"
            )
        finally:
            await conn.close()

    asyncio.run(insert_probe_jobs())
    replicas = start_replicas(
        db.dsn, db.schema, tmp_path, 3, "--lease", str(lease), "--claim-type", "probe"
    )
    cleanup.extend(replicas)
    leader = the_leader(replicas)
    leader.wait_for("claimed", timeout=10, what="(the leader claims probe jobs)")
    old_term = leader.of_kind("elected")[-1]["term"]

    stopped_at = leader.signal(signal.SIGSTOP)
    new, elected_at = new_leader_after(replicas, leader, stopped_at, timeout=lease + 5)
    takeover = elected_at - stopped_at
    new_term = new.of_kind("elected")[-1]["term"]
    new.wait_for("claimed", timeout=10, what="(the new leader claims)")

    resumed_at = leader.signal(signal.SIGCONT)
    deposed = leader.wait_for("deposed", timeout=10, what="after SIGCONT")
    assert deposed["at"] >= resumed_at

    async def claims_by_term() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(db.dsn)
        try:
            return await conn.fetch(
                f"SELECT term, max(started_at) AS last_start, min(started_at) AS first_start "
                f'FROM "{db.schema}".jobs WHERE term IS NOT NULL GROUP BY term ORDER BY term'
            )
        finally:
            await conn.close()

    by_term = {row["term"]: row for row in asyncio.run(claims_by_term())}
    # Nothing was claimed under the old term once the new term began.
    assert by_term[old_term]["last_start"] < by_term[new_term]["first_start"]
    late = [e for e in leader.of_kind("claimed") if e["at"] > resumed_at + 0.5]
    assert all(e["term"] != old_term for e in late), late
    with capsys.disabled():
        print(f"\n  takeover of a SIGSTOPped leader (lease {lease:g}s): {takeover * 1000:.0f} ms")
    assert takeover < lease + 2.0
    assert the_leader(replicas) is new


@pytest.mark.parametrize(
    ("sig", "bound", "what"),
    [
        (signal.SIGKILL, 5.0, "failover after kill -9 of the leader"),
        (signal.SIGTERM, 1.0, "graceful handover (SIGTERM → new leader)"),
    ],
    ids=["kill_9", "sigterm"],
)
def test_a_new_leader_takes_over_when_the_leader_dies_or_stops(
    db: TestDatabase,
    tmp_path: Path,
    cleanup: list[EventedProcess],
    capsys: pytest.CaptureFixture[str],
    sig: signal.Signals,
    bound: float,
    what: str,
) -> None:
    replicas = start_replicas(db.dsn, db.schema, tmp_path)
    cleanup.extend(replicas)
    leader = the_leader(replicas)
    sent = leader.signal(sig)
    new, elected_at = new_leader_after(replicas, leader, sent, timeout=bound * 2)
    took = elected_at - sent
    exit_code = leader.process.wait(10)
    if sig is signal.SIGTERM:
        assert exit_code == 0
    with capsys.disabled():
        print(f"\n  {what}: {took * 1000:.0f} ms")
    assert took < bound
    assert the_leader(replicas) is new


def test_postgres_restart_ends_with_exactly_one_leader(
    tmp_path: Path, cleanup: list[EventedProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    with private_postgres(tmp_path / "pg") as server:
        dsn = server.dsn()
        schema = asyncio.run(migrated_schema(dsn))
        replicas = start_replicas(dsn, schema, tmp_path, 3, "--lease", "5")
        cleanup.extend(replicas)
        the_leader(replicas)

        server.stop(mode="fast")
        eventually_sync(
            lambda: not any(r.believes_leader() for r in replicas),
            timeout=10,
            what="every replica to notice the database is gone",
        )
        time.sleep(1.0)  # the injected outage: the database stays away for a while
        back_at = time.time()
        server.start()
        leader = the_leader(replicas, timeout=15)
        elected = leader.of_kind("elected")[-1]
        elected_at = elected["at"]
        # Stay until the leader has renewed its lease twice more in its term (every
        # second; the standbys try to take over every 0.5 s meanwhile): exactly one
        # leader throughout, and nobody crashed.
        with psycopg.connect(dsn, autocommit=True) as watcher:
            lease = f'SELECT term, renewed_at FROM "{schema}".leader'
            term, renewed_at = watcher.execute(lease).fetchone() or (None, None)
            renewals = 0
            deadline = time.monotonic() + 10
            while renewals < 2:
                believers = [r for r in replicas if r.believes_leader()]
                assert believers == [leader]
                now_term, now_renewed_at = watcher.execute(lease).fetchone() or (None, None)
                assert now_term == term == elected["term"]
                if now_renewed_at != renewed_at:
                    renewals, renewed_at = renewals + 1, now_renewed_at
                assert time.monotonic() < deadline, f"{renewals} lease renewals within 10 s"
                time.sleep(0.05)  # the sampling rate, not a wait for anything
        assert all(r.alive for r in replicas), [r.log_tail() for r in replicas if not r.alive]
        with capsys.disabled():
            print(f"\n  leader after PostgreSQL came back: {(elected_at - back_at) * 1000:.0f} ms")
