"""The ``dispatcher`` command line.

    dispatcher migrate
    dispatcher run MODULE:APP [--migrate] [--insecure-no-auth]
    dispatcher enqueue TYPE [--payload JSON] [--priority N] [--run-at ISO | --delay S]
                           [--depends-on ID[,ID...]] [...]
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
import sys
from collections.abc import Sequence
from typing import Any

import asyncpg
import psycopg

from dispatcher.cli.commands import COMMANDS, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from dispatcher.cli.output import say
from dispatcher.core.config import load_settings
from dispatcher.core.errors import ConfigError, DispatcherError, InvalidArgument, InvalidJob
from dispatcher.core.records import ENQUEUE_OPTION_HELP, JobStatus
from dispatcher.database.roles import RoleNames

# --- parsing ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _job_ids(text: str) -> list[int]:
    """Job ids separated by commas (``--depends-on 3,4``; the flag may repeat)."""
    try:
        return [_positive_int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected job ids such as 3,4, got {text!r}") from None


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
    # The options and their help are the clients' (dispatcher.core.records).
    option = ENQUEUE_OPTION_HELP
    enqueue.add_argument("--priority", type=int, default=0, help=option["priority"])
    enqueue.add_argument("--run-at", help="ISO 8601 time with a timezone; " + option["run_at"])
    enqueue.add_argument("--delay", type=float, help="seconds from now (instead of --run-at)")
    enqueue.add_argument("--max-attempts", type=_positive_int, help=option["max_attempts"])
    enqueue.add_argument("--timeout", type=float, help=option["timeout"])
    enqueue.add_argument("--unique-key", help=option["unique_key"])
    enqueue.add_argument("--cache-ttl", type=float, help=option["cache_ttl"])
    enqueue.add_argument("--concurrency-key", help=option["concurrency_key"])
    enqueue.add_argument(
        "--depends-on", type=_job_ids, action="extend", metavar="ID[,ID...]",
        help=option["depends_on"],
    )  # fmt: skip
    enqueue.add_argument(
        "--on-dependency-failure", choices=["fail", "cancel"], help=option["on_dependency_failure"]
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
        ("cancel", "cancel a waiting, pending or running job"),
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {"dsn": args.dsn, "schema": args.schema}
    for option in ("concurrency", "replica_id", "http_port", "mode"):
        overrides[option] = getattr(args, option, None)
    try:
        settings, warnings = load_settings(config_file=args.config, overrides=overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            say(f"config error: {problem}")
        return EXIT_USAGE
    for warning in warnings:
        say(f"warning: {warning}")
    try:
        return COMMANDS[args.command](settings, args)
    except (UsageError, InvalidJob, InvalidArgument) as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except DispatcherError as exc:
        say(f"error: {exc}")
        return EXIT_FAILED
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly.
        sys.stderr.close()
        return EXIT_OK
    except (OSError, asyncpg.PostgresError, psycopg.Error) as exc:
        say(f"error: database: {str(exc).strip() or type(exc).__name__}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
