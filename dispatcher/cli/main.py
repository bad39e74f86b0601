"""The ``dispatcher`` command line.

    dispatcher migrate
    dispatcher run MODULE:APP [--migrate] [--insecure-no-auth]
    dispatcher enqueue TYPE [--payload JSON] [--priority N] [--run-at ISO | --delay S]
    dispatcher jobs list|show|cancel|retry
    dispatcher pause|resume TYPE, dispatcher types
    dispatcher status
    dispatcher config
    dispatcher roles [--runtime NAME] [--producer NAME] [--readonly NAME]
    dispatcher embedded status|stop
    dispatcher dev [--replicas N]          (what `make run` runs)

Human output by default, ``--json`` for scripts. With no DSN configured, commands use
the embedded PostgreSQL under ./.dispatcher (first line on stderr says where).

Exit codes: 0 success; 1 the operation failed (database unreachable, no such job, job
not in a state that allows it, migration refused); 2 usage, configuration or input
error (one line per problem on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

from dispatcher.core.app import load_app
from dispatcher.core.config import Settings, load_settings
from dispatcher.core.errors import (
    ConfigError,
    DispatcherError,
    InvalidArgument,
    InvalidJob,
)
from dispatcher.core.log import configure_logging
from dispatcher.core.records import JobRecord, JobStatus
from dispatcher.database.migrate import migrate, migrate_at
from dispatcher.database.roles import RoleNames, roles_sql
from dispatcher.producers.client import Client
from dispatcher.producers.plans import ClusterStatus
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
        await migrate(conn, schema, report=_stderr)
    finally:
        await conn.close()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _short(value: Any, width: int = 60) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


# --- commands ------------------------------------------------------------------------------


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    # The migration lock needs a session: the election DSN bypasses a transaction pooler.
    dsn = (settings.dsn and settings.election_dsn) or resolve_dsn(
        settings, _stderr, auto_migrate=False
    )
    if not asyncio.run(migrate_at(dsn, settings.schema, report=print)):
        print(f"schema {settings.schema!r} is up to date")
    return EXIT_OK


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    app = load_app(args.app)
    owner_id = incarnation_id(settings.replica_id)
    configure_logging(settings.log_format, settings.log_level, replica=owner_id)
    dsn = resolve_dsn(settings, _stderr, auto_migrate=False)
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
    asyncio.run(runtime.run_until_signalled())
    return EXIT_OK


def _client(settings: Settings) -> Client:
    dsn = resolve_dsn(settings, _stderr)
    return Client(
        dsn,
        schema=settings.schema,
        min_size=1,
        max_size=1,
        timeout=10,
        prepared_statements=settings.prepared_statements,
    )


def _show_job(job: JobRecord, as_json: bool) -> None:
    if as_json:
        _print_json(job.to_json())
        return
    fields = job.to_json()
    errors = fields.pop("errors")
    for key, value in fields.items():
        if key in ("payload", "result", "progress") and value is not None:
            value = json.dumps(value)
        print(f"{key:17} {'' if value is None else value}")
    for error in errors:
        print(f"error #{error['attempt']} at {error['at']}: {error['error']}")


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
        job = client.enqueue(
            args.type,
            payload,
            priority=args.priority,
            run_at=run_at,
            max_attempts=args.max_attempts,
            timeout=args.timeout,
            unique_key=args.unique_key,
            cache_ttl=args.cache_ttl,
        )
    if args.json:
        _print_json(job.to_json())
    elif job.cached:
        print(f"job {job.id} ({job.type}) completed at {_when(job.finished_at)}; its result: "
              f"{json.dumps(job.result)}")  # fmt: skip
    elif job.duplicate:
        print(f"job {job.id} ({job.type}) is already {job.status.value} with that unique key")
    else:
        print(f"enqueued job {job.id} ({job.type}), run_at {_when(job.run_at)}")
    return EXIT_OK


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    with _client(settings) as client:
        if args.jobs_command == "list":
            jobs = client.list_jobs(
                status=args.status, type=args.type, before_id=args.before_id, limit=args.limit
            )
            if args.json:
                _print_json([job.to_json() for job in jobs])
            elif not jobs:
                print("no jobs")
            else:
                print(
                    _table(
                        ["ID", "TYPE", "STATUS", "ATTEMPTS", "PRIO", "RUN_AT", "LAST_ERROR"],
                        [
                            [
                                j.id,
                                j.type,
                                j.status.value,
                                f"{j.attempts}/{j.max_attempts or '-'}",
                                j.priority,
                                _when(j.run_at),
                                _short(j.last_error),
                            ]
                            for j in jobs
                        ],
                    )
                )
            return EXIT_OK
        if args.jobs_command == "retry" and args.id is None:
            count = client.retry_many(status=args.status, type=args.type)
            if args.json:
                _print_json({"retried": count})
            else:
                print(f"{count} {args.status} job(s){' of type ' + args.type if args.type else ''}"
                      " back to pending")  # fmt: skip
            return EXIT_OK
        if args.id is None:
            raise UsageError(f"jobs {args.jobs_command} needs a job ID")
        action = {"show": client.get, "cancel": client.cancel, "retry": client.retry}
        job = action[args.jobs_command](args.id)
    _show_job(job, args.json)
    return EXIT_OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    with _client(settings) as client:
        status = client.cluster_status(alive_within=settings.alive_within)
    if args.json:
        _print_json(_status_json(status))
        return EXIT_OK
    leader = status.leader
    if leader and leader["lease_current"]:
        print(f"leader: {leader['holder']} (term {leader['term']}, lease until "
              f"{_when(leader['lease_until'])})")  # fmt: skip
    else:
        print("leader: none")
    print()
    replicas = [
        [r["id"], r["role"], "yes" if r["alive"] else "no", r["host"], r["version"],
         _when(r["last_seen"])]
        for r in status.replicas
    ]  # fmt: skip
    print(_table(["REPLICA", "ROLE", "ALIVE", "HOST", "VERSION", "LAST_SEEN"], replicas)
          if replicas else "replicas: none registered")  # fmt: skip
    print()
    queues = [
        [t, q.ready, q.scheduled, q.processing, f"{q.oldest_ready_age:.1f}s"]
        for t, q in status.queues.items()
    ]
    print(_table(["TYPE", "READY", "SCHEDULED", "PROCESSING", "OLDEST_READY"], queues)
          if queues else "queues: empty")  # fmt: skip
    paused = [t.type for t in status.types if t.paused]
    full = [t.type for t in status.types if not t.accepting]
    if paused or full:
        print()
        print(f"paused: {', '.join(paused) or 'none'}; full (max_pending): "
              f"{', '.join(full) or 'none'}")  # fmt: skip
    if status.schedules:
        print()
        print(_table(["SCHEDULE", "CRON", "TIMEZONE", "TYPE", "NEXT_RUN"],
                     [[r["name"], r["cron"], r["timezone"], r["type"], _when(r["next_run_at"])]
                      for r in status.schedules]))  # fmt: skip
    return EXIT_OK


def _status_json(status: ClusterStatus) -> dict[str, Any]:
    return {
        "leader": status.leader,
        "replicas": status.replicas,
        "queues": {t: vars(q) for t, q in status.queues.items()},
        "types": [vars(t) for t in status.types],
        "schedules": status.schedules,
    }


def cmd_types(settings: Settings, args: argparse.Namespace) -> int:
    with _client(settings) as client:
        if args.command == "types":
            types = client.job_types()
        else:
            types = [(client.pause if args.command == "pause" else client.resume)(args.type)]
    if args.json:
        _print_json([vars(t) for t in types])
    elif not types:
        print("no type has cluster-wide controls yet")
    else:
        print(_table(["TYPE", "PAUSED", "MAX_PENDING", "ACCEPTING", "PENDING"],
                     [[t.type, "yes" if t.paused else "no", t.max_pending or "-",
                       "yes" if t.accepting else "no", t.pending if t.pending is not None else "-"]
                      for t in types]))  # fmt: skip
    return EXIT_OK


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    masked = settings.masked()
    if args.json:
        _print_json(masked)
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


# --- parsing ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description="Postgres-native, leader-elected background job dispatcher.",
        epilog="Exit codes: 0 ok, 1 operation failed, 2 usage or configuration error.",
    )
    parser.add_argument("--config", help="TOML settings file (or DISPATCHER_CONFIG)")
    parser.add_argument("--dsn", help="PostgreSQL DSN (or DISPATCHER_DSN; unset: embedded)")
    parser.add_argument("--schema", help="schema name (or DISPATCHER_SCHEMA; default dispatcher)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="apply pending schema migrations")

    run = commands.add_parser("run", help="run a replica of APP (e.g. dispatcher.examples:app)")
    run.add_argument("app", metavar="MODULE:APP", help="where the dispatcher.App lives")
    run.add_argument("--migrate", action="store_true", help="apply pending migrations first")
    run.add_argument("--concurrency", help="global limit of running jobs (overrides the app)")
    run.add_argument("--replica-id", help="replica name (default: host name)")
    run.add_argument(
        "--mode",
        choices=["leader", "all"],
        help="leader (default): only the leader claims; all: every replica claims",
    )
    run.add_argument("--http-port", help="port of the HTTP API (default 8080)")
    run.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve the HTTP API without a token (local development only)",
    )

    enqueue = commands.add_parser("enqueue", parents=[as_json], help="enqueue one job")
    enqueue.add_argument("type", help="job type, e.g. demo.echo")
    enqueue.add_argument("--payload", help='JSON payload, e.g. \'{"to": "a@b.c"}\'')
    enqueue.add_argument("--priority", type=int, default=0, help="lower runs first")
    enqueue.add_argument("--run-at", help="ISO 8601 time with a timezone")
    enqueue.add_argument("--delay", type=float, help="seconds from now")
    enqueue.add_argument("--max-attempts", type=_positive_int)
    enqueue.add_argument("--timeout", type=float, help="seconds per attempt")
    enqueue.add_argument("--unique-key", help="at most one active job per type and key")
    enqueue.add_argument(
        "--cache-ttl", type=float, help="seconds: reuse a job with this key completed within them"
    )

    jobs = commands.add_parser("jobs", help="list, show, cancel or retry jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = jobs_commands.add_parser("list", parents=[as_json], help="jobs, newest first")
    listing.add_argument("--status", choices=[s.value for s in JobStatus])
    listing.add_argument("--type")
    listing.add_argument("--limit", type=_positive_int, default=50)
    listing.add_argument("--before-id", type=_positive_int, help="next page: last id shown")
    for action, text in (
        ("show", "one job with its errors"),
        ("cancel", "cancel a pending or running job"),
    ):
        one = jobs_commands.add_parser(action, parents=[as_json], help=text)
        one.add_argument("id", type=_positive_int)
    retry = jobs_commands.add_parser(
        "retry",
        parents=[as_json],
        help="put a failed or cancelled job back to pending; without ID, all of them",
    )
    retry.add_argument("id", type=_positive_int, nargs="?")
    retry.add_argument("--status", choices=["failed", "cancelled"], default="failed")
    retry.add_argument("--type", help="only jobs of this type (bulk retry)")

    for name, text in (
        ("pause", "stop claiming TYPE cluster-wide"),
        ("resume", "claim TYPE again"),
    ):
        control = commands.add_parser(name, parents=[as_json], help=text)
        control.add_argument("type")
    commands.add_parser("types", parents=[as_json], help="types with pause or max_pending")

    commands.add_parser("status", parents=[as_json], help="leader, replicas and queues")
    commands.add_parser("config", parents=[as_json], help="effective settings, secrets masked")

    roles = commands.add_parser(
        "roles",
        help="print the SQL that creates least-privilege roles for the schema (run it with "
        "psql after `dispatcher migrate`)",
    )
    defaults = RoleNames()
    roles.add_argument("--runtime", default=defaults.runtime, help="the replicas' role")
    roles.add_argument("--producer", default=defaults.producer, help="your services' role")
    roles.add_argument("--readonly", default=defaults.readonly, help="a read-only role")

    embedded = commands.add_parser("embedded", help="the embedded PostgreSQL")
    embedded.add_argument("embedded_command", choices=["status", "stop"])

    dev = commands.add_parser("dev", help="embedded database + N local replicas (make run)")
    dev.add_argument("--replicas", type=_positive_int, default=1)
    dev.add_argument("--app", default="dispatcher.examples:app", metavar="MODULE:APP")
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {"dsn": args.dsn, "schema": args.schema}
    for option in ("concurrency", "replica_id", "http_port", "mode"):
        overrides[option] = getattr(args, option, None)
    try:
        settings, warnings = load_settings(config_file=args.config, overrides=overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            _stderr(f"config error: {problem}")
        return EXIT_USAGE
    for warning in warnings:
        _stderr(f"warning: {warning}")
    try:
        return COMMANDS[args.command](settings, args)
    except (UsageError, InvalidJob, InvalidArgument) as exc:
        _stderr(f"error: {exc}")
        return EXIT_USAGE
    except DispatcherError as exc:
        _stderr(f"error: {exc}")
        return EXIT_FAILED
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly.
        sys.stderr.close()
        return EXIT_OK
    except (OSError, asyncpg.PostgresError, psycopg.Error) as exc:
        _stderr(f"error: database: {str(exc).strip() or type(exc).__name__}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
