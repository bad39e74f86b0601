"""Run a producer plan on one open driver connection: psycopg 3 or asyncpg.

The clients run plans on their pooled connections or on the caller's; the ORM
adapters (:mod:`dispatcher.contrib`) on the connection under a SQLAlchemy session or
Django's. A runner neither opens, begins nor commits anything: each statement runs on
the connection as it is, so it joins the transaction in progress there, or commits
on its own in autocommit mode.

What the caller's connection was configured with must not change what a plan
receives. A connection configured by someone else decodes jsonb its own way (psycopg
into Python objects; Django's into text; SQLAlchemy's asyncpg codec into Python
objects), and :func:`dispatcher.core.records.decode_json` cannot tell a decoded JSON
string from JSON text: the jsonb payload ``"42"`` would come back as the number 42.
So the psycopg runner reads jsonb and timestamptz with psycopg's plain loaders on its
own cursors (Django's timestamptz loader drops the time zone when ``USE_TZ`` is off),
and the asyncpg runner, told that the connection decodes jsonb, turns decoded
strings back into JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

import asyncpg
import psycopg
from psycopg.rows import dict_row
from psycopg.types.datetime import TimestamptzLoader
from psycopg.types.string import TextLoader

from dispatcher.core.queries import for_psycopg, psycopg_params, queries_for
from dispatcher.core.schema import validate_schema_name
from dispatcher.producers.plans import (
    COPY_COLUMNS,
    LEAN_COPY_COLUMNS,
    CopyRows,
    Plan,
    Row,
    Step,
    refused_job,
)

T = TypeVar("T")


class PsycopgRunner:
    """Runs plans on a psycopg 3 connection of any configuration.

    ``prepare`` is passed to every execute: None lets the connection decide (its
    ``prepare_threshold``), False never prepares (PgBouncer in transaction mode).
    """

    def __init__(self, schema: str, *, prepare: bool | None = None) -> None:
        self.schema = validate_schema_name(schema)
        self._queries = queries_for(self.schema)
        self._prepare = prepare

    def run(self, conn: psycopg.Connection[Any], plan: Plan[T]) -> T:
        """Run ``plan``'s statements on ``conn`` to its end; return its result."""
        try:
            step = next(plan)
            while True:
                try:
                    rows = self._execute(conn, step)
                except Exception as exc:
                    # Into the plan, which re-raises it: its producer span records it.
                    step = plan.throw(exc)
                else:
                    step = plan.send(rows)
        except StopIteration as done:
            result: T = done.value
            return result

    def _execute(self, conn: psycopg.Connection[Any], step: Step) -> Sequence[Row]:
        if isinstance(step, CopyRows):
            query = self._queries["copy_jobs_lean" if step.lean else "copy_jobs"]
            with conn.cursor() as cur, cur.copy(query) as copy:
                for row in step.rows:
                    copy.write_row(row)
            return []
        with conn.cursor(row_factory=dict_row) as cur:
            # The cursor's own adapters (a copy of the connection's): see the module doc.
            cur.adapters.register_loader("jsonb", TextLoader)
            cur.adapters.register_loader("json", TextLoader)
            cur.adapters.register_loader("timestamptz", TimestamptzLoader)
            try:
                cur.execute(
                    for_psycopg(self._queries[step.query]),
                    psycopg_params(step.args),
                    prepare=self._prepare,
                )
            except psycopg.errors.IntegrityError as exc:
                refusal = refused_job(exc.diag.constraint_name, exc.diag.message_primary or "")
                if refusal is None:
                    raise
                raise refusal from exc
            return cur.fetchall()


class AsyncpgRunner:
    """Runs plans on an asyncpg connection.

    ``decodes_json``: the connection has a json/jsonb codec that returns Python
    objects (SQLAlchemy's asyncpg dialect installs one) instead of asyncpg's default
    JSON text; the runner then hands the plan JSON text for decoded strings.
    """

    def __init__(self, schema: str, *, decodes_json: bool = False) -> None:
        self.schema = validate_schema_name(schema)
        self._queries = queries_for(self.schema)
        self._decodes_json = decodes_json

    async def run(self, conn: asyncpg.Connection, plan: Plan[T]) -> T:
        """Run ``plan``'s statements on ``conn`` to its end; return its result."""
        try:
            step = next(plan)
            while True:
                try:
                    rows = await self._execute(conn, step)
                except Exception as exc:
                    step = plan.throw(exc)  # see PsycopgRunner.run
                else:
                    step = plan.send(rows)
        except StopIteration as done:
            result: T = done.value
            return result

    async def _execute(self, conn: asyncpg.Connection, step: Step) -> Sequence[Row]:
        if isinstance(step, CopyRows):
            # Payloads are JSON text: asyncpg's jsonb encoder and SQLAlchemy's both
            # take text.
            await conn.copy_records_to_table(
                "jobs",
                schema_name=self.schema,
                columns=LEAN_COPY_COLUMNS if step.lean else COPY_COLUMNS,
                records=step.rows,
            )
            return []
        query = self._queries[step.query]
        try:
            rows: Sequence[Row] = await conn.fetch(query, *step.args)
        except asyncpg.IntegrityConstraintViolationError as exc:
            refusal = refused_job(exc.constraint_name, exc.message)
            if refusal is None:
                raise
            raise refusal from exc
        if self._decodes_json and rows:
            columns = await _json_columns(conn, query)
            if columns:
                return [_strings_as_json(row, columns) for row in rows]
        return rows


# The json and jsonb result columns of each query text, learned once from its
# prepared statement's description.
_JSON_COLUMNS: dict[str, frozenset[str]] = {}


async def _json_columns(conn: asyncpg.Connection, query: str) -> frozenset[str]:
    columns = _JSON_COLUMNS.get(query)
    if columns is None:
        statement = await conn.prepare(query)
        columns = frozenset(
            attribute.name
            for attribute in statement.get_attributes()
            if attribute.type.name in ("json", "jsonb")
        )
        _JSON_COLUMNS[query] = columns
    return columns


def _strings_as_json(row: Row, columns: frozenset[str]) -> Row:
    """The row with each decoded JSON string in ``columns`` as JSON text again (other
    decoded values pass through decode_json untouched)."""
    return {
        name: json.dumps(value) if name in columns and isinstance(value, str) else value
        for name, value in row.items()
    }
