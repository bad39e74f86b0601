"""A step that loses its cancellation, as a library may (asyncpg's pool did): for tests
that a loop stops all the same."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg


def converts_its_cancellation(entered: asyncio.Event) -> Callable[..., Awaitable[None]]:
    """A step that waits for good and, when cancelled, raises an ordinary error in place
    of the CancelledError, as asyncpg's pool did: how any library might lose one."""

    async def step(*_args: object) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise asyncpg.InternalClientError("the cancellation, lost") from None

    return step
