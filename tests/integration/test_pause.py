"""Pause and resume of a job type: the leader starts no job of a paused type (running
ones finish), the pause lives in the database across a leader change, and resume
starts the waiting jobs."""

from __future__ import annotations

import asyncio

from dispatcher import AsyncClient
from tests.support.apps import make_feature_app
from tests.support.database import TestDatabase
from tests.support.leadership import claim_pass_since_now, leading
from tests.support.runtimes import StartRuntime, held_attempt
from tests.support.waiting import eventually


async def test_pause_stops_new_starts_survives_a_leader_kill_and_resume_restarts(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    a = await start_runtime(make_feature_app(), name="a")
    await leading([a])
    b = await start_runtime(make_feature_app(), name="b")
    client = AsyncClient(pool=a.pool, schema=db.schema)
    running = await client.enqueue("t.pausable", {"seconds": 2.0})
    await eventually(
        lambda: asyncio.sleep(0, held_attempt(a, running.id) is not None), timeout=5, what="start"
    )
    await client.pause("t.pausable")
    await eventually(
        lambda: asyncio.sleep(0, "t.pausable" in a.dispatcher.paused), timeout=10, what="pause"
    )
    waiting = [await client.enqueue("t.pausable", {"seconds": 0.01}) for _ in range(5)]
    # Not claimed is shown by a claim pass that would have claimed them, had the type
    # not been paused: one that began after the enqueues had committed.
    await claim_pass_since_now(a, what="the enqueues")
    assert [(await client.get(j.id)).status.value for j in waiting] == ["pending"] * 5
    # The running job finishes while paused.
    await eventually(
        lambda: asyncio.sleep(0, held_attempt(a, running.id) is None), timeout=10, what="end"
    )
    assert (await client.get(running.id)).status.value == "completed"

    # The leader dies; the pause lives in the database.
    assert a.elector.is_leader()
    a.elector._notifier.reset("test: kill the leader's session")
    await a.stop()
    assert await leading([b]) is b
    # As above: a whole claim pass of the new leader, which read the pause afresh.
    await claim_pass_since_now(b, what="it was elected")
    client = AsyncClient(pool=b.pool, schema=db.schema)
    assert [(await client.get(j.id)).status.value for j in waiting] == ["pending"] * 5

    await client.resume("t.pausable")

    async def all_done() -> bool:
        statuses = [(await client.get(j.id)).status.value for j in waiting]
        return statuses == ["completed"] * 5

    await eventually(all_done, timeout=10, what="resumed jobs to run")


async def test_the_leader_hears_a_pause_and_a_resume_without_polling(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    """The claim statement itself skips paused types, so a pause holds from its commit;
    the leader's own list (what its claims ask for, /cluster's paused) follows the
    control NOTIFY, not the next poll tick. Here no tick comes, and the pause commits
    with an enqueue: the insert's NOTIFY wakes the loop in the same breath, and must
    not hide the control NOTIFY before it."""
    leader = await start_runtime(make_feature_app(), name="a", poll_interval=3600)
    await leading([leader])
    conn = await db.connect()
    try:
        for paused in (True, False):
            async with conn.transaction():
                await conn.execute(
                    f'INSERT INTO "{db.schema}".job_types (type, paused) VALUES ($1, $2) '
                    "ON CONFLICT (type) DO UPDATE SET paused = EXCLUDED.paused",
                    "t.pausable",
                    paused,
                )
                await conn.execute(
                    f"INSERT INTO {db.jobs} (type, payload) VALUES ('t.pausable', '{{}}')"
                )
            await eventually(
                lambda want=paused: asyncio.sleep(
                    0, ("t.pausable" in leader.dispatcher.paused) == want
                ),
                timeout=30,
                what=f"the leader's paused types to follow paused={paused}",
            )
    finally:
        await conn.close()
