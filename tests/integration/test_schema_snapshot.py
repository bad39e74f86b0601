r"""The migrations produce exactly the declared schema.

Every migration is applied to a fresh schema, which is then described from the
catalogs (tables and their columns, constraints, indexes, triggers and storage
options; functions; sequences; any other relation or type) and compared with
tests/integration/schema_snapshot.txt, checked into the repository. A migration that
changes the schema therefore shows up as a diff of that file in review, and a change
to the schema that no migration makes (or one a migration makes by accident) fails
here.

The description is the same on every server this suite runs against:
* the schema's name is replaced by ``{{schema}}``, the placeholder of the migration
  files, and catalog deparsing runs with ``search_path = pg_catalog``, so every object
  of the schema is printed qualified, whatever the session's own path;
* PostgreSQL 18 records each NOT NULL as a constraint of its own (``contype = 'n'``,
  named ``<table>_<column>_not_null``), which 15 does not: those are left out, and
  nullability is shown on the column (``attnotnull``) as on every version;
* everything is sorted by name in Python (code-point order), not by the database's
  collation, which differs between servers.

After an intended change, regenerate the snapshot and commit it with the migration:

    DISPATCHER_UPDATE_SCHEMA_SNAPSHOT=1 make test \
        PYTEST_ARGS=tests/integration/test_schema_snapshot.py
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import asyncpg
import pytest

from dispatcher.database.migrate import known_migrations, migrate
from tests.support.database import PostgresServer

SNAPSHOT = Path(__file__).with_name("schema_snapshot.txt")
UPDATE_VARIABLE = "DISPATCHER_UPDATE_SCHEMA_SNAPSHOT"
REGENERATE = f"{UPDATE_VARIABLE}=1 make test PYTEST_ARGS=tests/integration/test_schema_snapshot.py"
PLACEHOLDER = "{{schema}}"

HEADER = f"""\
# The schema that every migration in sql/ produces, described from the catalogs by
# tests/integration/test_schema_snapshot.py ({PLACEHOLDER} stands for the schema name).
# Generated: do not edit by hand. After an intended change, regenerate it with
#   {REGENERATE}
# and commit it with the migration.
"""

COLUMNS = """
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid) AS default_value,
       CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default' END AS identity,
       a.attgenerated = 's' AS generated,
       CASE WHEN a.attcollation <> t.typcollation THEN co.collname END AS collation
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# contype 'n': PostgreSQL 18's NOT NULL constraints (see the module docstring).
CONSTRAINTS = """
SELECT conname AS name, pg_get_constraintdef(oid) AS definition
FROM pg_constraint
WHERE conrelid = $1 AND contype <> 'n'
"""

INDEXES = """
SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = $1
"""

TRIGGERS = """
SELECT tgname AS name, pg_get_triggerdef(oid) AS definition
FROM pg_trigger
WHERE tgrelid = $1 AND NOT tgisinternal
"""

RELATIONS = """
SELECT c.oid, c.relname AS name, c.relkind::text, c.reloptions,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END AS view_definition
FROM pg_class c
WHERE c.relnamespace = $1 AND c.relkind NOT IN ('i', 'I')
"""

SEQUENCES = """
SELECT format_type(s.seqtypid, NULL) AS type, s.seqstart, s.seqincrement, s.seqmin,
       s.seqmax, s.seqcache, s.seqcycle,
       (SELECT format('%s.%s', t.relname, a.attname)
        FROM pg_depend dep
        JOIN pg_class t ON t.oid = dep.refobjid
        JOIN pg_attribute a ON a.attrelid = dep.refobjid AND a.attnum = dep.refobjsubid
        WHERE dep.classid = 'pg_class'::regclass AND dep.objid = s.seqrelid
          AND dep.deptype IN ('a', 'i')) AS owned_by
FROM pg_sequence s
WHERE s.seqrelid = $1
"""

FUNCTIONS = """
SELECT p.proname AS name, pg_get_function_identity_arguments(p.oid) AS arguments,
       pg_get_functiondef(p.oid) AS definition
FROM pg_proc p
WHERE p.pronamespace = $1 AND p.prokind IN ('f', 'p')
"""

# Types of the schema's own (enums, domains, ...): not the row and array types that
# come with each table.
TYPES = """
SELECT t.typname AS name, t.typtype::text,
       format_type(t.typbasetype, t.typtypmod) AS base_type,
       (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
        FROM pg_enum e WHERE e.enumtypid = t.oid) AS labels
FROM pg_type t
WHERE t.typnamespace = $1 AND t.typrelid = 0 AND t.typcategory <> 'A'
"""

RELATION_KINDS = {
    "r": "table", "p": "table", "S": "sequence", "v": "view", "m": "materialized view",
}  # fmt: skip


def _indented(text: str) -> str:
    """A definition deparsed over several lines (a CASE), its lines after the first
    indented under it."""
    first, *rest = text.splitlines()
    return "\n".join([first, *("      " + line for line in rest)])


def _column_line(row: asyncpg.Record) -> str:
    parts = [f"column {row['name']} {row['type']}"]
    if row["collation"]:
        parts.append(f'collate "{row["collation"]}"')
    if row["attnotnull"]:
        parts.append("not null")
    if row["identity"]:
        parts.append(f"identity {row['identity']}")
    if row["generated"]:
        parts.append(f"generated always as {row['default_value']} stored")
    elif row["default_value"] is not None:
        parts.append(f"default {row['default_value']}")
    return " ".join(parts)


async def _describe_relation(conn: asyncpg.Connection, relation: asyncpg.Record) -> list[str]:
    kind = RELATION_KINDS.get(relation["relkind"], f"relation of kind {relation['relkind']!r}")
    lines = [f"{kind} {PLACEHOLDER}.{relation['name']}"]
    if relation["relkind"] == "S":
        sequence = await conn.fetchrow(SEQUENCES, relation["oid"])
        lines.append(
            f"  {sequence['type']} start {sequence['seqstart']} increment "
            f"{sequence['seqincrement']} min {sequence['seqmin']} max {sequence['seqmax']} "
            f"cache {sequence['seqcache']}{' cycle' if sequence['seqcycle'] else ''}"
        )
        if sequence["owned_by"]:
            lines.append(f"  owned by {PLACEHOLDER}.{sequence['owned_by']}")
        return lines
    if relation["view_definition"] is not None:
        lines += ["  " + line for line in relation["view_definition"].splitlines()]
    lines += ["  " + _column_line(row) for row in await conn.fetch(COLUMNS, relation["oid"])]
    for title, query in (("constraint", CONSTRAINTS), ("index", INDEXES), ("trigger", TRIGGERS)):
        rows = sorted(await conn.fetch(query, relation["oid"]), key=lambda r: r["name"])
        lines += [_indented(f"  {title} {row['name']}: {row['definition']}") for row in rows]
    # The storage options: the autovacuum settings and fillfactor of a queue table.
    for option in sorted(relation["reloptions"] or []):
        lines.append(f"  storage {option}")
    return lines


async def describe_schema(conn: asyncpg.Connection, schema: str) -> str:
    """The schema ``schema`` as text: the same for the same migrations on PostgreSQL
    15 and 18, under any schema name (see the module docstring)."""
    lines = [HEADER.rstrip("\n"), "", "migrations applied"]
    namespace = await conn.fetchval("SELECT oid FROM pg_namespace WHERE nspname = $1", schema)
    async with conn.transaction():
        # Deparsed definitions qualify whatever is not on the path: the schema's own
        # objects always, built-in ones never.
        await conn.execute("SET LOCAL search_path = pg_catalog")
        applied = await conn.fetch(f'SELECT version, name FROM "{schema}".migrations')
        lines += [f"  {r['version']:04d} {r['name']}" for r in sorted(applied)]
        relations = sorted(await conn.fetch(RELATIONS, namespace), key=lambda r: r["name"])
        for relation in relations:
            lines += ["", *await _describe_relation(conn, relation)]
        for function in sorted(
            await conn.fetch(FUNCTIONS, namespace), key=lambda r: (r["name"], r["arguments"])
        ):
            lines += ["", f"function {PLACEHOLDER}.{function['name']}({function['arguments']})"]
            lines += ["  " + line for line in function["definition"].strip().splitlines()]
        for type_ in sorted(await conn.fetch(TYPES, namespace), key=lambda r: r["name"]):
            lines += ["", f"type {PLACEHOLDER}.{type_['name']} (typtype {type_['typtype']})"]
            if type_["labels"]:
                lines.append(f"  enum {type_['labels']}")
            if type_["typtype"] == "d":
                lines.append(f"  domain over {type_['base_type']}")
    text = "\n".join(line.rstrip() for line in lines) + "\n"
    return text.replace(f'"{schema}"', PLACEHOLDER).replace(schema, PLACEHOLDER)


def _difference(expected: str, actual: str) -> str:
    diff = difflib.unified_diff(
        expected.splitlines(keepends=True),
        actual.splitlines(keepends=True),
        fromfile=f"{SNAPSHOT.name} (checked in)",
        tofile="what the migrations produce",
    )
    return "".join(diff)


async def test_the_migrations_produce_the_schema_of_the_snapshot(
    postgres: PostgresServer, unmigrated_schema: str
) -> None:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        applied = await migrate(conn, unmigrated_schema)
        assert [m.label for m in applied] == [m.label for m in known_migrations()]
        actual = await describe_schema(conn, unmigrated_schema)
    finally:
        await conn.close()
    if os.environ.get(UPDATE_VARIABLE) == "1":
        SNAPSHOT.write_text(actual, encoding="utf-8")
        pytest.skip(f"wrote {SNAPSHOT}: review it (git diff) and commit it with the migration")
    if not SNAPSHOT.exists():
        pytest.fail(f"{SNAPSHOT} is missing; generate it with\n    {REGENERATE}", pytrace=False)
    expected = SNAPSHOT.read_text(encoding="utf-8")
    if actual != expected:
        pytest.fail(
            f"the migrations produce a schema different from {SNAPSHOT.name}:\n\n"
            f"{_difference(expected, actual)}\n"
            "If the change is intended, regenerate the snapshot and commit it with the "
            f"migration:\n    {REGENERATE}",
            pytrace=False,
        )
