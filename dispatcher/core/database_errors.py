"""Which database errors are transient (retry the same thing later) and which mean
the statement itself is wrong for this data (isolate it, never retry it forever).
Bottom layer: no package imports.
"""

from __future__ import annotations

import asyncpg

# SQLSTATE classes: 08 connection exception, 53 insufficient resources, 57 operator
# intervention (admin shutdown, statement timeout), 58 system error, 40 transaction
# rollback (serialization failure, deadlock).
_TRANSIENT_CLASSES = ("08", "53", "57", "58", "40")

# Anything that means "the connection or the database is not usable right now". An
# InternalClientError ("another operation is in progress") is a connection left in a
# bad state by an interrupted statement: a new connection fixes it.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    OSError,
    TimeoutError,
    ConnectionError,
)


# Anything a statement can raise when the database, or the connection to it, cannot be
# trusted right now: the connection errors, and whatever the server refused.
DATABASE_TROUBLE: tuple[type[Exception], ...] = (asyncpg.PostgresError, *CONNECTION_ERRORS)


def is_transient(exc: BaseException) -> bool:
    """True if retrying the same statement later may well succeed."""
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _TRANSIENT_CLASSES
    return False


def describe(exc: BaseException) -> str:
    """A one-line description of a database error for logs."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
