"""dispatcher.contrib.django against a real Postgres: a job enqueued on Django's
connection commits and rolls back with ``transaction.atomic()`` (and its savepoints),
and its commit wakes the leader.

Django is configured here, once per process, from the test server's DSN: no project
needed. Its connections are per thread, and each test has a schema of its own, so
every test closes the connections it opened.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import psycopg
import pytest
from django.conf import settings
from django.db import DatabaseError, connection, connections, transaction
from psycopg.conninfo import conninfo_to_dict

from dispatcher import InvalidJob, JobStatus, QueueFull
from dispatcher.contrib.django import enqueue, enqueue_graph, enqueue_many
from dispatcher.core.app import App
from dispatcher.services.job import Job
from tests.support.database import TestDatabase
from tests.support.leadership import leading
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually

_configured = threading.Lock()


def configure_django(dsn: str) -> None:
    """Point Django's ``default`` database at the test server (once per process; the
    server is the same for every test of the session). ``other`` is SQLite."""
    with _configured:
        if settings.configured:
            return
        params: dict[str, Any] = dict(conninfo_to_dict(dsn))
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": params.pop("dbname", ""),
            "USER": params.pop("user", ""),
            "PASSWORD": params.pop("password", ""),
            "HOST": params.pop("host", ""),
            "PORT": str(params.pop("port", "")),
            "OPTIONS": params,
        }
        settings.configure(
            DATABASES={
                "default": database,
                "other": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
            },
            USE_TZ=True,
            INSTALLED_APPS=[],
        )
        django.setup()


def use_schema(schema: str) -> None:
    """This thread's Django connection with ``schema`` first on its search_path (for
    the business table ``orders``); close it when done (:func:`close_connections`)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('search_path', %s, false)", [schema])


def close_connections() -> None:
    for conn in connections.all(initialized_only=True):
        conn.close()


@pytest.fixture
def django_db(db: TestDatabase) -> Iterator[TestDatabase]:
    """Django on the test's schema, with a business table ``orders``."""
    configure_django(db.dsn)
    with psycopg.connect(db.dsn) as conn:
        conn.execute(f'CREATE TABLE "{db.schema}".orders (id int PRIMARY KEY)')
    use_schema(db.schema)
    yield db
    close_connections()


def committed(db: TestDatabase, where: str = "true") -> list[dict[str, Any]]:
    """Job rows another session can see: committed ones only."""
    with psycopg.connect(db.dsn, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(f"SELECT * FROM {db.jobs} WHERE {where} ORDER BY id").fetchall()


def insert_order(order_id: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO orders (id) VALUES (%s)", [order_id])


def test_atomic_commit_keeps_the_job_with_the_business_write(django_db: TestDatabase) -> None:
    db = django_db
    with transaction.atomic():
        insert_order(1)
        job = enqueue("order.ship", {"order": 1}, schema=db.schema, priority=-2)
        assert job.status is JobStatus.PENDING and job.priority == -2
        assert committed(db) == [], "visible to others before the block committed"
    [row] = committed(db)
    assert (row["id"], row["payload"]) == (job.id, {"order": 1})


def test_atomic_rollback_drops_the_job_even_as_its_first_statement(
    django_db: TestDatabase,
) -> None:
    db = django_db
    with pytest.raises(RuntimeError, match="business failure"), transaction.atomic():
        enqueue("order.ship", {"order": 1}, schema=db.schema)
        enqueue_many("order.ship", [{"order": 2}, {"order": 3}], schema=db.schema)
        insert_order(1)
        raise RuntimeError("business failure")
    assert committed(db) == []
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM orders")
        assert cursor.fetchone() == (0,)


def test_a_nested_atomic_rollback_drops_only_its_jobs(django_db: TestDatabase) -> None:
    db = django_db
    with transaction.atomic():
        kept = enqueue("t", {"n": 1}, schema=db.schema)
        with pytest.raises(RuntimeError), transaction.atomic():  # a savepoint
            enqueue("t", {"n": 2}, schema=db.schema)
            enqueue_many("t", [{"n": 3}], schema=db.schema)
            raise RuntimeError("undo the savepoint")
        sid = transaction.savepoint()
        enqueue("t", {"n": 4}, schema=db.schema)
        transaction.savepoint_rollback(sid)
    assert [row["id"] for row in committed(db)] == [kept.id]


def test_outside_atomic_autocommit_applies(django_db: TestDatabase) -> None:
    db = django_db
    job = enqueue("t", schema=db.schema)
    ids = enqueue_many("t", [{}, {}], schema=db.schema, priority=3)
    assert [row["id"] for row in committed(db)] == [job.id, *ids]


def test_enqueue_many_and_graph_commit_with_the_block(django_db: TestDatabase) -> None:
    db = django_db
    with transaction.atomic():
        lean = enqueue_many("t.bulk", [{"n": n} for n in range(5)], schema=db.schema)
        keyed = enqueue_many("t.keyed", [{}, {}], schema=db.schema, unique_keys=["k", "k"])
        graph = enqueue_graph(
            {"fetch": {"type": "g.fetch"}, "resize": {"type": "g.resize", "depends_on": ["fetch"]}},
            schema=db.schema,
        )
    rows = {row["id"]: row for row in committed(db)}
    assert [rows[i]["payload"] for i in lean] == [{"n": n} for n in range(5)]
    assert keyed[0] == keyed[1]
    assert rows[graph["resize"]]["depends_on"] == [graph["fetch"]]


# JSON values that a driver's jsonb decoding could take for JSON text, or mangle.
PAYLOADS: list[Any] = ["hello", "42", "", 42, 1.5, True, [1, "x"], {"a": {"b": None}}, "é ✓"]


def test_payloads_and_rows_round_trip_through_djangos_connection(
    django_db: TestDatabase,
) -> None:
    # Django's psycopg connection binds client-side (ClientCursor), loads jsonb as text
    # and timestamptz with its own time zone: none of it may change a job's row.
    db = django_db
    with transaction.atomic():
        jobs = [enqueue("t", payload, schema=db.schema) for payload in PAYLOADS]
        unique = enqueue("t", "x", schema=db.schema, unique_key="k", cache_ttl=60)
        again = enqueue("t", "y", schema=db.schema, unique_key="k")
        waiting = enqueue("t", schema=db.schema, depends_on=[jobs[0].id, unique.id])
    assert [job.payload for job in jobs] == PAYLOADS
    assert [row["payload"] for row in committed(db)][: len(PAYLOADS)] == PAYLOADS
    assert all(job.created_at.tzinfo is not None for job in jobs)
    assert (again.id, again.duplicate) == (unique.id, True)
    assert (waiting.status, waiting.depends_on) == (JobStatus.WAITING, [jobs[0].id, unique.id])


def test_refusals_raise_the_clients_errors(django_db: TestDatabase) -> None:
    db = django_db
    with psycopg.connect(db.dsn, autocommit=True) as admin:
        admin.execute(
            f'INSERT INTO "{db.schema}".job_types (type, max_pending, accepting, pending) '
            "VALUES ('t.full', 1, false, 1)"
        )
    with transaction.atomic():
        insert_order(1)
        # Refused before the database, or without a failed statement: the block goes on.
        with pytest.raises(InvalidJob, match="max_attempts must be 1 to 10000"):
            enqueue("t", max_attempts=0, schema=db.schema)
        with pytest.raises(QueueFull, match=r"'t\.full' queue is full"):
            enqueue("t.full", schema=db.schema)
        # Refused by the database: only a nested block (a savepoint) lets it go on.
        with (
            pytest.raises(InvalidJob, match="depends_on names jobs that do not exist: 999999"),
            transaction.atomic(),
        ):
            enqueue("t", depends_on=[999_999], schema=db.schema)
        kept = enqueue("t", {"after": "refusals"}, schema=db.schema)
    assert [row["id"] for row in committed(db)] == [kept.id]


def test_a_broken_atomic_block_is_refused_like_djangos_own_queries(
    django_db: TestDatabase,
) -> None:
    db = django_db
    # An error left a block without a savepoint of its own: Django marks the whole
    # transaction for rollback and refuses its own queries until then; so do we.
    with transaction.atomic():
        with pytest.raises(DatabaseError), transaction.atomic(savepoint=False):
            insert_order(1)
            insert_order(1)  # duplicate key
        with pytest.raises(transaction.TransactionManagementError, match="atomic"):
            enqueue("t", schema=db.schema)
    assert committed(db) == []


def test_other_backends_are_refused_with_what_to_use(django_db: TestDatabase) -> None:
    with pytest.raises(
        TypeError, match=r"database 'other' .*sqlite.*django\.db\.backends\.postgresql"
    ):
        enqueue("t", using="other")


# --- the leader wakes on commit ------------------------------------------------------------


async def test_the_leader_runs_an_atomic_job_on_its_commit(
    django_db: TestDatabase, start_runtime: StartRuntime
) -> None:
    # The poll tick is a minute away: only the insert's NOTIFY, sent at commit, can
    # wake the leader within the test's timeout.
    db = django_db
    ran: list[int] = []
    app = App()

    @app.executor("t.wake")
    async def wake(job: Job) -> None:
        ran.append(job.id)

    await leading([await start_runtime(app, poll_interval="60")])
    warm_up = await asyncio.to_thread(in_thread, lambda: enqueue("t.wake", schema=db.schema))
    await eventually(lambda: asyncio.sleep(0, ran), timeout=15, what="the warm-up job to run")

    # Django's connections are per thread: one thread holds the atomic() block open
    # until told to commit, while the leader's event loop goes on.
    enqueued: list[tuple[int, str]] = []
    held, release = threading.Event(), threading.Event()

    def producer() -> None:
        with transaction.atomic():
            job = enqueue("t.wake", schema=db.schema)
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT status FROM {db.jobs} WHERE id = %s", [job.id])
                (status,) = cursor.fetchone()
            enqueued.append((job.id, status))
            held.set()
            assert release.wait(timeout=30), "the test never released the transaction"

    committing = asyncio.create_task(asyncio.to_thread(in_thread, producer))
    assert await asyncio.to_thread(held.wait, 30), "the producer thread never enqueued"
    [(job_id, status)] = enqueued
    assert (status, ran) == ("pending", [warm_up.id]), "a job ran before its commit"
    release.set()
    await committing
    await eventually(
        lambda: asyncio.sleep(0, job_id in ran),
        timeout=15,
        what="the committed job to run, woken by its NOTIFY (the poll is a minute away)",
    )


def in_thread(work: Any) -> Any:
    """Run ``work`` on this thread's own Django connection, then close it."""
    try:
        return work()
    finally:
        close_connections()


# --- the README's example ------------------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_the_readme_example_enqueues_in_the_atomic_block(django_db: TestDatabase) -> None:
    db = django_db
    section = README.read_text(encoding="utf-8").split("\n### Django\n", 1)[1]
    [example] = FENCE.findall(section.split("\n## ", 1)[0])
    # Django's settings hold the database; only the schema is this test's.
    example, calls = re.subn(
        r"(enqueue\(.*)\)$", rf"\1, schema={db.schema!r})", example, flags=re.M
    )
    assert calls == 1, "the README example changed: update this test"
    exec(example, {"__name__": "readme"})
    assert [(row["type"], row["payload"]) for row in committed(db)] == [
        ("order.ship", {"order": 11})
    ]
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM orders")
        assert cursor.fetchall() == [(11,)]
