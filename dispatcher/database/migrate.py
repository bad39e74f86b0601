"""Schema migrations: numbered .sql files under ``sql/``, each applied once.

Every migration runs in its own transaction, all of them under a session advisory
lock keyed on the schema, so replicas that start together queue up instead of racing;
the second one finds nothing left to do. Applied versions are recorded with a
checksum in ``<schema>.migrations``: an edited migration, or a database already
migrated by newer code, is refused with a message that says what to do.

A session lock needs a session: behind a transaction-mode pooler (PgBouncer) the lock
and its unlock may reach different server connections, so nothing is serialized and
the lock stays held by a pooled server connection. Migrations therefore run on the
session DSN (``election_dsn``, straight at Postgres or through a session-mode pooler)
when one is configured, and an unlock that finds no lock is reported as that mistake.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from dispatcher.core.errors import MigrationError, SchemaNotReady
from dispatcher.core.queries import queries_for, render, sql_dir
from dispatcher.core.schema import SchemaNames

_MIGRATION_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

# How long `migrate` waits for another process's migration before giving up.
LOCK_WAIT_SECONDS = 300.0

_NOT_A_SESSION = (
    "the migration lock on schema {schema!r} was taken on one server session and released "
    "on another: the DSN goes through a transaction-mode pooler (PgBouncer), where a "
    "session advisory lock serializes nothing. Run migrations on a direct or session-mode "
    "connection: set DISPATCHER_ELECTION_DSN (migrations use it when set). A pooled server "
    "connection may still hold the lock until it closes (PgBouncer console: RECONNECT)"
)


@dataclass(frozen=True)
class Migration:
    """One numbered migration file."""

    version: int
    name: str
    text: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def known_migrations() -> list[Migration]:
    """The migrations this code ships, in order; versions must run 1, 2, 3, ..."""
    migrations = []
    for path in sorted(sql_dir().glob("[0-9][0-9][0-9][0-9]_*.sql")):
        match = _MIGRATION_FILE.fullmatch(path.name)
        if match is None:
            raise MigrationError(f"migration file name {path.name!r} is not NNNN_name.sql")
        text = path.read_text(encoding="utf-8")
        migrations.append(Migration(int(match.group(1)), match.group(2), text))
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration {migration.label} is out of sequence: expected version {expected:04d}"
            )
    return migrations


async def applied_versions(conn: asyncpg.Connection, schema: str) -> dict[int, str]:
    """{version: checksum} of the migrations recorded in the schema (empty if none)."""
    q = queries_for(schema)
    exists = await conn.fetchval(q["migrations_table_exists"], schema)
    if not exists:
        return {}
    rows = await conn.fetch(q["applied_migrations"])
    return {row["version"]: row["checksum"] for row in rows}


def _check_applied(applied: dict[int, str], known: list[Migration], schema: str) -> None:
    by_version = {m.version: m for m in known}
    newest_known = known[-1].version if known else 0
    if applied and max(applied) > newest_known:
        raise MigrationError(
            f"schema {schema!r} is at migration {max(applied):04d}, newer than this "
            f"dispatcher knows ({newest_known:04d}): upgrade dispatcher before running it "
            "against this database"
        )
    for version, checksum in applied.items():
        migration = by_version[version]
        if checksum != migration.checksum:
            raise MigrationError(
                f"migration {migration.label} was changed after it was applied to schema "
                f"{schema!r}: applied migrations are immutable, add a new one instead"
            )


async def migrate(
    conn: asyncpg.Connection,
    schema: str,
    *,
    report: Callable[[str], None] | None = None,
    up_to: int | None = None,
) -> list[Migration]:
    """Apply every pending migration to ``schema``; return the ones applied.

    Idempotent and safe to run from several processes at once. ``report`` receives
    one human-readable line per applied migration. ``up_to``: stop after that version
    (an upgrade test starts from an older schema).
    """
    names = SchemaNames(schema)
    q = queries_for(schema)
    known = known_migrations()
    try:
        await conn.execute(
            q["lock_migrations"], names.migration_lock_name, timeout=LOCK_WAIT_SECONDS
        )
    except TimeoutError:
        raise MigrationError(
            f"waited {LOCK_WAIT_SECONDS:.0f}s for another process migrating schema {schema!r}; "
            "is a migration stuck? (look for a long-running session holding an advisory lock)"
        ) from None
    try:
        async with conn.transaction():
            await conn.execute(q["create_schema"])
            await conn.execute(q["create_migrations_table"])
        applied = await applied_versions(conn, schema)
        _check_applied(applied, known, schema)
        done = []
        for migration in known:
            if migration.version in applied:
                continue
            if up_to is not None and migration.version > up_to:
                break
            started = time.monotonic()
            try:
                async with conn.transaction():
                    await conn.execute(render(migration.text, names))
                    await conn.execute(
                        q["record_migration"], migration.version, migration.name, migration.checksum
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.label} failed on schema {schema!r} and was rolled "
                    f"back: {exc}"
                ) from exc
            done.append(migration)
            if report is not None:
                elapsed_ms = (time.monotonic() - started) * 1000
                report(f"applied {migration.label} to schema {schema!r} ({elapsed_ms:.0f} ms)")
    finally:
        unlocked = await conn.fetchval(q["unlock_migrations"], names.migration_lock_name)
    if not unlocked:
        raise MigrationError(_NOT_A_SESSION.format(schema=schema))
    return done


async def migrate_at(
    dsn: str, schema: str, *, report: Callable[[str], None] | None = None
) -> list[Migration]:
    """:func:`migrate` on a connection of its own to ``dsn``, a direct or session-mode
    one (see the module docstring), closed afterwards."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn, schema, report=report)
    finally:
        await conn.close()


async def check_schema_current(conn: asyncpg.Connection, schema: str) -> None:
    """Raise SchemaNotReady unless every known migration, and nothing newer, is applied."""
    known = known_migrations()
    applied = await applied_versions(conn, schema)
    if not applied:
        raise SchemaNotReady(f"schema {schema!r} is not migrated: run `dispatcher migrate`")
    try:
        _check_applied(applied, known, schema)
    except MigrationError as exc:
        raise SchemaNotReady(str(exc)) from exc
    missing = [m.label for m in known if m.version not in applied]
    if missing:
        raise SchemaNotReady(
            f"schema {schema!r} lacks migrations {', '.join(missing)}: run `dispatcher migrate`"
        )
