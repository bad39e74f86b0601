"""Per-key concurrency through a kill -9 of the leader, with real replica processes:
three replicas, 2,000 jobs over 20 keys with key_concurrency=1. The attempts log the
app writes itself (tests/support/attempt_log.py) must show at most one run per key at
every instant, every job completed, and each key's jobs started in id order."""

from __future__ import annotations

import itertools
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.support.chaos_app import ATTEMPTS_LOG
from tests.support.database import TestDatabase
from tests.support.processes import ReplicaProcess, leader_name, start_replicas
from tests.support.runtimes import fast_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

JOBS = 2000
KEYS = 20


async def test_one_run_per_key_at_every_instant_through_a_leader_kill(
    db: TestDatabase, replicas: list[ReplicaProcess], tmp_path: Path
) -> None:
    conn = await db.connect()
    try:
        await conn.execute(ATTEMPTS_LOG.format(schema=f'"{db.schema}"'))
        env = {**fast_env(lease="3"), "DISPATCHER_DSN": db.dsn, "DISPATCHER_SCHEMA": db.schema}
        await start_replicas(
            "tests.support.chaos_app:app",
            ("r0", "r1", "r2"),
            env=env,
            log_dir=tmp_path,
            into=replicas,
        )
        first = await eventually(lambda: leader_name(conn, db.schema), timeout=30, what="a leader")
        # Ids in insertion order; keys k0..k19 in turn.
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, payload, concurrency_key) "
            """SELECT 'chaos.keyed', '{"seconds": 0.01}', 'k' || (i % $1) """
            "FROM generate_series(1, $2) i ORDER BY i",
            KEYS,
            JOBS,
        )

        async def under_way() -> bool:
            done = await conn.fetchval(
                f'SELECT count(*) FROM "{db.schema}".attempts_log WHERE outcome = $1', "completed"
            )
            return bool(done >= JOBS // 5)

        await eventually(under_way, timeout=60, what=f"{JOBS // 5} jobs done before the kill")
        victim = next(r for r in replicas if r.name == first)
        victim.signal(signal.SIGKILL)
        killed_at = time.time()

        async def all_done() -> bool:
            # Every job completed, and every run of a live replica has its end logged
            # (the app writes ends behind the runtime's own completion).
            left = await conn.fetchval(
                f"SELECT (SELECT count(*) FROM {db.jobs} WHERE status <> 'completed') + "
                f'(SELECT count(*) FROM "{db.schema}".attempts_log '
                "WHERE ended_at IS NULL AND pid <> $1)",
                victim.pid,
            )
            return left == 0

        await eventually(all_done, timeout=180, what=f"all {JOBS} jobs completed", every=0.2)
        runs = await conn.fetch(
            f"SELECT l.job_id, l.attempt, l.pid, l.started_at, l.ended_at, j.concurrency_key, "
            "extract(epoch FROM j.finished_at)::float8 AS finished_at, "
            "(j.result ->> 'pid')::integer AS completed_by, "
            "(j.result ->> 'attempt')::integer AS completing_attempt, "
            "j.errors ->> 0 AS first_error "
            f'FROM "{db.schema}".attempts_log l JOIN {db.jobs} j ON j.id = l.job_id'
        )
    finally:
        await conn.close()

    assert len({run["job_id"] for run in runs}) == JOBS
    pids = {run["pid"] for run in runs}
    assert victim.pid in pids and len(pids) >= 2, "the work did not span the hand-over"
    # Only the kill interrupted jobs: at most one per key was running (or claimed).
    interrupted = {run["job_id"] for run in runs if run["first_error"] is not None}
    assert len(interrupted) <= KEYS
    for run in runs:
        if run["first_error"] is not None:
            assert "orphaned" in run["first_error"] or "stale" in run["first_error"], dict(run)
    by_key: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for run in runs:
        end = run["ended_at"]
        if end is None:
            # A run of the killed replica whose end it never logged (ends are logged
            # behind the completion): it ended by the kill, and by its completion if
            # the job completed with it.
            assert run["pid"] == victim.pid, dict(run)
            completed_it = (run["completed_by"], run["completing_attempt"]) == (
                victim.pid,
                run["attempt"],
            )
            end = min(killed_at, run["finished_at"]) if completed_it else killed_at
        by_key[run["concurrency_key"]].append((run["started_at"], end, run["job_id"]))
    assert len(by_key) == KEYS
    for key, spans in by_key.items():
        spans.sort()
        for (_, end, before), (start, _, after) in itertools.pairwise(spans):
            assert start >= end, f"{key}: job {after} started while job {before} ran"
        # Within a key jobs start in (priority, run_at, id) order: here, id order, but for
        # the job the kill interrupted, which is retried at its retry time like any
        # failed attempt.
        first_starts: dict[int, float] = {}
        for start, _, job_id in spans:
            if job_id not in interrupted:
                first_starts.setdefault(job_id, start)
        in_start_order = sorted(first_starts, key=first_starts.__getitem__)
        assert in_start_order == sorted(first_starts), f"{key}: jobs started out of id order"
