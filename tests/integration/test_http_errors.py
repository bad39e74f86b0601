"""The API's error mapping on its own: each exception a route may raise, answered by
``register_error_handlers`` on a bare FastAPI app, with its status, body and headers.
No database: the exceptions are raised by a route of the test's own."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from dispatcher.core.errors import (
    DispatcherError,
    InvalidArgument,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
    QueueFull,
    SchemaNotReady,
)
from dispatcher.http.errors import register_error_handlers

CASES: list[tuple[Exception, int, str]] = [
    (JobNotFound(7), 404, "no job with id 7"),
    (InvalidTransition("job 7 is running"), 409, "job 7 is running"),
    (InvalidJob("give run_at or delay, not both"), 422, "give run_at or delay, not both"),
    (InvalidArgument("limit must be positive"), 422, "limit must be positive"),
    (SchemaNotReady("run `dispatcher migrate`"), 503, "run `dispatcher migrate`"),
    (DispatcherError("something else"), 400, "something else"),
    (QueueFull("the queue of 't' is full", 2.4), 429, "the queue of 't' is full"),
    (
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        503,
        "database unavailable: TooManyConnectionsError: too many clients",
    ),
    (
        asyncpg.exceptions.CheckViolationError("violates check constraint"),
        422,
        "the database refused it: CheckViolationError: violates check constraint",
    ),
    (
        ConnectionRefusedError(111, "Connection refused"),
        503,
        "database unavailable: ConnectionRefusedError: [Errno 111] Connection refused",
    ),
    (
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        503,
        "database unavailable: ConnectionDoesNotExistError: connection was closed",
    ),
    (
        UnicodeEncodeError("utf-8", "a\ud800", 1, 2, "surrogates not allowed"),
        422,
        "the request contains a lone surrogate ('\\ud800'), which is not valid Unicode",
    ),
]


@pytest.mark.parametrize(
    ("error", "status", "detail"), CASES, ids=[type(case[0]).__name__ for case in CASES]
)
async def test_each_error_maps_to_its_status_and_detail(
    error: Exception, status: int, detail: str
) -> None:
    app = FastAPI()
    register_error_handlers(app)

    @app.get("/fail")
    async def fail() -> None:
        raise error

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        response = await client.get("/fail")
    assert (response.status_code, response.json()) == (status, {"detail": detail})
    if isinstance(error, QueueFull):
        assert response.headers["retry-after"] == "2"
    else:
        assert "retry-after" not in response.headers


async def test_a_queue_full_hint_under_a_second_still_says_one() -> None:
    app = FastAPI()
    register_error_handlers(app)

    @app.get("/fail")
    async def fail() -> None:
        raise QueueFull("full", 0.2)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        response = await client.get("/fail")
    assert (response.status_code, response.headers["retry-after"]) == (429, "1")
