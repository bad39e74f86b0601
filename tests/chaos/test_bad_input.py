"""Hostile input while normal load flows: odd rows inserted straight into the table,
and fuzzed HTTP requests. A row that can never run is refused at insert by a named
constraint; every other bad job ends failed (or pending, for a far-future run_at) with
a clear error, good jobs keep flowing, the API never answers 5xx, and no replica
dies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.chaos.conftest import StartChaosReplicas
from tests.support.database import TestDatabase
from tests.support.hostile_rows import (
    REFUSED_DEPENDENCY_ROWS,
    REFUSED_ROWS,
    REFUSED_TRACE_CONTEXT_ROWS,
)
from tests.support.processes import ReplicaProcess
from tests.support.runtimes import fast_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos
TOKEN = "fuzz-token-123456"

ENV = {
    **fast_env(unknown_type_grace="2", api_token=TOKEN),
    "CHAOS_TYPE_LIMIT": "20",
}

# (type, payload SQL, priority, run_at SQL, expected status, error fragment or None)
HOSTILE = [
    ("nope.type", "'{}'", 0, "now()", "failed", "no executor registered for type 'nope.type'"),
    ("émoji 🚀 type", "'{}'", 0, "now()", "failed", "no executor registered for type 'émoji 🚀"),
    ("zero\u200bwidth", "'{}'", 0, "now()", "failed", "no executor registered"),
    ("rtl\u202etxt", "'{}'", 0, "now()", "failed", "no executor registered"),
    ("x" * 200, "'{}'", 0, "now()", "failed", "no executor registered"),
    ("chaos.strict", """'{"n": "seven"}'""", 0, "now()", "failed", "payload must be"),
    ("chaos.strict", "'[1, 2, 3]'", 0, "now()", "failed", "payload must be"),
    ("chaos.strict", "'null'", 0, "now()", "failed", "payload must be"),
    ("chaos.strict", """'{"n": 1, "extra": true}'""", 0, "now()", "failed", "payload must be"),
    (
        "chaos.strict",
        """jsonb_build_object('n', 1, 'blob', repeat('x', 900 * 1024))""",
        0, "now()", "failed", "payload must be",
    ),
    (
        "chaos.strict",
        "(repeat('[', 5000) || repeat(']', 5000))::jsonb",
        0, "now()", "failed", "RecursionError",
    ),
    ("chaos.strict", """'{"n": 1}'""", -32768, "now()", "completed", None),
    ("chaos.strict", """'{"n": 2}'""", 32767, "now()", "completed", None),
    ("chaos.strict", """'{"n": 3}'""", 0, "'1970-01-01T00:00:00Z'", "completed", None),
    ("chaos.strict", """'{"n": 4}'""", 0, "'9999-12-31T00:00:00Z'", "pending", None),
]  # fmt: skip


@pytest.mark.timeout(300)
async def test_hostile_rows_and_fuzzed_requests_harm_no_good_job(
    db: TestDatabase,
    replicas: list[ReplicaProcess],
    start_chaos_replicas: StartChaosReplicas,
) -> None:
    await start_chaos_replicas(db, ENV)
    conn = await db.connect()

    stop_good = asyncio.Event()

    # Good jobs, too, get ids the fuzzer will not guess.
    await conn.execute(f'CREATE SEQUENCE "{db.schema}".good_ids START 8000000001')

    async def good_load() -> None:
        writer = await db.connect()
        try:
            while not stop_good.is_set():
                await writer.execute(
                    f"INSERT INTO {db.jobs} (id, type, payload) "
                    f"""SELECT nextval('"{db.schema}".good_ids'), 'chaos.work', """
                    """'{"seconds": 0.05}' FROM generate_series(1, 5)"""
                )
                await asyncio.sleep(0.25)  # the producer's pace, not a wait
        finally:
            await writer.close()

    load = asyncio.create_task(good_load())
    try:
        # Ids far from the small ones the fuzzer tries, so its DELETE /jobs/1 and
        # POST /jobs/2/retry act on its own jobs (it enqueues some), not on ours.
        hostile_ids = []
        for offset, (type_, payload, priority, run_at, _, _) in enumerate(HOSTILE):
            hostile_ids.append(
                await conn.fetchval(
                    f"INSERT INTO {db.jobs} (id, type, payload, priority, run_at, max_attempts) "
                    f"VALUES ($3, $1, {payload}, $2, {run_at}, 2) RETURNING id",
                    type_,
                    priority,
                    7_000_000_001 + offset,
                )
            )
        # Rows that can never run are refused at insert, whatever the load.
        refusals = REFUSED_ROWS + REFUSED_DEPENDENCY_ROWS + REFUSED_TRACE_CONTEXT_ROWS
        for what, columns, values, constraint in refusals:
            with pytest.raises(asyncpg.CheckViolationError) as refused:
                await conn.execute(f"INSERT INTO {db.jobs} ({columns}) VALUES ({values})")
            assert refused.value.constraint_name == constraint, what
        fuzz = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable, "-m", "schemathesis.cli",
                "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
                "run",
                f"http://127.0.0.1:{replicas[0].port}/openapi.json",
                "-H", f"Authorization: Bearer {TOKEN}",
                "--checks", "not_a_server_error",
                "--max-examples", "40",
                "--phases", "examples,coverage,fuzzing",
                "--exclude-checks", "positive_data_acceptance,negative_data_rejection",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )  # fmt: skip
        assert fuzz.returncode == 0, fuzz.stdout[-4000:] + fuzz.stderr[-2000:]
    finally:
        stop_good.set()
        await load

    unsettled: list[str] = []

    async def hostile_settled() -> bool:
        rows = await conn.fetch(
            f"SELECT id, status, last_error FROM {db.jobs} WHERE id = ANY($1::bigint[])",
            hostile_ids,
        )
        found = {r["id"]: r for r in rows}
        unsettled[:] = [
            f"{want[0][:20]!r}: {found[i]['status']} ({found[i]['last_error']})"
            for i, want in zip(hostile_ids, HOSTILE, strict=True)
            if found[i]["status"] != want[4]
        ]
        return not unsettled

    try:
        await eventually(hostile_settled, timeout=60, what="hostile jobs to settle", every=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {unsettled}") from None
    rows = {
        r["id"]: r
        for r in await conn.fetch(
            f"SELECT id, status, last_error FROM {db.jobs} WHERE id = ANY($1::bigint[])",
            hostile_ids,
        )
    }
    for job_id, (type_, *_, fragment) in zip(hostile_ids, HOSTILE, strict=True):
        row = rows[job_id]
        if fragment is not None:
            assert fragment in (row["last_error"] or ""), (type_[:20], row["last_error"])

    # What the good jobs not completed yet are doing, and which types are paused: a
    # timeout says whether a job was cancelled, paused, failing or never claimed.
    left: list[str] = []

    async def good_done() -> bool:
        rows = await conn.fetch(
            f"SELECT id, status, attempts, owner, last_error FROM {db.jobs} "
            "WHERE type = 'chaos.work' AND status <> 'completed' AND id > 8000000000 "
            "ORDER BY id LIMIT 5"
        )
        paused = await conn.fetch(f'SELECT type FROM "{db.schema}".job_types WHERE paused')
        left[:] = [repr(dict(r)) for r in rows] + [f"paused: {[r['type'] for r in paused]}"]
        return not rows

    try:
        await eventually(good_done, timeout=60, what="every good job to complete", every=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {left}") from None
    worst = await conn.fetchval(
        f"SELECT max(extract(epoch FROM started_at - run_at))::float8 FROM {db.jobs} "
        "WHERE type = 'chaos.work' AND id > 8000000000"
    )
    count = await conn.fetchval(
        f"SELECT count(*) FROM {db.jobs} WHERE type = 'chaos.work' AND id > 8000000000"
    )
    await conn.close()
    assert count > 50
    # A hostile row that stalled claiming would hold good jobs for the rest of the fuzz
    # run (tens of seconds); the bound is far below that and far above a noisy machine's
    # ordinary latency, so it tells a stall from a slow moment.
    assert worst < 10.0, f"a good job waited {worst:.2f}s"
    for replica in replicas:
        assert replica.alive, replica.log_tail()
    tail = "\n  ".join(fuzz.stdout.strip().splitlines()[-6:])
    print(f"\n  schemathesis: {tail}\n  worst wait of a good job: {worst * 1000:.0f} ms")
