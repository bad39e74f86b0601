"""Job dependencies run by in-process replicas, and ended by the reaper.

A diamond A -> (B, C) -> D: D starts only after B and C completed and reads both
results (from an async executor and from a plain def one); B failing ends D and what
follows it, naming B; a 1,000-branch fan-out/fan-in completes, its join started after
the last branch finished (the latency is printed here and measured by
bench/dependencies.py, not asserted); the reaper's ends (a stale job out of
attempts, a type nobody runs) end the jobs waiting on them too; and the README's
example, run as written, prints what the README shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dispatcher import AsyncClient, PermanentError
from dispatcher.core.app import App
from dispatcher.core.retry import RetryPolicy
from dispatcher.services.job import Job
from tests.integration.test_reaper import Harness, harness  # noqa: F401  (a fixture)
from tests.support.database import TestDatabase
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually


def dependency_app() -> App:
    app = App(concurrency=50, retry=RetryPolicy(base=0.2, cap=1.0))

    @app.executor("d.work")
    async def work(job: Job) -> dict[str, Any]:
        await asyncio.sleep(job.payload.get("seconds", 0))
        results = await job.dependency_results()
        return {"name": job.payload.get("name"), "saw": {str(k): v for k, v in results.items()}}

    @app.executor("d.sync")
    def sync_work(job: Job) -> dict[str, Any]:
        results = job.dependency_results_sync()
        return {"name": job.payload.get("name"), "saw": {str(k): v for k, v in results.items()}}

    @app.executor("d.broken")
    async def broken(job: Job) -> None:
        raise PermanentError("the image is corrupt")

    @app.executor("d.count")
    async def count(job: Job) -> dict[str, int]:
        results = await job.dependency_results()
        return {"count": len(results), "sum": sum(r["n"] for r in results.values())}

    @app.executor("d.branch")
    async def branch(job: Job) -> dict[str, int]:
        return {"n": job.payload["n"]}

    return app


@pytest.fixture
async def aclient(db: TestDatabase) -> Any:
    client = await AsyncClient.connect(db.dsn, schema=db.schema)
    yield client
    await client.close()


async def rows_of(db: TestDatabase, ids: dict[str, int]) -> dict[str, asyncpg.Record]:
    conn = await db.connect()
    try:
        rows = await conn.fetch(f"SELECT * FROM {db.jobs} WHERE id = ANY($1)", list(ids.values()))
    finally:
        await conn.close()
    by_id = {row["id"]: row for row in rows}
    return {name: by_id[job_id] for name, job_id in ids.items()}


async def wait_finished(db: TestDatabase, ids: dict[str, int], timeout: float) -> dict[str, Any]:
    async def finished() -> dict[str, asyncpg.Record] | None:
        rows = await rows_of(db, ids)
        done = all(r["status"] in ("completed", "failed", "cancelled") for r in rows.values())
        return rows if done else None

    return await eventually(finished, timeout=timeout, what=f"jobs {ids} to finish", every=0.05)


async def test_a_diamond_runs_its_join_last_with_both_results(
    start_runtime: StartRuntime, db: TestDatabase, aclient: AsyncClient
) -> None:
    await start_runtime(dependency_app())
    ids = await aclient.enqueue_graph(
        {
            "a": {"type": "d.work", "payload": {"name": "a", "seconds": 0.05}},
            "b": {"type": "d.work", "payload": {"name": "b", "seconds": 0.5}, "depends_on": ["a"]},
            "c": {"type": "d.sync", "payload": {"name": "c"}, "depends_on": ["a"]},
            "d": {"type": "d.work", "payload": {"name": "d"}, "depends_on": ["b", "c"]},
        }
    )

    async def b_running() -> bool:
        return (await rows_of(db, {"b": ids["b"]}))["b"]["status"] == "processing"

    await eventually(b_running, timeout=10, what="b to run")
    # b has not completed: d waits (whatever c did meanwhile).
    assert (await aclient.get(ids["d"])).open_dependencies in ([ids["b"]], [ids["b"], ids["c"]])
    rows = await wait_finished(db, ids, timeout=20)
    assert {name: r["status"] for name, r in rows.items()} == dict.fromkeys(ids, "completed")
    results = {name: json.loads(r["result"]) for name, r in rows.items()}
    assert results["b"]["saw"] == {str(ids["a"]): results["a"]}
    assert results["c"]["saw"] == {str(ids["a"]): results["a"]}  # read from a thread
    assert results["d"]["saw"] == {str(ids["b"]): results["b"], str(ids["c"]): results["c"]}
    assert rows["d"]["started_at"] >= max(rows["b"]["finished_at"], rows["c"]["finished_at"])
    assert min(rows["b"]["started_at"], rows["c"]["started_at"]) >= rows["a"]["finished_at"]


async def test_a_failed_branch_ends_the_join_and_everything_after_it(
    start_runtime: StartRuntime, db: TestDatabase, aclient: AsyncClient
) -> None:
    await start_runtime(dependency_app())
    ids = await aclient.enqueue_graph(
        {
            "a": {"type": "d.work", "payload": {"name": "a"}},
            "b": {"type": "d.broken", "depends_on": ["a"]},
            "c": {"type": "d.work", "payload": {"name": "c"}, "depends_on": ["a"]},
            "d": {"type": "d.work", "depends_on": ["b", "c"]},
            "e": {"type": "d.work", "depends_on": ["d"]},
            "f": {"type": "d.work", "depends_on": ["d"], "on_dependency_failure": "cancel"},
        }
    )
    rows = await wait_finished(db, ids, timeout=20)
    assert {name: r["status"] for name, r in rows.items()} == {
        "a": "completed",
        "b": "failed",
        "c": "completed",
        "d": "failed",
        "e": "failed",
        "f": "cancelled",
    }
    cause = f"dependency {ids['b']} (d.broken) failed: PermanentError: the image is corrupt"
    assert rows["d"]["last_error"] == cause
    assert rows["e"]["last_error"] == f"dependency {ids['d']} (d.work) failed: {cause}"
    assert rows["f"]["last_error"] == rows["e"]["last_error"]
    for name in "def":
        assert rows[name]["started_at"] is None and rows[name]["attempts"] == 0


async def test_a_fan_out_of_1000_branches_joins_once_after_the_last(
    start_runtime: StartRuntime, db: TestDatabase, aclient: AsyncClient, capsys: Any
) -> None:
    await start_runtime(dependency_app())
    branches = [f"b{i}" for i in range(1000)]
    graph: dict[str, dict[str, Any]] = {"root": {"type": "d.branch", "payload": {"n": 0}}}
    graph.update(
        {
            b: {"type": "d.branch", "payload": {"n": i}, "depends_on": ["root"]}
            for i, b in enumerate(branches)
        }
    )
    graph["join"] = {"type": "d.count", "depends_on": branches}
    ids = await aclient.enqueue_graph(graph)
    rows = await wait_finished(db, ids, timeout=120)
    assert {r["status"] for r in rows.values()} == {"completed"}
    assert json.loads(rows["join"]["result"]) == {"count": 1000, "sum": sum(range(1000))}
    last_branch = max(rows[b]["finished_at"] for b in branches)
    first_branch = min(rows[b]["started_at"] for b in branches)
    assert first_branch >= rows["root"]["finished_at"]
    assert rows["join"]["started_at"] >= last_branch
    with capsys.disabled():
        latency = (rows["join"]["started_at"] - last_branch).total_seconds() * 1000
        print(f"\n  fan-in of 1,000: join started {latency:.1f} ms after the last branch finished")


# --- the reaper's ends ------------------------------------------------------------------


async def waiting_on(harness: Harness, dependency: int) -> int:  # noqa: F811
    job_id: int = await harness.conn.fetchval(
        f"INSERT INTO {harness.db.jobs} (type, depends_on) VALUES ('r.work', $1) RETURNING id",
        [dependency],
    )
    return job_id


async def test_a_stale_dependency_out_of_attempts_ends_its_dependents(
    harness: Harness,  # noqa: F811
) -> None:
    b = await harness.processing(attempts=3, max_attempts=3)
    d = await waiting_on(harness, b)
    rescued = await harness.reaper.rescue_stale()
    assert [(job_id, status) for job_id, _, status in rescued] == [(b, "failed")]
    row = await harness.row(d)
    assert row["status"] == "failed"
    assert row["last_error"].startswith(f"dependency {b} (r.work) failed: stale: owner stopped")


async def test_a_dependency_nobody_can_run_ends_its_dependents(
    harness: Harness,  # noqa: F811
) -> None:
    b: int = await harness.conn.fetchval(
        f"INSERT INTO {harness.db.jobs} (type, run_at) "
        "VALUES ('nobody.runs', now() - interval '1 day') RETURNING id"
    )
    d = await waiting_on(harness, b)
    assert await harness.reaper.fail_without_executor() == [b]
    row = await harness.row(d)
    assert row["status"] == "failed"
    assert row["last_error"].startswith(
        f"dependency {b} (nobody.runs) failed: no executor registered for type 'nobody.runs'"
    )


# --- the README's example ------------------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_blocks() -> list[tuple[str, str]]:
    """The fenced blocks (language, text) of the README's "Job dependencies" section."""
    section = README.read_text(encoding="utf-8").split("\n## Job dependencies\n", 1)[1]
    return FENCE.findall(section.split("\n## ", 1)[0])


def run_printing(code: str, namespace: dict[str, Any]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, namespace)
    return out.getvalue()


async def test_the_readme_example_prints_what_the_readme_shows(
    start_runtime: StartRuntime, db: TestDatabase
) -> None:
    blocks = readme_blocks()
    (_, executors), (_, enqueue), (_, printed), (_, after), (_, printed_after) = blocks[:5]
    language, sql = blocks[5]
    assert language == "sql"
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(executors, namespace)
    # The README's database and schema, swapped for this test's.
    client = f"Client(DSN, schema={db.schema!r})"
    enqueue = re.sub(r'^DSN = ".*"$', f"DSN = {db.dsn!r}", enqueue, flags=re.M)
    enqueue = enqueue.replace("Client(DSN)", client)
    assert await asyncio.to_thread(run_printing, enqueue, namespace) == printed
    runtime = await start_runtime(namespace["app"])
    conn = await db.connect()
    try:

        async def released() -> bool:
            status = await conn.fetchval(f"SELECT status FROM {db.jobs} WHERE id = 5")
            return bool(status == "pending")

        await eventually(released, timeout=20, what="the README's graph to run")
        after = after.replace("Client(DSN)", client)
        assert await asyncio.to_thread(run_printing, after, namespace) == printed_after
        await runtime.stop()  # the SQL example shows jobs no replica runs

        # The SQL example, statement by statement, in the same schema (ids 6 to 11).
        code = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
        results = []
        for statement in filter(None, (s.strip() for s in code.split(";"))):
            statement = statement.replace("dispatcher.jobs", db.jobs)
            if "'{6,99}'" in statement:
                with pytest.raises(asyncpg.ForeignKeyViolationError, match=r"exist: 99$"):
                    await conn.execute(statement)
            else:
                results.append([tuple(row) for row in await conn.fetch(statement)])
        assert results[:4] == [
            [(6,)],
            [],
            [(7, "waiting", [6])],
            [(6, "image.fetch", "pending")],
        ]
        await conn.execute(f"UPDATE {db.jobs} SET status = 'cancelled' WHERE id = 9")
        rows = await conn.fetch(f"SELECT id, type, status, last_error FROM {db.jobs} WHERE id >= 9")
    finally:
        await conn.close()
    assert sorted(tuple(row) for row in rows) == [
        (9, "image.fetch", "cancelled", None),
        (10, "image.resize", "failed", "dependency 9 (image.fetch) was cancelled"),
        (11, "image.resize", "failed", "dependency 9 (image.fetch) was cancelled"),
    ]
