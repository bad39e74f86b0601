"""Least privilege, as users run it: the roles `dispatcher roles` prints are all a
replica, both producer clients and a reader need, and a replica whose role lacks a
privilege says so in /readyz instead of looping on errors while it claims nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import psycopg
import pytest

from dispatcher import AsyncClient, Client
from dispatcher.core.app import App
from dispatcher.core.config import load_settings
from dispatcher.database.roles import RoleNames, roles_sql
from dispatcher.runtime import Runtime
from dispatcher.services.job import Job
from tests.support.database import TestDatabase
from tests.support.runtimes import FAST_SETTINGS
from tests.support.waiting import eventually


def dsn_as(dsn: str, user: str) -> str:
    """``dsn`` logging in as ``user`` (the test servers trust every local login)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture
async def roles(db: TestDatabase) -> AsyncIterator[RoleNames]:
    """The script run as printed, for roles of this test's own (roles are global)."""
    suffix = uuid.uuid4().hex[:8]
    names = RoleNames(runtime=f"rt_{suffix}", producer=f"pr_{suffix}", readonly=f"ro_{suffix}")
    admin = await db.connect()
    try:
        await admin.execute(roles_sql(db.schema, names))
        await admin.execute(roles_sql(db.schema, names))  # running it again is harmless
        yield names
    finally:
        for role in (names.runtime, names.producer, names.readonly):
            await admin.execute(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')
        await admin.close()


def role_app(ran: list[int]) -> App:
    app = App(concurrency=20)

    # max_pending: the leader counts queues in job_types; the periodic schedule writes
    # schedules and schedule_runs.
    @app.executor("r.work", max_pending=1000)
    async def work(job: Job) -> None:
        await job.dependency_results()  # jobs with dependencies (0013) read them
        ran.append(job.id)

    @app.periodic("* * * * * *", type="r.tick", name="tick", backfill=2)
    async def tick(job: Job) -> None:
        ran.append(job.id)

    return app


async def start_as(db: TestDatabase, role: str, app: App) -> Runtime:
    values = {**FAST_SETTINGS, "schema": db.schema, "retention_completed": "1s"}
    settings, _ = load_settings(env={f"DISPATCHER_{k.upper()}": v for k, v in values.items()})
    runtime = Runtime(app, settings, dsn=dsn_as(db.dsn, role))
    await runtime.start()
    return runtime


async def readyz(runtime: Runtime) -> httpx.Response:
    transport = httpx.ASGITransport(app=runtime.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as http:
        return await http.get("/readyz")


async def test_the_printed_roles_run_a_replica_both_producers_and_a_reader(
    db: TestDatabase, roles: RoleNames
) -> None:
    ran: list[int] = []
    runtime = await start_as(db, roles.runtime, role_app(ran))
    producer_dsn = dsn_as(db.dsn, roles.producer)
    try:
        assert (await readyz(runtime)).json() == {"status": "ready"}
        with Client(producer_dsn, schema=db.schema) as client:
            sync_ids = [client.enqueue("r.work", {"n": n}).id for n in range(5)]
            sync_ids += client.enqueue_many("r.work", [{"n": n} for n in range(5)])
            # Dependencies: settled by SECURITY DEFINER triggers, nothing more to grant.
            graph = client.enqueue_graph(
                {"a": {"type": "r.work"}, "b": {"type": "r.work", "depends_on": ["a"]}}
            )
            sync_ids += [*graph.values(), client.enqueue("r.work", depends_on=[graph["b"]]).id]
            assert client.get(sync_ids[0]).type == "r.work"
            # ... which only triggers may call: with the owner's rights, a forged row
            # would change any job.
            with (
                psycopg.connect(producer_dsn) as forger,
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="settle_dependencies"),
            ):
                forger.execute(
                    f'SELECT "{db.schema}".settle_dependencies(j, true) '
                    f'FROM "{db.schema}".jobs j LIMIT 1'
                )
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="table jobs"):
                client.cancel(sync_ids[0])
        producer = await AsyncClient.connect(producer_dsn, schema=db.schema)
        try:
            async_ids = [(await producer.enqueue("r.work", {"n": n})).id for n in range(5)]
            async_ids += await producer.enqueue_many("r.work", [{"n": n} for n in range(5)])
            first = await producer.enqueue("r.work")
            async_ids += [first.id, (await producer.enqueue("r.work", depends_on=[first.id])).id]
            assert (await producer.get(async_ids[0])).type == "r.work"
        finally:
            await producer.close()
        enqueued = set(sync_ids + async_ids)
        await eventually(
            lambda: asyncio.sleep(0, enqueued <= set(ran)), timeout=20, what="every job to run"
        )
        admin = await db.connect()
        try:

            async def ticked_and_pruned() -> bool:
                ticks = await admin.fetchval(
                    f'SELECT count(*) FROM "{db.schema}".schedule_runs WHERE schedule = $1', "tick"
                )
                left = await admin.fetchval(
                    f"SELECT count(*) FROM {db.jobs} WHERE id = ANY($1)", list(enqueued)
                )
                return ticks > 0 and left == 0

            await eventually(
                ticked_and_pruned,
                timeout=20,
                what="a periodic tick, and the completed jobs pruned by the runtime role",
            )
        finally:
            await admin.close()
        reader = await asyncpg.connect(dsn_as(db.dsn, roles.readonly))
        try:
            assert await reader.fetchval(f'SELECT count(*) FROM "{db.schema}".leader') == 1
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute(f"INSERT INTO {db.jobs} (type) VALUES ('r.work')")
        finally:
            await reader.close()
    finally:
        await runtime.stop()


async def test_a_replica_whose_role_lacks_a_privilege_is_not_ready(
    db: TestDatabase, roles: RoleNames
) -> None:
    # The grants once documented gave nothing on job_types: the replica looped on
    # claim_prepare_failed with no job run while /readyz said ready.
    admin = await db.connect()
    try:
        await admin.execute(f'REVOKE SELECT ON "{db.schema}".job_types FROM "{roles.runtime}"')
    finally:
        await admin.close()
    runtime = await start_as(db, roles.runtime, role_app([]))
    try:
        response = await readyz(runtime)
        assert response.status_code == 503
        assert "lacks SELECT on job_types" in response.json()["detail"]
        await eventually(
            lambda: asyncio.sleep(0, runtime.claiming_problem()),
            timeout=10,
            what="the claim loop to report that it cannot start",
        )
        assert "permission denied for table job_types" in (runtime.claiming_problem() or "")
    finally:
        await runtime.stop()
