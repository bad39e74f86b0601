"""Rate limits per type (``rate_limit=(n, seconds)``): at most n starts in any window
of that many seconds, across the cluster and across a leader change."""

from __future__ import annotations

import datetime as dt

from tests.support.apps import make_feature_app
from tests.support.database import TestDatabase
from tests.support.leadership import leading
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually


async def test_rate_limit_caps_starts_per_window_across_a_leader_change(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    a = await start_runtime(make_feature_app(), name="a")
    await leading([a])
    b = await start_runtime(make_feature_app(), name="b")
    conn = await db.connect()

    async def started(count: int) -> bool:
        return bool(
            await conn.fetchval(
                f"SELECT count(*) >= $1 FROM {db.jobs} "
                "WHERE type = 't.rated' AND started_at IS NOT NULL",
                count,
            )
        )

    try:
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 't.rated' FROM generate_series(1, 18)"
        )
        # Hand over mid-run, within a's second window (its first holds 5 starts): b
        # must seed its window from the starts in the table.
        await eventually(lambda: started(6), timeout=10, what="a's second window of starts")
        await a.stop()
        await leading([b])

        async def done() -> bool:
            return bool(
                await conn.fetchval(
                    f"SELECT count(*) = 18 FROM {db.jobs} "
                    "WHERE type = 't.rated' AND status = 'completed'"
                )
            )

        await eventually(done, timeout=20, what="all rated jobs", every=0.1)
        starts = [
            r["started_at"]
            for r in await conn.fetch(
                f"SELECT started_at FROM {db.jobs} WHERE type = 't.rated' ORDER BY started_at"
            )
        ]
    finally:
        await conn.close()
    worst = max(sum(1 for t in starts if s <= t < s + dt.timedelta(seconds=1)) for s in starts)
    assert worst <= 5, f"{worst} starts within one second; the limit is 5"
    span = (starts[-1] - starts[0]).total_seconds()
    assert span >= 2.5, f"18 jobs at 5/s took {span:.1f}s"
