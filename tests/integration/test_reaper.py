"""The reaper's retention: finished jobs are deleted in batches after their retention,
per status; nothing pending, running or recent is touched."""

from __future__ import annotations

import asyncpg
import pytest

from dispatcher.core.metrics import Metrics
from dispatcher.services import reaper as reaper_module
from dispatcher.services.reaper import Reaper
from tests.support.apps import make_app
from tests.support.database import TestDatabase


async def test_prune_deletes_only_jobs_past_their_retention(
    db: TestDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    metrics = Metrics()
    reaper = Reaper(
        pool,
        db.schema,
        make_app(),
        stale_after=30,
        interval=5,
        replica_seen_within=30,
        retention_completed=86400,
        retention_failed=14 * 86400,
        metrics=metrics,
    )
    conn = await db.connect()
    try:
        await conn.execute(
            f"""
            INSERT INTO {db.jobs} (type, status, finished_at)
            SELECT 'old', s, now() - a
            FROM (VALUES ('completed', interval '2 days'), ('cancelled', interval '2 days'),
                         ('failed', interval '2 days'), ('failed', interval '15 days'),
                         ('completed', interval '1 hour')) AS v(s, a),
                 generate_series(1, 2500)
            """
        )
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 'todo' FROM generate_series(1, 10)"
        )
        monkeypatch.setattr(reaper_module, "PRUNE_BATCH", 1000)  # several batches per status
        pruned = await reaper.prune_finished()
        left = {
            (r["status"], r["old"]): r["n"]
            for r in await conn.fetch(
                f"SELECT status, finished_at < now() - interval '1 day' AS old, count(*) AS n "
                f"FROM {db.jobs} GROUP BY 1, 2"
            )
        }
    finally:
        await conn.close()
        await pool.close()
    assert pruned == 2500 * 3  # completed + cancelled past a day, failed past 14 days
    assert left == {
        ("failed", True): 2500,  # 2 days old: within the 14-day dead-letter retention
        ("completed", False): 2500,  # an hour old
        ("pending", None): 10,
    }
    assert metrics.registry.get_sample_value("dispatcher_jobs_pruned_total") == 7500
