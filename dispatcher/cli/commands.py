"""The ``dispatcher`` commands, one function each: ``cmd_<name>(settings, args)``
returns the exit code (0 success, 1 the operation failed)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
from collections.abc import Callable
from pathlib import Path

import asyncpg

from dispatcher.cli.output import print_json, say, short, show_job, status_json, table, when
from dispatcher.core.app import load_app
from dispatcher.core.config import Settings
from dispatcher.core.log import configure_logging
from dispatcher.core.records import JobStatus, options_of
from dispatcher.database.migrate import migrate, migrate_at
from dispatcher.database.roles import RoleNames, roles_sql
from dispatcher.producers.client import Client
from dispatcher.runtime import Runtime
from dispatcher.services.replicas import incarnation_id

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input: exit 2."""


def resolve_dsn(
    settings: Settings, say: Callable[[str], None], *, auto_migrate: bool = True
) -> str:
    """The configured DSN, or the embedded server's: started and migrated if needed (it
    is a development database; a configured one is migrated only by `migrate`)."""
    if settings.dsn:
        return settings.dsn
    from dispatcher.database.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(Path(settings.home))
    dsn = server.ensure_running()
    say(f"using the embedded PostgreSQL under {server.home} (psql: {server.psql_command()})")
    if auto_migrate:
        asyncio.run(_migrate_quietly(dsn, settings.schema))
    return dsn


async def _migrate_quietly(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, schema, report=say)
    finally:
        await conn.close()


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    # The migration lock needs a session: the election DSN bypasses a transaction pooler.
    dsn = (settings.dsn and settings.election_dsn) or resolve_dsn(settings, say, auto_migrate=False)
    if not asyncio.run(migrate_at(dsn, settings.schema, report=print)):
        print(f"schema {settings.schema!r} is up to date")
    return EXIT_OK


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    app = load_app(args.app)
    owner_id = incarnation_id(settings.replica_id)
    configure_logging(settings.log_format, settings.log_level, replica=owner_id)
    dsn = resolve_dsn(settings, say, auto_migrate=False)
    runtime = Runtime(
        app,
        settings,
        dsn=dsn,
        migrate_schema=args.migrate,
        owner_id=owner_id,
        serve_http=True,
        insecure_no_auth=args.insecure_no_auth,
        # This process is the replica's own: ending it is how a plain def executor's
        # thread that ignores cancellation is stopped (see dispatcher/runtime.py).
        exit_process=os._exit,
    )
    tune_garbage_collector(settings.gc_threshold)
    asyncio.run(runtime.run_until_signalled())
    return EXIT_OK


def tune_garbage_collector(threshold: int) -> None:
    """Collect the youngest generation every ``threshold`` net allocations, and never
    again traverse what is loaded by now (the app, FastAPI, asyncpg: gc.freeze).

    A replica allocates a few dozen objects per job (a task, its coroutine, the record,
    the outcome) that die young, almost all by reference counting. At Python's default
    of 700 the collector ran every few dozen jobs, and its older generations walked
    the whole heap: about a sixth of a replica's burn-down throughput at 1,000 slots
    (docs/performance.md). Cyclic garbage now waits a little longer to be found, a few
    MiB at most."""
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(threshold, middle, oldest)
    gc.freeze()


def _client(settings: Settings) -> Client:
    dsn = resolve_dsn(settings, say)
    return Client(
        dsn,
        schema=settings.schema,
        min_size=1,
        max_size=1,
        timeout=10,
        prepared_statements=settings.prepared_statements,
    )


def cmd_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload) if args.payload is not None else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--payload is not valid JSON: {exc}") from None
    run_at: dt.datetime | dt.timedelta | None = None
    if args.run_at and args.delay is not None:
        raise UsageError("give --run-at or --delay, not both")
    if args.run_at:
        try:
            run_at = dt.datetime.fromisoformat(args.run_at)
        except ValueError:
            raise UsageError(f"--run-at {args.run_at!r} is not an ISO 8601 time") from None
    elif args.delay is not None:
        run_at = dt.timedelta(seconds=args.delay)
    with _client(settings) as client:
        job = client.enqueue(args.type, payload, **options_of(args, run_at=run_at))
    if args.json:
        print_json(job.to_json())
    elif job.cached:
        print(f"job {job.id} ({job.type}) completed at {when(job.finished_at)}; its result: "
              f"{json.dumps(job.result)}")  # fmt: skip
    elif job.duplicate:
        print(f"job {job.id} ({job.type}) is already {job.status.value} with that unique key")
    elif job.status is JobStatus.WAITING:
        waited = ", ".join(map(str, job.open_dependencies or ()))
        print(f"enqueued job {job.id} ({job.type}), waiting for jobs {waited}")
    elif job.status.finished:
        print(f"enqueued job {job.id} ({job.type}), {job.status.value} at once: {job.last_error}")
    else:
        print(f"enqueued job {job.id} ({job.type}), run_at {when(job.run_at)}")
    return EXIT_OK


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    with _client(settings) as client:
        if args.jobs_command == "list":
            jobs = client.list_jobs(
                status=args.status, type=args.type, before_id=args.before_id, limit=args.limit
            )
            if args.json:
                print_json([job.to_json() for job in jobs])
            elif not jobs:
                print("no jobs")
            else:
                print(
                    table(
                        ["ID", "TYPE", "STATUS", "ATTEMPTS", "PRIO", "RUN_AT", "LAST_ERROR"],
                        [
                            [
                                j.id,
                                j.type,
                                j.status.value,
                                f"{j.attempts}/{j.max_attempts or '-'}",
                                j.priority,
                                when(j.run_at),
                                short(j.last_error),
                            ]
                            for j in jobs
                        ],
                    )
                )
            return EXIT_OK
        if args.jobs_command == "retry" and args.id is None:
            count = client.retry_many(status=args.status, type=args.type)
            if args.json:
                print_json({"retried": count})
            else:
                print(f"{count} {args.status} job(s){' of type ' + args.type if args.type else ''}"
                      " back to pending")  # fmt: skip
            return EXIT_OK
        if args.id is None:
            raise UsageError(f"jobs {args.jobs_command} needs a job ID")
        action = {"show": client.get, "cancel": client.cancel, "retry": client.retry}
        job = action[args.jobs_command](args.id)
    show_job(job, args.json)
    return EXIT_OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    with _client(settings) as client:
        status = client.cluster_status(alive_within=settings.alive_within)
    if args.json:
        print_json(status_json(status))
        return EXIT_OK
    leader = status.leader
    if leader and leader["lease_current"]:
        print(f"leader: {leader['holder']} (term {leader['term']}, lease until "
              f"{when(leader['lease_until'])})")  # fmt: skip
    else:
        print("leader: none")
    print()
    replicas = [
        [r["id"], r["role"], "yes" if r["alive"] else "no", r["host"], r["version"],
         when(r["last_seen"])]
        for r in status.replicas
    ]  # fmt: skip
    print(table(["REPLICA", "ROLE", "ALIVE", "HOST", "VERSION", "LAST_SEEN"], replicas)
          if replicas else "replicas: none registered")  # fmt: skip
    print()
    queues = [
        [t, q.ready, q.scheduled, q.processing, f"{q.oldest_ready_age:.1f}s"]
        for t, q in status.queues.items()
    ]
    print(table(["TYPE", "READY", "SCHEDULED", "PROCESSING", "OLDEST_READY"], queues)
          if queues else "queues: empty")  # fmt: skip
    paused = [t.type for t in status.types if t.paused]
    full = [t.type for t in status.types if not t.accepting]
    if paused or full:
        print()
        print(f"paused: {', '.join(paused) or 'none'}; full (max_pending): "
              f"{', '.join(full) or 'none'}")  # fmt: skip
    if status.schedules:
        print()
        print(table(["SCHEDULE", "CRON", "TIMEZONE", "TYPE", "NEXT_RUN"],
                     [[r["name"], r["cron"], r["timezone"], r["type"], when(r["next_run_at"])]
                      for r in status.schedules]))  # fmt: skip
    return EXIT_OK


def cmd_types(settings: Settings, args: argparse.Namespace) -> int:
    with _client(settings) as client:
        if args.command == "types":
            types = client.job_types()
        else:
            types = [(client.pause if args.command == "pause" else client.resume)(args.type)]
    if args.json:
        print_json([vars(t) for t in types])
    elif not types:
        print("no type has cluster-wide controls yet")
    else:
        print(table(["TYPE", "PAUSED", "MAX_PENDING", "ACCEPTING", "PENDING"],
                     [[t.type, "yes" if t.paused else "no", t.max_pending or "-",
                       "yes" if t.accepting else "no", t.pending if t.pending is not None else "-"]
                      for t in types]))  # fmt: skip
    return EXIT_OK


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    masked = settings.masked()
    if args.json:
        print_json(masked)
    else:
        for key, value in masked.items():
            print(f"{key} = {'' if value is None else value}")
    return EXIT_OK


def cmd_roles(settings: Settings, args: argparse.Namespace) -> int:
    names = RoleNames(runtime=args.runtime, producer=args.producer, readonly=args.readonly)
    print(roles_sql(settings.schema, names), end="")
    return EXIT_OK


def cmd_embedded(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.database.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(Path(settings.home))
    running = server.is_running()
    if args.embedded_command == "stop":
        if running:
            server.stop()
            print(f"stopped the embedded PostgreSQL under {server.home}")
        else:
            print(f"the embedded PostgreSQL under {server.home} is not running")
        return EXIT_OK
    if running:
        print(f"running under {server.home}: {server.dsn()}\npsql: {server.psql_command()}")
    else:
        print(f"not running (home {server.home})")
    return EXIT_OK


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from dispatcher.cli.devrun import run_dev

    return run_dev(settings, app=args.app, replicas=args.replicas)


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "enqueue": cmd_enqueue,
    "jobs": cmd_jobs,
    "status": cmd_status,
    "pause": cmd_types,
    "resume": cmd_types,
    "types": cmd_types,
    "config": cmd_config,
    "roles": cmd_roles,
    "embedded": cmd_embedded,
    "dev": cmd_dev,
}
