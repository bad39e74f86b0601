"""Through a real PgBouncer in transaction mode (issue 13, "PgBouncer, any version").

Debian 12's PgBouncer 1.18 cannot carry a named prepared statement from one transaction
to the next and refuses startup parameters it does not know. With
``prepared_statements=False`` a replica (its pool through PgBouncer, its election
connection direct) and both producers burn a few thousand jobs, each run exactly once;
with the defaults the runtime is refused at start with an error naming the setting, and
named statements break as soon as PgBouncer hands a client another server connection.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest

from dispatcher import AsyncClient, Client
from dispatcher.core.app import App
from dispatcher.core.config import load_settings
from dispatcher.core.errors import DispatcherError, MigrationError
from dispatcher.core.log import configure_logging
from dispatcher.database.migrate import migrate
from dispatcher.runtime import Runtime
from dispatcher.services.job import Job
from tests.support.database import PostgresServer, TestDatabase
from tests.support.pgbouncer import PgBouncer, running_pgbouncer
from tests.support.runtimes import FAST_SETTINGS
from tests.support.waiting import eventually

TOKEN = "pgbouncer-test-token"
BATCHES, BATCH_SIZE, SINGLES = 12, 100, 300  # per producer: 1,500 jobs


@pytest.fixture
def pgbouncer(postgres: PostgresServer) -> Iterator[PgBouncer]:
    with running_pgbouncer(postgres.dsn, pool_mode="transaction") as bouncer:
        yield bouncer


def settings_for(db: TestDatabase, **overrides: Any) -> Any:
    values = {**FAST_SETTINGS, "schema": db.schema, "api_token": TOKEN, **overrides}
    settings, _ = load_settings(env={f"DISPATCHER_{k.upper()}": str(v) for k, v in values.items()})
    return settings


@pytest.fixture
async def through_pgbouncer() -> AsyncIterator[list[Runtime]]:
    """Runtimes a test starts, stopped at teardown."""
    started: list[Runtime] = []
    yield started
    for runtime in started:
        await runtime.stop()


async def start_replica(
    app: App, db: TestDatabase, bouncer: PgBouncer, started: list[Runtime], **overrides: Any
) -> Runtime:
    """A replica whose pool goes through PgBouncer and whose election connection (a
    session advisory lock) goes straight to Postgres."""
    # The default stale_after, not the fast one: nothing here stops a replica, and on a
    # loaded machine six server connections shared with the producers kept a job
    # heartbeat waiting 1.8 s, past the fast setting's give-up (1.5 s): the replica
    # rightly gave its jobs up and they ran a second attempt.
    settings = settings_for(
        db, prepared_statements="false", replica_id="pgb",
        **{"stale_after": "30", "election_dsn": db.dsn, **overrides},
    )  # fmt: skip
    runtime = Runtime(app, settings, dsn=bouncer.dsn)
    await runtime.start()
    started.append(runtime)
    return runtime


async def wait_for_leader(runtime: Runtime) -> None:
    async def leading() -> bool:
        return runtime.elector.is_leader()

    await eventually(leading, timeout=10, what="the replica to lead")


async def status(runtime: Runtime) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=runtime.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as http:
        response = await http.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_finished(db: TestDatabase, total: int, timeout: float) -> None:
    conn = await db.connect()
    try:

        async def finished() -> bool:
            done = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE status NOT IN ('pending', 'processing')"
            )
            return bool(done == total)

        await eventually(finished, timeout=timeout, what=f"{total} jobs to finish", every=0.2)
    finally:
        await conn.close()


async def outcomes(db: TestDatabase) -> dict[tuple[str, int], int]:
    conn = await db.connect()
    try:
        rows = await conn.fetch(
            f"SELECT status, attempts, count(*) AS n FROM {db.jobs} GROUP BY status, attempts"
        )
    finally:
        await conn.close()
    return {(row["status"], row["attempts"]): row["n"] for row in rows}


def counting_app() -> tuple[App, Counter[int]]:
    """Executors that count each run of each job (from the loop and from threads)."""
    runs: Counter[int] = Counter()
    lock = threading.Lock()
    app = App(concurrency=100)

    @app.executor("pgb.async")
    async def run_async(job: Job) -> dict[str, int]:
        with lock:
            runs[job.id] += 1
        return {"id": job.id}

    @app.executor("pgb.sync")
    def run_sync(job: Job) -> None:
        with lock:
            runs[job.id] += 1

    @app.executor("pgb.wait")
    async def run_until_cancelled(job: Job) -> None:
        await asyncio.sleep(60)

    return app, runs


def produce_sync(bouncer: PgBouncer, schema: str) -> list[int]:
    """The sync producer: batches with COPY, then single inserts (the same statement
    over and over: psycopg would prepare it by default)."""
    ids: list[int] = []
    with Client(bouncer.dsn, schema=schema, prepared_statements=False, max_size=4) as client:
        for batch in range(BATCHES):
            payloads = [{"batch": batch, "n": n} for n in range(BATCH_SIZE)]
            ids += client.enqueue_many("pgb.sync", payloads)
        for n in range(SINGLES):
            ids.append(client.enqueue("pgb.sync", {"single": n}).id)
        assert client.get(ids[-1]).id == ids[-1]
    return ids


async def produce_async(bouncer: PgBouncer, schema: str) -> list[int]:
    """The async producer: batches with binary COPY, then single inserts, 20 at once."""
    ids: list[int] = []
    client = await AsyncClient.connect(
        bouncer.dsn, schema=schema, prepared_statements=False, max_size=4
    )
    try:
        for batch in range(BATCHES):
            payloads = [{"batch": batch, "n": n} for n in range(BATCH_SIZE)]
            ids += await client.enqueue_many("pgb.async", payloads)
        for start in range(0, SINGLES, 20):
            jobs = await asyncio.gather(
                *(client.enqueue("pgb.async", {"single": n}) for n in range(start, start + 20))
            )
            ids += [job.id for job in jobs]
        assert (await client.get(ids[-1])).id == ids[-1]
    finally:
        await client.close()
    return ids


# --- with prepared_statements=False ----------------------------------------------------


async def test_a_replica_and_both_producers_through_pgbouncer_run_every_job_once(
    db: TestDatabase, pgbouncer: PgBouncer, through_pgbouncer: list[Runtime]
) -> None:
    app, runs = counting_app()
    runtime = await start_replica(app, db, pgbouncer, through_pgbouncer)
    await wait_for_leader(runtime)

    sync_ids, async_ids = await asyncio.gather(
        asyncio.to_thread(produce_sync, pgbouncer, db.schema),
        produce_async(pgbouncer, db.schema),
    )
    ids = sync_ids + async_ids
    total = 2 * (BATCHES * BATCH_SIZE + SINGLES)
    assert len(set(ids)) == len(ids) == total
    await wait_finished(db, total, timeout=90)

    assert await outcomes(db) == {("completed", 1): total}, pgbouncer.version
    assert set(runs) == set(ids)
    assert [job_id for job_id, count in runs.items() if count != 1] == []
    body = await status(runtime)
    assert (body["listen"], body["prepared_statements"]) == (True, False)
    # Every connection of the pool and both producers logged in through PgBouncer.
    assert pgbouncer.log_tail(10_000).count("login attempt") >= 3, pgbouncer.log_tail()


async def test_poll_only_replica_through_pgbouncer_runs_jobs_and_honours_cancels(
    db: TestDatabase,
    pgbouncer: PgBouncer,
    through_pgbouncer: list[Runtime],
) -> None:
    app, runs = counting_app()
    # The replica's info lines, into a buffer its loggers may keep writing to (conftest
    # keeps warnings and errors only).
    lines, stderr = io.StringIO(), sys.stderr
    sys.stderr = lines
    try:
        configure_logging("json", "info")
        runtime = await start_replica(app, db, pgbouncer, through_pgbouncer, listen="false")
    finally:
        sys.stderr = stderr
        configure_logging("console", "warning")
    said = [json.loads(line) for line in lines.getvalue().splitlines() if line[:1] == "{"]
    assert any(line["event"] == "poll_only_mode" for line in said), said
    await wait_for_leader(runtime)
    session = runtime.notifier.current()
    assert session is not None
    assert await session.fetch("SELECT pg_listening_channels()") == []
    assert (await status(runtime))["listen"] is False

    client = await AsyncClient.connect(pgbouncer.dsn, schema=db.schema, prepared_statements=False)
    try:
        ids = await client.enqueue_many("pgb.async", [{"n": n} for n in range(200)])
        waiting = await client.enqueue("pgb.wait")
        await wait_finished(db, 200, timeout=30)
        assert set(runs) == set(ids)

        async def running() -> bool:
            return (await client.get(waiting.id)).status == "processing"

        await eventually(running, timeout=10, what="the long job to start")
        # No NOTIFY reaches the replica: its job heartbeat reads cancel_requested.
        await client.cancel(waiting.id)

        async def cancelled() -> bool:
            return (await client.get(waiting.id)).status == "cancelled"

        await eventually(cancelled, timeout=10, what="the cancel to be seen by the heartbeat")
    finally:
        await client.close()


# --- with the defaults -------------------------------------------------------------------


async def test_default_settings_are_refused_through_pgbouncer_with_the_fix_named(
    db: TestDatabase, pgbouncer: PgBouncer
) -> None:
    runtime = Runtime(App(), settings_for(db, election_dsn=db.dsn), dsn=pgbouncer.dsn)
    with pytest.raises(DispatcherError) as refused:
        await runtime.start()
    message = str(refused.value)
    assert "unsupported startup parameter: plan_cache_mode" in message
    assert "set DISPATCHER_PREPARED_STATEMENTS=false" in message


@pytest.mark.parametrize("prepared_statements", [True, False])
async def test_async_client_named_statements_break_when_pgbouncer_switches_server(
    db: TestDatabase, pgbouncer: PgBouncer, prepared_statements: bool
) -> None:
    client = await AsyncClient.connect(
        pgbouncer.dsn,
        schema=db.schema,
        min_size=1,
        max_size=1,
        prepared_statements=prepared_statements,
    )
    other = await asyncpg.connect(pgbouncer.dsn, statement_cache_size=0)
    try:
        first = await client.enqueue("pgb.async")
        await client.get(first.id)  # prepared (and cached) by default
        # Another client's transaction takes the only server connection, so PgBouncer
        # gives the next statement of ours a new one, where nothing was prepared.
        async with other.transaction():
            await other.fetchval("SELECT 1")
            if prepared_statements:
                with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
                    await client.get(first.id)
            else:
                assert (await client.get(first.id)).id == first.id
    finally:
        await other.close()
        await client.close()


@pytest.mark.parametrize("prepared_statements", [True, False])
def test_sync_client_prepared_statements_break_when_pgbouncer_switches_server(
    db: TestDatabase, pgbouncer: PgBouncer, prepared_statements: bool
) -> None:
    with Client(
        pgbouncer.dsn,
        schema=db.schema,
        min_size=1,
        max_size=1,
        prepared_statements=prepared_statements,
    ) as client:
        job = client.enqueue("pgb.sync")
        # psycopg prepares a statement run more than prepare_threshold (5) times.
        for _ in range(6):
            client.get(job.id)
        with psycopg.connect(pgbouncer.dsn) as other:
            other.execute("SELECT 1")  # opens a transaction: holds the only server
            if prepared_statements:
                with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                    client.get(job.id)
            else:
                assert client.get(job.id).id == job.id


class _TakesTheServerAfterTheLock:
    """A connection through PgBouncer on which, once the migration lock is taken,
    another client's open transaction holds that server connection: what any busy
    pool does at random, made certain."""

    def __init__(self, conn: asyncpg.Connection, other: asyncpg.Connection) -> None:
        self._conn, self._other = conn, other
        self.holding = False

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        result: str = await self._conn.execute(query, *args, **kwargs)
        if "pg_advisory_lock" in query and not self.holding:
            await self._other.execute("BEGIN")
            await self._other.fetchval("SELECT 1")
            self.holding = True
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_migration_through_a_transaction_pooler_is_reported_as_such(
    pgbouncer: PgBouncer, unmigrated_schema: str
) -> None:
    conn = await asyncpg.connect(pgbouncer.dsn, statement_cache_size=0)
    other = await asyncpg.connect(pgbouncer.dsn, statement_cache_size=0)
    try:
        tricked = _TakesTheServerAfterTheLock(conn, other)
        with pytest.raises(MigrationError, match="set DISPATCHER_ELECTION_DSN"):
            await migrate(tricked, unmigrated_schema)  # type: ignore[arg-type]
        assert tricked.holding
    finally:
        await other.close()
        await conn.close()


# What the replica's connections ask of the server at startup, which PgBouncer 1.18
# refuses unless told to ignore them (docs/operations.md, PgBouncer).
SESSION_STARTUP_PARAMETERS = (
    "tcp_keepalives_idle,tcp_keepalives_interval,tcp_keepalives_count,tcp_user_timeout,"
    "idle_session_timeout,client_connection_check_interval"
)


async def run_one_job(db: TestDatabase, what: str) -> int:
    """Insert one 'pgb.async' job and wait for it to complete; its id."""
    conn = await db.connect()
    try:
        job_id: int = await conn.fetchval(
            f"INSERT INTO {db.jobs} (type) VALUES ('pgb.async') RETURNING id"
        )

        async def completed() -> bool:
            status = await conn.fetchval(f"SELECT status FROM {db.jobs} WHERE id = $1", job_id)
            return bool(status == "completed")

        await eventually(completed, timeout=15, what=what)
    finally:
        await conn.close()
    return job_id


async def test_a_replica_session_behind_a_pooler_records_nothing_and_claims_go_on(
    postgres: PostgresServer, db: TestDatabase, through_pgbouncer: list[Runtime]
) -> None:
    # A session-mode pool ties the session lock to a server connection whose life is
    # the pooler's, not the replica's: its loss would prove nothing.
    with running_pgbouncer(
        postgres.dsn, pool_mode="session", ignored=SESSION_STARTUP_PARAMETERS
    ) as bouncer:
        app, runs = counting_app()
        settings = settings_for(db, election_dsn=bouncer.dsn, replica_id="pooled")
        runtime = Runtime(app, settings, dsn=db.dsn)
        await runtime.start()
        through_pgbouncer.append(runtime)
        session = runtime.session
        assert session is not None
        await eventually(
            lambda: asyncio.sleep(0, session.behind_a_pooler),
            timeout=15,
            what="the session to find the pooler",
        )
        job_id = await run_one_job(db, "the job to run all the same")
        conn = await db.connect()
        try:
            recorded = await conn.fetchval(
                f'SELECT session_pid FROM "{db.schema}".replicas WHERE id = $1', runtime.owner_id
            )
        finally:
            await conn.close()
        assert recorded is None and session.recorded_pid is None
        assert runs[job_id] == 1


async def test_claims_go_on_when_the_replica_session_cannot_connect(
    db: TestDatabase, pgbouncer: PgBouncer, through_pgbouncer: list[Runtime]
) -> None:
    # Worker mode needs no leader; the session DSN through a transaction pooler that
    # refuses its startup parameters never connects. Nothing is recorded, so there
    # is nothing the leader could rescue early: claims go on, on the stale_after path.
    app, runs = counting_app()
    runtime = await start_replica(
        app, db, pgbouncer, through_pgbouncer, election_dsn=pgbouncer.dsn, mode="all"
    )
    job_id = await run_one_job(db, "the job to run without a session")
    assert runtime.session is not None and runtime.session.recorded_pid is None
    assert runs[job_id] == 1
