"""How the API answers errors: the ``Problem`` body, the error responses every guarded
route documents, and one function that maps each exception a route may raise to its
status (``register_error_handlers``).

A database outage answers 503, never a 500; a statement the database refuses, 422.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from dispatcher.core.database_errors import CONNECTION_ERRORS, describe, is_transient
from dispatcher.core.errors import (
    DispatcherError,
    InvalidArgument,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
    QueueFull,
    SchemaNotReady,
)


class Problem(BaseModel):
    detail: str


# Documented on every guarded route: the token check (401, 403) and a database outage.
GUARDED_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem},
    403: {"model": Problem},
    503: {"model": Problem},
}


def register_error_handlers(app: FastAPI) -> None:
    """Answer the DispatcherError family, database errors, connection errors and text
    that no encoding can carry with a status and a ``{"detail": ...}`` body."""
    app.exception_handler(DispatcherError)(dispatcher_error)
    app.exception_handler(asyncpg.PostgresError)(database_error)
    app.exception_handler(UnicodeEncodeError)(not_unicode)
    for error_type in CONNECTION_ERRORS:
        app.exception_handler(error_type)(connection_error)


async def dispatcher_error(_request: Request, exc: DispatcherError) -> JSONResponse:
    status = 400
    if isinstance(exc, JobNotFound):
        status = 404
    elif isinstance(exc, InvalidTransition):
        status = 409
    elif isinstance(exc, InvalidJob | InvalidArgument):
        status = 422
    elif isinstance(exc, SchemaNotReady):
        status = 503
    elif isinstance(exc, QueueFull):
        return JSONResponse(
            {"detail": str(exc)},
            status_code=429,
            headers={"Retry-After": str(max(1, round(exc.retry_after)))},
        )
    return JSONResponse({"detail": str(exc)}, status_code=status)


async def database_error(_request: Request, exc: asyncpg.PostgresError) -> JSONResponse:
    if is_transient(exc):
        return _unavailable(exc)
    return JSONResponse({"detail": f"the database refused it: {describe(exc)}"}, 422)


async def not_unicode(_request: Request, exc: UnicodeEncodeError) -> JSONResponse:
    # JSON may spell a lone surrogate ("\ud800"); no text encoding can carry it.
    bad = exc.object[exc.start : exc.end]
    detail = f"the request contains a lone surrogate ({bad!r}), which is not valid Unicode"
    return JSONResponse({"detail": detail}, 422)


async def connection_error(_request: Request, exc: Exception) -> JSONResponse:
    return _unavailable(exc)


def _unavailable(exc: BaseException) -> JSONResponse:
    return JSONResponse({"detail": f"database unavailable: {describe(exc)}"}, status_code=503)
