"""A task cancelled while its pooled connection is lost ends cancelled, always.

With asyncpg's own pool one such cancellation in six or seven ended in
InternalClientError ("release() called on a free connection holder"), raised by the
release in ``async with pool.acquire()``'s exit in place of the CancelledError. A
deposed leader's claim loop, which retries on errors, then ran on, and the step-down
waiting for it hung (a CI run of test_api's readiness test timed out that way).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import pytest

from dispatcher.core.cancellation import cancel_and_wait
from dispatcher.database.pool import create_pool
from tests.support.apps import make_app
from tests.support.database import TestDatabase
from tests.support.leadership import leading
from tests.support.lost_cancellation import converts_its_cancellation
from tests.support.runtimes import StartRuntime

# Cancellations raced against a terminated connection: asyncpg's pool lost one in six
# or seven, so this many show it (P(none) < 1e-9), in about two seconds.
RACES = 150


async def race_cancellations(pool: asyncpg.Pool, admin: asyncpg.Connection) -> Counter[str]:
    """How tasks ended that were cancelled right after the server ended the session of
    the connection they were using."""
    ended: Counter[str] = Counter()

    async def use_connection(holding: asyncio.Future[int]) -> None:
        async with pool.acquire() as conn:
            holding.set_result(conn.get_server_pid())
            await conn.fetch("SELECT pg_sleep(0.05)")

    for _ in range(RACES):
        holding: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(use_connection(holding))
        # Cancelled as soon as the server has ended its session: asyncpg may or may
        # not have seen the loss yet, the race that lost one cancellation in six.
        await admin.execute("SELECT pg_terminate_backend($1)", await holding)
        task.cancel()
        try:
            await task
            ended["returned"] += 1
        except asyncio.CancelledError:
            ended["cancelled"] += 1
        except Exception as exc:
            if task.cancelling():
                ended[f"cancelled, yet raised {type(exc).__name__}: {exc}"[:120]] += 1
            else:
                ended["failed before its cancellation"] += 1  # the loss surfaced first
    return ended


@pytest.mark.timeout(120)
async def test_a_cancellation_racing_a_lost_connection_is_never_lost(db: TestDatabase) -> None:
    admin = await db.connect()
    pool = await create_pool(db.dsn, min_size=1, max_size=1)
    try:
        ended = await race_cancellations(pool, admin)
    finally:
        await pool.close()
        await admin.close()
    lost = [outcome for outcome in ended if outcome.startswith("cancelled, yet raised")]
    assert not lost, ended
    assert ended["cancelled"] > 0, ended  # the race was run, not skipped past


async def test_a_claim_loop_whose_cancellation_was_lost_stops_all_the_same(
    start_runtime: StartRuntime,
) -> None:
    runtime = await start_runtime(make_app())
    await leading([runtime])
    dispatcher = runtime.dispatcher
    entered = asyncio.Event()
    dispatcher._claim_until_done = converts_its_cancellation(entered)  # type: ignore[method-assign]
    dispatcher.wake("test")
    await asyncio.wait_for(entered.wait(), 10)
    # A step-down or shutdown waits, under the claim lock, for the loop to end.
    try:
        await asyncio.wait_for(dispatcher.stop(), 10)
    except TimeoutError:
        raise AssertionError("the claim loop ran on after its cancellation") from None


async def test_a_service_whose_cancellation_was_lost_is_not_restarted(
    start_runtime: StartRuntime,
) -> None:
    runtime = await start_runtime(make_app())
    entered = asyncio.Event()
    service = runtime._supervised("converting", converts_its_cancellation(entered))
    await asyncio.wait_for(entered.wait(), 10)
    entered.clear()
    try:
        await asyncio.wait_for(cancel_and_wait([service]), 10)
    except TimeoutError:
        raise AssertionError("the supervisor restarted a cancelled service") from None
    assert service.cancelled() and not entered.is_set()
