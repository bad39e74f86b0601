"""Job graphs through a kill -9 of the leader, with real replica processes: the
promotion of a waiting job rides on the NOTIFY of the completion that released it,
and the jobs the dead leader was running are rescued and retried by the next one.
Three replicas run a fan-out/fan-in of 400 branches of 0.25 s (20 at a time) and a
graph with a failing node; the leader is killed once 100 branches completed. Every
branch must complete, the join must start after the last of them finished and read
all 400 results, and the failure must end what follows it, naming the failed node."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from dispatcher import AsyncClient
from tests.support.database import TestDatabase
from tests.support.processes import ReplicaProcess, leader_name, start_replicas
from tests.support.runtimes import fast_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

BRANCHES = 400


async def test_a_graph_completes_in_order_through_a_leader_kill(
    db: TestDatabase, replicas: list[ReplicaProcess], tmp_path: Path
) -> None:
    env = {**fast_env(lease="3"), "DISPATCHER_DSN": db.dsn, "DISPATCHER_SCHEMA": db.schema}
    await start_replicas(
        "tests.support.graph_app:app", ("r0", "r1", "r2"), env=env, log_dir=tmp_path, into=replicas
    )
    conn = await db.connect()
    client = await AsyncClient.connect(db.dsn, schema=db.schema)
    try:
        first = await eventually(lambda: leader_name(conn, db.schema), timeout=30, what="a leader")
        names = [f"b{i}" for i in range(BRANCHES)]
        graph: dict[str, dict[str, Any]] = {"root": {"type": "g.branch"}}
        graph.update(
            {
                name: {
                    "type": "g.branch",
                    "payload": {"n": i, "seconds": 0.25},
                    "depends_on": ["root"],
                }
                for i, name in enumerate(names)
            }
        )
        graph["join"] = {"type": "g.join", "depends_on": names}
        ids = await client.enqueue_graph(graph)
        failing = await client.enqueue_graph(
            {
                "x": {"type": "g.branch"},
                "broken": {"type": "g.broken", "depends_on": ["x"]},
                "after": {"type": "g.join", "depends_on": ["broken", "x"]},
                "last": {"type": "g.join", "depends_on": ["after"]},
            }
        )
        branch_ids = [ids[name] for name in names]

        async def completed(at_least: int) -> bool:
            done = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE id = ANY($1) AND status = 'completed'",
                branch_ids,
            )
            return bool(done >= at_least)

        await eventually(lambda: completed(100), timeout=60, what="100 branches done")
        victim = next(r for r in replicas if r.name == first)
        victim.signal(signal.SIGKILL)

        async def join_finished() -> bool:
            status = await conn.fetchval(f"SELECT status FROM {db.jobs} WHERE id = $1", ids["join"])
            return status in ("completed", "failed", "cancelled")

        await eventually(join_finished, timeout=120, what="the join to finish", every=0.1)
        rows = {
            r["id"]: r
            for r in await conn.fetch(
                f"SELECT * FROM {db.jobs} WHERE id = ANY($1)", [*ids.values(), *failing.values()]
            )
        }
    finally:
        await client.close()
        await conn.close()

    join, root = rows[ids["join"]], rows[ids["root"]]
    branches = [rows[i] for i in branch_ids]
    assert join["status"] == "completed", dict(join)
    assert {b["status"] for b in branches} == {"completed"}
    result = json.loads(join["result"])
    assert (result["count"], result["sum"]) == (BRANCHES, sum(range(BRANCHES)))
    assert join["started_at"] >= max(b["finished_at"] for b in branches)
    assert min(b["started_at"] for b in branches) >= root["finished_at"]
    pids = {json.loads(b["result"])["pid"] for b in branches}
    assert victim.pid in pids and len(pids) >= 2, "the branches did not span the hand-over"
    assert rows[failing["x"]]["status"] == "completed"
    assert rows[failing["broken"]]["status"] == "failed"
    cause = f"dependency {failing['broken']} (g.broken) failed: PermanentError: broken on purpose"
    assert rows[failing["after"]]["last_error"] == cause
    assert (
        rows[failing["last"]]["last_error"]
        == f"dependency {failing['after']} (g.join) failed: {cause}"
    )
