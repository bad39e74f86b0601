"""dispatcher.contrib.sqlalchemy against a real Postgres: a job enqueued through a
SQLAlchemy Session, Connection (psycopg 3) or AsyncSession (asyncpg) commits and rolls
back with it, and its commit wakes the leader."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from dispatcher import InvalidJob, JobStatus, QueueFull
from dispatcher.contrib.sqlalchemy import (
    enqueue,
    enqueue_async,
    enqueue_graph,
    enqueue_graph_async,
    enqueue_many,
    enqueue_many_async,
)
from dispatcher.core.app import App
from dispatcher.services.job import Job
from tests.support.database import TestDatabase
from tests.support.leadership import leading
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually


def url(db: TestDatabase, driver: str) -> str:
    """The test database as a SQLAlchemy URL on ``driver``."""
    return make_url(db.dsn).set(drivername=f"postgresql+{driver}").render_as_string(False)


def connect_args(db: TestDatabase, driver: str) -> dict[str, Any]:
    """The test's schema first on the search_path (for the business table ``orders``)."""
    if driver == "asyncpg":
        return {"server_settings": {"search_path": db.schema}}
    return {"options": f"-csearch_path={db.schema}"}


@pytest.fixture
def engine(db: TestDatabase) -> Iterator[Engine]:
    engine = create_engine(url(db, "psycopg"), connect_args=connect_args(db, "psycopg"))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders (id int PRIMARY KEY)"))
    yield engine
    engine.dispose()


@pytest.fixture
async def async_engine(db: TestDatabase, engine: Engine) -> AsyncIterator[AsyncEngine]:
    """On asyncpg; after ``engine``, which creates the business table."""
    async_engine = create_async_engine(url(db, "asyncpg"), connect_args=connect_args(db, "asyncpg"))
    yield async_engine
    await async_engine.dispose()


def committed(db: TestDatabase, where: str = "true") -> list[dict[str, Any]]:
    """Job rows another session can see: committed ones only."""
    with psycopg.connect(db.dsn, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(f"SELECT * FROM {db.jobs} WHERE {where} ORDER BY id").fetchall()


# --- sync: Session and Connection on psycopg 3 ---------------------------------------------


def test_session_commit_keeps_the_job_with_the_business_write(
    engine: Engine, db: TestDatabase
) -> None:
    with Session(engine) as session, session.begin():
        session.execute(text("INSERT INTO orders VALUES (1)"))
        job = enqueue(session, "order.ship", {"order": 1}, schema=db.schema, priority=-3)
        assert job.status is JobStatus.PENDING and job.priority == -3
        assert committed(db) == [], "visible to others before the session committed"
    [row] = committed(db)
    assert (row["id"], row["payload"]) == (job.id, {"order": 1})


def test_session_rollback_drops_the_job_even_as_its_first_statement(
    engine: Engine, db: TestDatabase
) -> None:
    with Session(engine) as session:
        enqueue(session, "order.ship", {"order": 1}, schema=db.schema)
        enqueue_many(session, "order.ship", [{"order": 2}, {"order": 3}], schema=db.schema)
        session.rollback()
    with Session(engine) as session:
        enqueue(session, "order.ship", {"order": 4}, schema=db.schema)
        session.close()  # closing without commit rolls back too
    assert committed(db) == []


def test_connection_commits_and_rolls_back_the_job(engine: Engine, db: TestDatabase) -> None:
    # Commit as you go: the enqueue is the connection's first statement, and its
    # commit() must commit it (not be a no-op on a transaction never begun).
    with engine.connect() as conn:
        first = enqueue(conn, "order.ship", {"order": 1}, schema=db.schema)
        conn.commit()
        enqueue(conn, "order.ship", {"order": 2}, schema=db.schema)
        conn.rollback()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO orders VALUES (3)"))
        third = enqueue(conn, "order.ship", {"order": 3}, schema=db.schema)
    with engine.connect() as conn:
        enqueue(conn, "order.ship", {"order": 4}, schema=db.schema)
    # closed without commit: rolled back
    assert [row["id"] for row in committed(db)] == [first.id, third.id]


def test_a_savepoint_rollback_drops_only_its_jobs(engine: Engine, db: TestDatabase) -> None:
    with Session(engine) as session, session.begin():
        kept = enqueue(session, "t", {"n": 1}, schema=db.schema)
        savepoint = session.begin_nested()
        enqueue(session, "t", {"n": 2}, schema=db.schema)
        savepoint.rollback()
    assert [row["id"] for row in committed(db)] == [kept.id]


def test_enqueue_many_and_graph_commit_with_the_session(engine: Engine, db: TestDatabase) -> None:
    later = dt.datetime(2031, 5, 1, 12, tzinfo=dt.UTC)
    with Session(engine) as session, session.begin():
        lean = enqueue_many(session, "t.bulk", [{"n": n} for n in range(5)], schema=db.schema)
        full = enqueue_many(session, "t.bulk", ["a", "b"], schema=db.schema, run_at=later)
        keyed = enqueue_many(
            session, "t.keyed", [{}, {}], schema=db.schema, unique_keys=["k1", "k1"]
        )
        graph = enqueue_graph(
            session,
            {"fetch": {"type": "g.fetch"}, "resize": {"type": "g.resize", "depends_on": ["fetch"]}},
            schema=db.schema,
        )
    rows = {row["id"]: row for row in committed(db)}
    assert [rows[i]["payload"] for i in lean] == [{"n": n} for n in range(5)]
    assert [(rows[i]["payload"], rows[i]["run_at"]) for i in full] == [("a", later), ("b", later)]
    assert keyed[0] == keyed[1]
    assert rows[graph["resize"]]["depends_on"] == [graph["fetch"]]
    assert rows[graph["resize"]]["status"] == "waiting"


# JSON values that a driver's own jsonb decoding could take for JSON text, or mangle.
PAYLOADS: list[Any] = ["hello", "42", "", 42, 1.5, True, [1, "x"], {"a": {"b": None}}, "é ✓"]


def test_payloads_and_rows_round_trip_through_the_psycopg_dialect(
    engine: Engine, db: TestDatabase
) -> None:
    with Session(engine) as session, session.begin():
        jobs = [enqueue(session, "t", payload, schema=db.schema) for payload in PAYLOADS]
    assert [job.payload for job in jobs] == PAYLOADS
    assert [job.payload for job in jobs] == [row["payload"] for row in committed(db)]
    assert all(job.created_at.tzinfo is not None for job in jobs)


def test_refusals_raise_the_clients_errors(engine: Engine, db: TestDatabase) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as admin:
        admin.execute(
            f'INSERT INTO "{db.schema}".job_types (type, max_pending, accepting, pending) '
            "VALUES ('t.full', 1, false, 1)"
        )
    with Session(engine) as session, session.begin():
        session.execute(text("INSERT INTO orders VALUES (1)"))
        # Refused before the database, or without a failed statement: the
        # transaction goes on.
        with pytest.raises(InvalidJob, match="max_attempts must be 1 to 10000"):
            enqueue(session, "t", max_attempts=0, schema=db.schema)
        with pytest.raises(QueueFull, match=r"'t\.full' queue is full"):
            enqueue(session, "t.full", schema=db.schema)
        with pytest.raises(QueueFull, match=r"'t\.full' queue is full"):
            enqueue_many(session, "t.full", [{}], schema=db.schema)
        # Refused by the database: only a savepoint lets the transaction go on.
        with (
            pytest.raises(InvalidJob, match="depends_on names jobs that do not exist: 999999"),
            session.begin_nested(),
        ):
            enqueue(session, "t", depends_on=[999_999], schema=db.schema)
        kept = enqueue(session, "t", {"after": "refusals"}, schema=db.schema)
    assert [row["id"] for row in committed(db)] == [kept.id]


def test_other_drivers_are_refused_with_what_to_use(db: TestDatabase, engine: Engine) -> None:
    with (
        Session(create_engine("sqlite://")) as session,
        pytest.raises(TypeError, match=r"Session on sqlite\+pysqlite.*postgresql\+psycopg://"),
    ):
        enqueue(session, "t")
    with Session(engine) as session, pytest.raises(TypeError, match="an AsyncSession"):
        asyncio.run(enqueue_async(session, "t"))  # type: ignore[arg-type]


# --- asyncio: AsyncSession on asyncpg ------------------------------------------------------


async def test_async_session_commit_keeps_the_job(
    async_engine: AsyncEngine, db: TestDatabase
) -> None:
    async with AsyncSession(async_engine) as session, session.begin():
        await session.execute(text("INSERT INTO orders VALUES (1)"))
        job = await enqueue_async(session, "order.ship", {"order": 1}, schema=db.schema)
        ids = await enqueue_many_async(session, "t.bulk", [{"n": 1}, "two"], schema=db.schema)
        assert await asyncio.to_thread(committed, db) == []
    rows = await asyncio.to_thread(committed, db)
    assert [(row["id"], row["payload"]) for row in rows] == [
        (job.id, {"order": 1}),
        (ids[0], {"n": 1}),
        (ids[1], "two"),
    ]


async def test_async_session_rollback_drops_a_job_enqueued_as_its_first_statement(
    async_engine: AsyncEngine, db: TestDatabase
) -> None:
    # SQLAlchemy's asyncpg adapter sends BEGIN with its own first statement: had the
    # enqueue gone straight to asyncpg before that, it would have committed on its own.
    async with AsyncSession(async_engine) as session:
        await enqueue_async(session, "order.ship", {"order": 1}, schema=db.schema)
        await session.rollback()
    async with AsyncSession(async_engine) as session:
        await enqueue_many_async(session, "t.bulk", [{}, {}], schema=db.schema)
        await session.rollback()
    async with async_engine.connect() as conn:
        await enqueue_async(conn, "order.ship", {"order": 2}, schema=db.schema)
        await conn.rollback()
        kept = await enqueue_async(conn, "order.ship", {"order": 3}, schema=db.schema)
        await conn.commit()
    assert [row["id"] for row in await asyncio.to_thread(committed, db)] == [kept.id]


async def test_async_savepoint_and_refusals(async_engine: AsyncEngine, db: TestDatabase) -> None:
    async with AsyncSession(async_engine) as session, session.begin():
        kept = await enqueue_async(session, "t", schema=db.schema)
        async with session.begin_nested() as savepoint:
            await enqueue_async(session, "t", schema=db.schema)
            await savepoint.rollback()
        with pytest.raises(InvalidJob, match="depends_on names jobs that do not exist"):
            async with session.begin_nested():
                await enqueue_async(session, "t", depends_on=[999_999], schema=db.schema)
        graph = await enqueue_graph_async(
            session,
            {"a": {"type": "g.a"}, "b": {"type": "g.b", "depends_on": ["a"]}},
            schema=db.schema,
        )
    rows = await asyncio.to_thread(committed, db)
    assert [row["id"] for row in rows] == [kept.id, graph["a"], graph["b"]]


async def test_payloads_and_rows_round_trip_through_the_asyncpg_dialect(
    async_engine: AsyncEngine, db: TestDatabase
) -> None:
    # The dialect installs jsonb codecs that decode to Python: a decoded "42" must not
    # be taken for the JSON text 42.
    async with AsyncSession(async_engine) as session, session.begin():
        jobs = [await enqueue_async(session, "t", p, schema=db.schema) for p in PAYLOADS]
        ids = await enqueue_many_async(session, "t", PAYLOADS, schema=db.schema, priority=1)
    assert [job.payload for job in jobs] == PAYLOADS
    rows = await asyncio.to_thread(committed, db, f"id = ANY('{{{','.join(map(str, ids))}}}')")
    assert [row["payload"] for row in rows] == PAYLOADS


async def test_other_async_drivers_are_refused_with_what_to_use(
    db: TestDatabase, engine: Engine
) -> None:
    psycopg_async = create_async_engine(url(db, "psycopg"))
    try:
        async with AsyncSession(psycopg_async) as session:
            with pytest.raises(TypeError, match=r"postgresql\+psycopg.*postgresql\+asyncpg://"):
                await enqueue_async(session, "t", schema=db.schema)
    finally:
        await psycopg_async.dispose()


# --- the leader wakes on commit ------------------------------------------------------------


def recording_app(ran: list[int]) -> App:
    app = App()

    @app.executor("t.wake")
    async def wake(job: Job) -> None:
        ran.append(job.id)

    return app


async def test_the_leader_runs_a_session_job_on_its_commit(
    engine: Engine, db: TestDatabase, start_runtime: StartRuntime
) -> None:
    # The poll tick is a minute away: only the insert's NOTIFY, sent at commit, can
    # wake the leader within the test's timeout.
    ran: list[int] = []
    await leading([await start_runtime(recording_app(ran), poll_interval="60")])
    with Session(engine) as session, session.begin():
        warm_up = enqueue(session, "t.wake", schema=db.schema)
    await eventually(lambda: asyncio.sleep(0, ran), timeout=15, what="the warm-up job to run")

    # The session's calls run in a thread, so the leader's event loop goes on meanwhile.
    session = Session(engine)
    session.begin()
    job = await asyncio.to_thread(enqueue, session, "t.wake", schema=db.schema)
    status = await asyncio.to_thread(
        session.scalar, text(f"SELECT status FROM {db.jobs} WHERE id = :id"), {"id": job.id}
    )
    assert (status, ran) == ("pending", [warm_up.id]), "a job ran before its commit"
    await asyncio.to_thread(session.commit)
    session.close()
    await eventually(
        lambda: asyncio.sleep(0, job.id in ran),
        timeout=15,
        what="the committed job to run, woken by its NOTIFY (the poll is a minute away)",
    )


async def test_the_leader_runs_an_async_session_job_on_its_commit(
    async_engine: AsyncEngine, db: TestDatabase, start_runtime: StartRuntime
) -> None:
    ran: list[int] = []
    await leading([await start_runtime(recording_app(ran), poll_interval="60")])
    async with AsyncSession(async_engine) as session:
        warm_up = await enqueue_async(session, "t.wake", schema=db.schema)
        await session.commit()
    await eventually(lambda: asyncio.sleep(0, ran), timeout=15, what="the warm-up job to run")

    async with AsyncSession(async_engine) as session:
        job = await enqueue_async(session, "t.wake", schema=db.schema)
        status = await session.scalar(
            text(f"SELECT status FROM {db.jobs} WHERE id = :id"), {"id": job.id}
        )
        assert (status, ran) == ("pending", [warm_up.id]), "ran before its commit"
        await session.commit()
    await eventually(
        lambda: asyncio.sleep(0, job.id in ran),
        timeout=15,
        what="the committed job to run, woken by its NOTIFY (the poll is a minute away)",
    )


# --- the README's examples -----------------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_examples() -> list[str]:
    """The Python blocks of the README's "SQLAlchemy" subsection."""
    section = README.read_text(encoding="utf-8").split("\n### SQLAlchemy\n", 1)[1]
    return FENCE.findall(section.split("\n## ", 1)[0].split("\n### ", 1)[0])


def as_in_this_test(code: str, db: TestDatabase) -> str:
    """The example with this test's database and schema."""
    code, urls = re.subn(
        r'"postgresql\+(psycopg|asyncpg)://postgres@127\.0\.0\.1:5432/app"',
        lambda m: f"{url(db, m[1])!r}, connect_args={connect_args(db, m[1])!r}",
        code,
    )
    code, calls = re.subn(
        r"(enqueue(?:_async)?\(session, .*)\)$", rf"\1, schema={db.schema!r})", code, flags=re.M
    )
    assert (urls, calls) == (1, 1), "the README example changed: update this test"
    return code


async def test_the_readme_examples_enqueue_in_the_session(engine: Engine, db: TestDatabase) -> None:
    sync_example, async_example = readme_examples()
    await asyncio.to_thread(exec, as_in_this_test(sync_example, db), {"__name__": "readme"})
    # asyncio.run() in the example needs a thread without a running loop.
    await asyncio.to_thread(exec, as_in_this_test(async_example, db), {"__name__": "readme"})
    rows = await asyncio.to_thread(committed, db)
    assert [(row["type"], row["payload"]) for row in rows] == [
        ("order.ship", {"order": 9}),
        ("order.ship", {"order": 10}),
    ]
    with psycopg.connect(db.dsn) as conn:
        orders = conn.execute(f'SELECT id FROM "{db.schema}".orders ORDER BY id').fetchall()
    assert orders == [(9,), (10,)]
