"""Job dependencies in the database (migration 0013) and through the producer clients.

The states are driven with plain SQL where a replica would write them (an UPDATE that
ends a job fires the same triggers as the completer's), so each rule is checked on
its own: settling at insert, promotion at the end of the last dependency (with its
NOTIFY), failure propagation down the graph, retries, retention, and the races
between a dependent's insert and its dependencies' ends, forced with row locks held
open in transactions. The runs with replicas are in test_dependency_runs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import asyncpg
import httpx
import psycopg
import pytest

from dispatcher import AsyncClient, Client, InvalidJob, JobStatus
from dispatcher.core.queries import queries_for
from dispatcher.runtime import Runtime
from tests.integration.test_api import AUTH, api  # noqa: F401  (a fixture)
from tests.integration.test_cli import dispatcher
from tests.integration.test_clients import CountingCursor
from tests.integration.test_dashboard import dashboard, log_in  # noqa: F401  (a fixture)
from tests.support.database import TestDatabase
from tests.support.waiting import eventually

T = TypeVar("T")
U = TypeVar("U")


@pytest.fixture
def client(db: TestDatabase) -> Iterator[Client]:
    with Client(db.dsn, schema=db.schema) as c:
        yield c


@pytest.fixture
async def aclient(db: TestDatabase) -> AsyncIterator[AsyncClient]:
    c = await AsyncClient.connect(db.dsn, schema=db.schema)
    yield c
    await c.close()


@pytest.fixture
async def conn(db: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    c = await db.connect()
    yield c
    await c.close()


async def insert(
    conn: asyncpg.Connection, db: TestDatabase, type: str, depends_on: list[int] | None = None
) -> int:
    job_id: int = await conn.fetchval(
        f"INSERT INTO {db.jobs} (type, depends_on) VALUES ($1, $2) RETURNING id", type, depends_on
    )
    return job_id


async def end(
    conn: asyncpg.Connection, db: TestDatabase, job_id: int, status: str, error: str | None = None
) -> None:
    """End a job as the completer would (status, finished_at, last_error)."""
    await conn.execute(
        f"UPDATE {db.jobs} SET status = $2, finished_at = now(), last_error = $3 WHERE id = $1",
        job_id,
        status,
        error,
    )


async def row(conn: asyncpg.Connection, db: TestDatabase, job_id: int) -> asyncpg.Record:
    found: asyncpg.Record = await conn.fetchrow(f"SELECT * FROM {db.jobs} WHERE id = $1", job_id)
    return found


async def status(conn: asyncpg.Connection, db: TestDatabase, job_id: int) -> str:
    return str((await row(conn, db, job_id))["status"])


async def waiting_for(conn: asyncpg.Connection, db: TestDatabase, job_id: int) -> int | None:
    """How many dependencies job ``job_id`` still waits for (None: it does not wait)."""
    count: int | None = await conn.fetchval(
        f'SELECT waiting_for FROM "{db.schema}".waiting_jobs WHERE job_id = $1', job_id
    )
    return count


async def wait_blocked(observer: asyncpg.Connection, blocked: asyncpg.Connection) -> None:
    """Until ``blocked``'s backend waits for a lock (a statement sent on it)."""
    pid = blocked.get_server_pid()

    async def waiting() -> bool:
        event = await observer.fetchval(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
        )
        return bool(event == "Lock")

    await eventually(waiting, timeout=10, what=f"backend {pid} to wait for a row lock")


# --- settling at insert -----------------------------------------------------------------


async def test_a_plain_sql_insert_waits_until_its_dependencies_completed(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    a = await insert(conn, db, "a")
    b = await insert(conn, db, "b")
    d = await conn.fetchval(
        f"INSERT INTO {db.jobs} (type, depends_on) VALUES ('d', ARRAY[$1, $2, $1]::bigint[]) "
        "RETURNING id",
        a,
        b,
    )
    waiting = await row(conn, db, d)
    assert (waiting["status"], await waiting_for(conn, db, d)) == ("waiting", 2)
    assert (await row(conn, db, a))["has_dependents"]
    await end(conn, db, a, "completed")
    assert await waiting_for(conn, db, d) == 1
    assert await status(conn, db, d) == "waiting"
    before = await conn.fetchval("SELECT now()")
    await end(conn, db, b, "completed")
    ready = await row(conn, db, d)
    assert (ready["status"], await waiting_for(conn, db, d)) == ("pending", None)
    assert ready["run_at"] >= before  # due from the moment it could run


async def test_a_job_whose_dependencies_all_completed_is_pending_at_once(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    a = await insert(conn, db, "a")
    await end(conn, db, a, "completed")
    d = await insert(conn, db, "d", [a])
    assert await status(conn, db, d) == "pending"
    edges = await conn.fetch(f'SELECT * FROM "{db.schema}".job_dependencies')
    assert [(e["dependency_id"], e["dependent_id"]) for e in edges] == [(a, d)]


async def test_unknown_dependencies_are_refused_naming_them(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    a = await insert(conn, db, "a")
    with pytest.raises(asyncpg.ForeignKeyViolationError) as refused:
        await insert(conn, db, "d", [a, 9001, 9000])
    assert str(refused.value) == "depends_on names jobs that do not exist: 9000, 9001"
    assert refused.value.constraint_name == "depends_on_must_name_existing_jobs"
    assert await conn.fetchval(f"SELECT count(*) FROM {db.jobs}") == 1


async def test_no_cycle_can_be_inserted_even_with_explicit_ids(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    # Two rows of one statement naming each other: the one that names a later id is
    # refused, so the statement is.
    with pytest.raises(asyncpg.CheckViolationError, match="may depend only on jobs with lower ids"):
        await conn.execute(
            f"INSERT INTO {db.jobs} (id, type, depends_on) "
            "VALUES (100, 'a', '{101}'), (101, 'b', '{100}')"
        )
    # In dependency order, one statement may hold a whole graph.
    await conn.execute(
        f"INSERT INTO {db.jobs} (id, type, depends_on) "
        "VALUES (101, 'b', '{100}'), (100, 'a', NULL), (102, 'c', '{100,101}')"
    )
    assert [r["status"] for r in await conn.fetch(f"SELECT status FROM {db.jobs} ORDER BY id")] == [
        "pending",
        "waiting",
        "waiting",
    ]


async def test_depends_on_is_fixed_at_insert(db: TestDatabase, conn: asyncpg.Connection) -> None:
    a = await insert(conn, db, "a")
    await end(conn, db, a, "completed")
    d = await insert(conn, db, "d", [a])
    with pytest.raises(asyncpg.CheckViolationError, match="cannot change after it is inserted"):
        await conn.execute(f"UPDATE {db.jobs} SET depends_on = NULL WHERE id = $1", d)
    await conn.execute(f"UPDATE {db.jobs} SET priority = 3 WHERE id = $1", d)  # the rest may


async def test_a_job_with_dependencies_is_inserted_pending_or_waiting(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    a = await insert(conn, db, "a")
    with pytest.raises(asyncpg.CheckViolationError, match="inserted pending or waiting, not"):
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, status, depends_on, owner, heartbeat_at) "
            "VALUES ('d', 'processing', $1, 'x', now())",
            [a],
        )
    # Inserted waiting on a completed dependency: pending (nothing to wait for).
    await end(conn, db, a, "completed")
    d = await conn.fetchval(
        f"INSERT INTO {db.jobs} (type, status, depends_on) VALUES ('d', 'waiting', $1) "
        "RETURNING id",
        [a],
    )
    assert await status(conn, db, d) == "pending"


# --- the end of a dependency -------------------------------------------------------------


async def test_the_last_dependency_to_complete_notifies_the_jobs_channel(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    a = await insert(conn, db, "a")
    await insert(conn, db, "d.type", [a])
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await db.connect()
    try:
        await listener.add_listener(
            f"{db.schema}.jobs", lambda *args: heard.put_nowait(str(args[-1]))
        )
        await end(conn, db, a, "completed")
        payload = json.loads(await asyncio.wait_for(heard.get(), timeout=10))
    finally:
        await listener.close()
    # The insert notification's shape (0009): the type made pending and its run_at.
    assert list(payload) == ["d.type"]
    assert isinstance(payload["d.type"], float)


async def test_a_failed_dependency_ends_everything_after_it_naming_the_cause(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    #   a -> b -> d -> e      (c: another dependency of d; f: cancelled when b fails)
    a = await insert(conn, db, "fetch")
    b = await insert(conn, db, "resize", [a])
    c = await insert(conn, db, "scan", [a])
    d = await insert(conn, db, "merge", [b, c])
    e = await insert(conn, db, "upload", [d])
    f = await conn.fetchval(
        f"INSERT INTO {db.jobs} (type, depends_on, on_dependency_failure) "
        "VALUES ('notify', $1, 'cancel') RETURNING id",
        [b],
    )
    await end(conn, db, a, "completed")
    await end(conn, db, c, "completed")
    await end(conn, db, b, "failed", "ValueError: no such image")
    rows = {r["id"]: r for r in await conn.fetch(f"SELECT * FROM {db.jobs}")}
    assert rows[c]["status"] == "completed"
    assert rows[d]["status"] == "failed"
    assert rows[d]["last_error"] == f"dependency {b} (resize) failed: ValueError: no such image"
    assert rows[e]["status"] == "failed"
    assert rows[e]["last_error"] == (
        f"dependency {d} (merge) failed: dependency {b} (resize) failed: ValueError: no such image"
    )
    assert rows[f]["status"] == "cancelled"
    assert rows[f]["last_error"].startswith(f"dependency {b} (resize) failed")
    for ended in (d, e, f):
        assert rows[ended]["finished_at"] is not None
        (error,) = json.loads(rows[ended]["errors"])
        assert error["error"] == rows[ended]["last_error"] and error["attempt"] == 0


async def test_a_cancelled_waiting_job_ends_its_dependents(
    db: TestDatabase, client: Client, conn: asyncpg.Connection
) -> None:
    a = await insert(conn, db, "a")
    b = await insert(conn, db, "b", [a])
    d = await insert(conn, db, "d", [b])
    cancelled = client.cancel(b)
    assert cancelled.status is JobStatus.CANCELLED
    assert await status(conn, db, d) == "failed"
    assert (await row(conn, db, d))["last_error"] == f"dependency {b} (b) was cancelled"
    assert await status(conn, db, a) == "pending"


async def test_a_job_inserted_after_its_dependency_failed_ends_at_once(
    db: TestDatabase, client: Client, conn: asyncpg.Connection
) -> None:
    a = await insert(conn, db, "a")
    await end(conn, db, a, "failed", "boom")
    job = client.enqueue("d", depends_on=[a])
    assert job.status is JobStatus.FAILED
    assert job.last_error == f"dependency {a} (a) failed: boom"
    cancelled = client.enqueue("d", depends_on=[a], on_dependency_failure="cancel")
    assert cancelled.status is JobStatus.CANCELLED


# --- races: row locks, not timing ----------------------------------------------------------


@contextlib.asynccontextmanager
async def two_sessions(db: TestDatabase) -> AsyncIterator[tuple[asyncpg.Connection, ...]]:
    first, second = await db.connect(), await db.connect()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def second_waits_for_first(
    conn: asyncpg.Connection,
    first: asyncpg.Connection,
    held: Awaitable[T],
    second: asyncpg.Connection,
    blocked: Awaitable[U],
) -> tuple[T, U]:
    """Run ``held`` on ``first`` in a transaction left open, start ``blocked`` on
    ``second`` and see it wait on a row lock (from ``conn``), commit; both results."""
    transaction = first.transaction()
    await transaction.start()
    held_result = await held
    waiting = asyncio.ensure_future(blocked)
    await wait_blocked(conn, second)
    await transaction.commit()
    return held_result, await asyncio.wait_for(waiting, timeout=10)


async def test_an_insert_waits_for_a_completion_in_flight_and_sees_it(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    b = await insert(conn, db, "b")
    async with two_sessions(db) as (ender, inserter):
        _, d = await second_waits_for_first(
            conn, ender, end(ender, db, b, "completed"), inserter, insert(inserter, db, "d", [b])
        )
    assert await status(conn, db, d) == "pending"


async def test_a_completion_waits_for_an_insert_in_flight_and_releases_it(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    b = await insert(conn, db, "b")
    async with two_sessions(db) as (ender, inserter):
        d, _ = await second_waits_for_first(
            conn, inserter, insert(inserter, db, "d", [b]), ender, end(ender, db, b, "completed")
        )
    assert await status(conn, db, d) == "pending"


async def test_an_insert_waits_for_a_failure_in_flight_and_ends_with_it(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    b = await insert(conn, db, "b")
    async with two_sessions(db) as (ender, inserter):
        _, d = await second_waits_for_first(
            conn,
            ender,
            end(ender, db, b, "failed", "boom"),
            inserter,
            insert(inserter, db, "d", [b]),
        )
    assert (await row(conn, db, d))["last_error"] == f"dependency {b} (b) failed: boom"


async def test_two_dependencies_ending_in_parallel_transactions_release_the_job(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    # Each transaction sees the other's dependency still running: only the count on
    # the waiting row (counted down under its row lock) can tell the second it is last.
    b = await insert(conn, db, "b")
    c = await insert(conn, db, "c")
    d = await insert(conn, db, "d", [b, c])
    async with two_sessions(db) as (first, second):
        await second_waits_for_first(
            conn, first, end(first, db, b, "completed"), second, end(second, db, c, "completed")
        )
    assert (await status(conn, db, d), await waiting_for(conn, db, d)) == ("pending", None)


# --- retries ------------------------------------------------------------------------------


async def test_retry_rules(db: TestDatabase, client: Client, conn: asyncpg.Connection) -> None:
    """Dependents that a failure ended stay ended when the dependency is retried; a
    retried dependent waits again for what has not completed, and ends again at once
    while a dependency is still failed."""
    a = await insert(conn, db, "a")
    b = await insert(conn, db, "b", [a])
    await end(conn, db, a, "failed", "boom")
    assert await status(conn, db, b) == "failed"

    again = client.retry(b)  # a is still failed
    assert again.status is JobStatus.FAILED
    assert again.last_error == f"dependency {a} (a) failed: boom"
    assert len(again.errors) == 2

    assert client.retry(a).status is JobStatus.PENDING
    assert await status(conn, db, b) == "failed"  # not revived by its dependency's retry
    waiting = client.retry(b)
    assert waiting.status is JobStatus.WAITING and waiting.open_dependencies == [a]
    await end(conn, db, a, "completed")
    assert await status(conn, db, b) == "pending"


async def test_bulk_retry_of_a_failed_graph_waits_in_order(
    db: TestDatabase, client: Client, conn: asyncpg.Connection
) -> None:
    a = await insert(conn, db, "t")
    b = await insert(conn, db, "t", [a])
    c = await insert(conn, db, "t", [b])
    await end(conn, db, a, "failed", "boom")
    assert client.retry_many(status="failed", type="t") == 3
    assert [await status(conn, db, j) for j in (a, b, c)] == ["pending", "waiting", "waiting"]


# --- retention ------------------------------------------------------------------------------


async def test_retention_keeps_what_an_unfinished_job_still_depends_on(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    prune = queries_for(db.schema)["prune_finished_jobs"]
    a = await insert(conn, db, "a")
    await end(conn, db, a, "completed")
    d = await insert(conn, db, "d", [a])  # pending: it will read a's result
    old = await insert(conn, db, "old")
    await end(conn, db, old, "completed")
    await conn.execute(f"UPDATE {db.jobs} SET finished_at = now() - interval '2 days'")
    assert await conn.fetchval(prune, ["completed"], 86400, 100) == 1  # old only
    assert await conn.fetchval(f"DELETE FROM {db.jobs} WHERE id = $1 RETURNING 1", a) is None
    assert await status(conn, db, a) == "completed"

    await end(conn, db, d, "completed")
    await conn.execute(f"UPDATE {db.jobs} SET finished_at = now() - interval '2 days'")
    assert await conn.fetchval(prune, ["completed"], 86400, 100) == 2
    assert await conn.fetchval(f'SELECT count(*) FROM "{db.schema}".job_dependencies') == 0


async def test_a_prune_and_a_new_dependent_never_both_win(
    db: TestDatabase, conn: asyncpg.Connection
) -> None:
    # The delete trigger reads the dependents after the delete locked the row: a
    # dependent committed in between keeps it, one still settling finds it gone.
    a = await insert(conn, db, "a")
    await end(conn, db, a, "completed")
    await conn.execute(f"UPDATE {db.jobs} SET finished_at = now() - interval '2 days'")
    pruner, inserter = await db.connect(), await db.connect()
    try:
        transaction = pruner.transaction()
        await transaction.start()
        deleted = await pruner.fetchval(
            queries_for(db.schema)["prune_finished_jobs"], ["completed"], 86400, 100
        )
        assert deleted == 1
        inserting = asyncio.create_task(insert(inserter, db, "d", [a]))
        await wait_blocked(conn, inserter)
        await transaction.commit()
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="do not exist"):
            await asyncio.wait_for(inserting, timeout=10)
    finally:
        await pruner.close()
        await inserter.close()


# --- producers ------------------------------------------------------------------------------


def test_sync_enqueue_with_dependencies(client: Client) -> None:
    a = client.enqueue("image.fetch", {"url": "u"})
    b = client.enqueue("image.scan")
    job = client.enqueue("image.resize", {"width": 100}, depends_on=[a.id, b.id])
    assert job.status is JobStatus.WAITING
    assert job.depends_on == [a.id, b.id] and job.open_dependencies == [a.id, b.id]
    assert client.get(a.id).open_dependencies is None  # no dependencies of its own
    with pytest.raises(InvalidJob, match=r"depends_on names jobs that do not exist: 999999$"):
        client.enqueue("image.resize", depends_on=[a.id, 999_999])
    with pytest.raises(InvalidJob, match="depends_on and unique_key do not combine"):
        client.enqueue("image.resize", depends_on=[a.id], unique_key="k")
    with pytest.raises(InvalidJob, match="on_dependency_failure needs depends_on"):
        client.enqueue("image.resize", on_dependency_failure="cancel")


async def test_async_enqueue_with_dependencies(aclient: AsyncClient) -> None:
    a = await aclient.enqueue("image.fetch")
    job = await aclient.enqueue("image.resize", depends_on=[a.id], on_dependency_failure="cancel")
    assert job.status is JobStatus.WAITING and job.open_dependencies == [a.id]
    assert job.on_dependency_failure == "cancel"
    with pytest.raises(InvalidJob, match="do not exist: 424242"):
        await aclient.enqueue("image.resize", depends_on=[424_242])


def test_sync_enqueue_inside_the_callers_transaction(client: Client, db: TestDatabase) -> None:
    with psycopg.connect(db.dsn) as conn:
        with conn.transaction():
            a = client.enqueue("a", conn=conn)
            d = client.enqueue("d", depends_on=[a.id], conn=conn)
            assert d.status is JobStatus.WAITING
        with pytest.raises(InvalidJob), conn.transaction():
            client.enqueue("d", depends_on=[a.id + 1000], conn=conn)
    assert client.get(d.id).status is JobStatus.WAITING


GRAPH: dict[str, dict[str, Any]] = {
    "upload": {"type": "image.upload", "depends_on": ["resize", "scan"]},
    "fetch": {"type": "image.fetch", "payload": {"url": "https://example.com/a.jpg"}},
    "resize": {"type": "image.resize", "depends_on": ["fetch"], "priority": -1},
    "scan": {"type": "image.scan", "depends_on": ["fetch"], "on_dependency_failure": "cancel"},
}


def test_sync_enqueue_graph_inserts_every_node_in_one_statement(
    client: Client, db: TestDatabase
) -> None:
    with psycopg.connect(db.dsn, autocommit=True, cursor_factory=CountingCursor) as conn:
        CountingCursor.statements = 0
        ids = client.enqueue_graph(GRAPH, conn=conn)
        assert CountingCursor.statements == 3  # closed queues, reserve ids, insert
    assert set(ids) == set(GRAPH)
    assert ids["fetch"] < ids["resize"] < ids["upload"] and ids["scan"] < ids["upload"]
    jobs = {name: client.get(job_id) for name, job_id in ids.items()}
    assert jobs["fetch"].status is JobStatus.PENDING
    assert jobs["fetch"].payload == {"url": "https://example.com/a.jpg"}
    assert jobs["resize"].status is JobStatus.WAITING and jobs["resize"].priority == -1
    assert jobs["scan"].on_dependency_failure == "cancel"
    assert jobs["upload"].depends_on == sorted([ids["resize"], ids["scan"]])


async def test_async_enqueue_graph_with_an_existing_dependency(aclient: AsyncClient) -> None:
    existing = await aclient.enqueue("model.load")
    ids = await aclient.enqueue_graph(
        {
            "a": {"type": "t.a"},
            "b": {"type": "t.b", "depends_on": ["a", existing.id]},
        }
    )
    b = await aclient.get(ids["b"])
    assert b.status is JobStatus.WAITING
    assert b.depends_on == [existing.id, ids["a"]]
    with pytest.raises(InvalidJob, match="do not exist: 77777"):
        await aclient.enqueue_graph({"a": {"type": "t.a", "depends_on": [77777]}})


def test_a_bad_graph_is_refused_before_anything_is_written(
    client: Client, db: TestDatabase
) -> None:
    cases = {
        "the graph has a cycle: a -> b -> c -> a": {
            "a": {"type": "t", "depends_on": ["b"]},
            "b": {"type": "t", "depends_on": ["c"]},
            "c": {"type": "t", "depends_on": ["a"]},
            "d": {"type": "t"},
        },
        "node 'b' depends on 'x', which is not a node of the graph": {
            "a": {"type": "t"},
            "b": {"type": "t", "depends_on": ["x"]},
        },
        "node 'a': a graph's jobs take no unique_key": {"a": {"type": "t", "unique_key": "k"}},
        "node 'a' has no type": {"a": {"payload": {}}},
        "node 'a': priority must be an integer": {"a": {"type": "t", "priority": "high"}},
        "node 'a' depends on itself": {"a": {"type": "t", "depends_on": ["a"]}},
    }
    for message, graph in cases.items():
        with pytest.raises(InvalidJob) as refused:
            client.enqueue_graph(graph)
        assert str(refused.value).startswith(message), refused.value
    with psycopg.connect(db.dsn) as conn:
        assert conn.execute(f'SELECT count(*) FROM "{db.schema}".jobs').fetchone() == (0,)


# --- the HTTP API and the CLI ------------------------------------------------------------


async def test_the_api_enqueues_shows_and_lists_waiting_jobs(
    api: tuple[Runtime, httpx.AsyncClient],  # noqa: F811
) -> None:
    _, http = api
    # A type nobody runs stays pending: its dependent waits.
    a = (await http.post("/jobs", json={"type": "nobody.runs"}, headers=AUTH)).json()["id"]
    created = await http.post("/jobs", json={"type": "t.noop", "depends_on": [a]}, headers=AUTH)
    assert created.status_code == 201, created.text
    d = created.json()
    assert (d["status"], d["depends_on"], d["open_dependencies"]) == ("waiting", [a], [a])
    shown = (await http.get(f"/jobs/{d['id']}", headers=AUTH)).json()
    assert (shown["depends_on"], shown["open_dependencies"]) == ([a], [a])
    listed = (await http.get("/jobs", params={"status": "waiting"}, headers=AUTH)).json()
    assert [job["id"] for job in listed["jobs"]] == [d["id"]]

    unknown = await http.post(
        "/jobs", json={"type": "t.noop", "depends_on": [a, 999_999]}, headers=AUTH
    )
    assert unknown.status_code == 422
    assert unknown.json() == {"detail": "depends_on names jobs that do not exist: 999999"}
    bad = await http.post(
        "/jobs",
        json={"type": "t.noop", "depends_on": [a], "on_dependency_failure": "ignore"},
        headers=AUTH,
    )
    assert bad.status_code == 422 and "on_dependency_failure" in bad.text

    assert (await http.delete(f"/jobs/{a}", headers=AUTH)).json()["status"] == "cancelled"
    ended = (await http.get(f"/jobs/{d['id']}", headers=AUTH)).json()
    assert ended["status"] == "failed"
    assert ended["last_error"] == f"dependency {a} (nobody.runs) was cancelled"
    assert ended["open_dependencies"] == [a]


def test_the_cli_enqueues_with_dependencies_and_shows_them(db: TestDatabase) -> None:
    env = {"DISPATCHER_DSN": db.dsn, "DISPATCHER_SCHEMA": db.schema}
    assert dispatcher("enqueue", "a.type", env=env).returncode == 0
    assert dispatcher("enqueue", "b.type", env=env).returncode == 0
    out = dispatcher("enqueue", "c.type", "--depends-on", "1,2", "--depends-on", "1", env=env)
    assert (out.returncode, out.stdout.strip()) == (
        0,
        "enqueued job 3 (c.type), waiting for jobs 1, 2",
    )
    shown = dispatcher("jobs", "show", "3", env=env).stdout
    assert "status            waiting" in shown
    assert "depends_on        [1, 2]" in shown and "open_dependencies [1, 2]" in shown
    listed = dispatcher("jobs", "list", "--status", "waiting", env=env).stdout.splitlines()
    assert [line.split()[:3] for line in listed[1:]] == [["3", "c.type", "waiting"]]
    unknown = dispatcher("enqueue", "c.type", "--depends-on", "77", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: depends_on names jobs that do not exist: 77"


async def test_the_dashboard_links_a_job_to_its_dependencies_and_dependents(
    dashboard: tuple[Runtime, httpx.AsyncClient],  # noqa: F811
    db: TestDatabase,
    conn: asyncpg.Connection,
) -> None:
    _, browser = dashboard
    await log_in(browser)
    a = await insert(conn, db, "nobody.fetch")
    b = await insert(conn, db, "nobody.resize", [a])
    c = await insert(conn, db, "nobody.publish", [a, b])
    page = (await browser.get(f"/ui/jobs/{b}")).text
    dependencies = page.split('data-testid="dependencies"')[1].split("</ul>")[0]
    assert f'href="/ui/jobs/{a}"' in dependencies and "status-pending" in dependencies
    dependents = page.split('data-testid="dependents"')[1].split("</ul>")[0]
    assert f'href="/ui/jobs/{c}"' in dependents and "status-waiting" in dependents
    assert f'action="/ui/jobs/{b}/cancel"' in page  # a waiting job can be cancelled
    root = (await browser.get(f"/ui/jobs/{a}")).text
    assert 'data-testid="dependencies"' not in root
    root_dependents = root.split('data-testid="dependents"')[1].split("</ul>")[0]
    assert f'href="/ui/jobs/{b}"' in root_dependents and f'href="/ui/jobs/{c}"' in root_dependents
    waiting = (await browser.get("/ui/jobs?status=waiting")).text
    assert f'data-job-id="{b}"' in waiting and f'data-job-id="{a}"' not in waiting
