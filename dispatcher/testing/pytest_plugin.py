"""pytest fixtures for a user's own tests, loaded wherever dispatcher is installed.

They touch no database until a test asks for one:

* ``dispatcher_dsn`` (session): the test database, from ``--dispatcher-dsn``, else
  ``DISPATCHER_TEST_DSN``, else ``DISPATCHER_DSN``.
* ``dispatcher_schema`` (session): the installation's schema (``--dispatcher-schema``
  or the ``dispatcher_schema`` ini option; default ``dispatcher``, the one your
  code's clients write to), migrated once per test session.
* ``dispatcher_database`` (each test): that schema emptied of jobs, dependencies,
  samples, type controls and schedules (job ids start at 1 again); its value is
  ``(dsn, schema)``.
* ``dispatcher_client``: a :class:`~dispatcher.Client` on it, closed after the test.
* ``dispatcher_app``: your App, named by the ``dispatcher_app`` ini option
  (``module:attribute``); or override the fixture in your conftest.py.
* ``dispatcher_drain``: ``dispatcher_drain(**options)`` runs every due job of
  ``dispatcher_app`` (see :func:`dispatcher.testing.drain`) and returns the counts.

Tests that use these share one schema: run them in one process (not in parallel
against one database), and with no replica running on that database.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Unpack

import psycopg
import pytest

from dispatcher.core.app import App, load_app
from dispatcher.core.queries import queries_for
from dispatcher.core.schema import DEFAULT_SCHEMA, validate_schema_name
from dispatcher.database.migrate import migrate_at
from dispatcher.producers.client import Client
from dispatcher.testing.drain import Drained, DrainOptions, drain

DSN_VARIABLES = ("DISPATCHER_TEST_DSN", "DISPATCHER_DSN")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dispatcher", "dispatcher job fixtures")
    group.addoption(
        "--dispatcher-dsn",
        default=None,
        help="database for the dispatcher_* fixtures (default: $DISPATCHER_TEST_DSN, "
        "then $DISPATCHER_DSN)",
    )
    group.addoption(
        "--dispatcher-schema",
        default=None,
        help=f"schema the dispatcher_* fixtures migrate and empty (default: {DEFAULT_SCHEMA})",
    )
    parser.addini("dispatcher_schema", "schema of the dispatcher_* fixtures", default=None)
    parser.addini("dispatcher_app", "module:attribute of the App dispatcher_drain runs")


@pytest.fixture(scope="session")
def dispatcher_dsn(request: pytest.FixtureRequest) -> str:
    """The database the dispatcher fixtures use."""
    dsn: str | None = request.config.getoption("--dispatcher-dsn")
    for variable in DSN_VARIABLES:
        dsn = dsn or os.environ.get(variable)
    if not dsn:
        pytest.fail(
            "the dispatcher fixtures need a PostgreSQL database: pass "
            "--dispatcher-dsn=postgresql://... or set DISPATCHER_TEST_DSN",
            pytrace=False,
        )
    return dsn


@pytest.fixture(scope="session")
def dispatcher_schema(request: pytest.FixtureRequest, dispatcher_dsn: str) -> str:
    """The installation's schema, migrated (once per session)."""
    schema = (
        request.config.getoption("--dispatcher-schema")
        or request.config.getini("dispatcher_schema")
        or DEFAULT_SCHEMA
    )
    validate_schema_name(schema)
    asyncio.run(migrate_at(dispatcher_dsn, schema))
    return str(schema)


@pytest.fixture
def dispatcher_database(dispatcher_dsn: str, dispatcher_schema: str) -> tuple[str, str]:
    """``(dsn, schema)``, emptied of jobs and their traces before the test."""
    with psycopg.connect(dispatcher_dsn, autocommit=True) as conn:
        conn.execute(queries_for(dispatcher_schema)["testing_reset"])
    return dispatcher_dsn, dispatcher_schema


@pytest.fixture
def dispatcher_client(dispatcher_database: tuple[str, str]) -> Iterator[Client]:
    """A sync Client on the emptied installation."""
    dsn, schema = dispatcher_database
    with Client(dsn, schema=schema) as client:
        yield client


@pytest.fixture
def dispatcher_app(request: pytest.FixtureRequest) -> App:
    """The App whose executors ``dispatcher_drain`` runs: the ``dispatcher_app`` ini
    option, or override this fixture."""
    target = request.config.getini("dispatcher_app")
    if not target:
        pytest.fail(
            "dispatcher_drain needs your App: set `dispatcher_app = myapp.jobs:app` in "
            "your pytest configuration, or define a `dispatcher_app` fixture returning it",
            pytrace=False,
        )
    return load_app(str(target))


@pytest.fixture
def dispatcher_drain(
    dispatcher_app: App, dispatcher_database: tuple[str, str]
) -> Callable[..., Drained]:
    """``dispatcher_drain(**options)`` (:class:`~dispatcher.testing.DrainOptions`: types,
    with_scheduled, recursive, timeout): run every due job of ``dispatcher_app`` in the
    test's process; returns the counts."""
    dsn, schema = dispatcher_database

    def run(**options: Unpack[DrainOptions]) -> Drained:
        options.setdefault("schema", schema)
        return drain(dispatcher_app, dsn, **options)

    return run
