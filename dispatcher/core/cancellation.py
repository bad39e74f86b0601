"""Timed waits and task cancellation that never lose a cancellation.

``asyncio.wait_for(event.wait(), timeout)`` is the obvious timed wait, but on Python
3.11 it returns normally when its task is cancelled in the same loop iteration as the
event is set: the cancellation is swallowed. A loop waiting on a wake-up event then
never stops, and whoever awaits its cancellation waits forever (seen as a leader
whose graceful shutdown hung while new jobs kept waking its claim loop).
``asyncio.timeout`` has no such race.

Likewise ``task.cancel(); with suppress(CancelledError): await task`` swallows the
*caller's* cancellation if it arrives while it waits, so a deadline around a shutdown
silently stops applying. :func:`cancel_and_wait` waits with ``asyncio.wait``, which
never raises the tasks' errors and always raises the caller's own cancellation.

A loop that catches Exception to retry calls :func:`raise_if_cancel_requested` first:
a cancellation some library turned into an ordinary error still ends it. When a wait
hangs all the same, :func:`awaiting` says where each task is suspended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


def raise_if_cancel_requested() -> None:
    """Raise CancelledError if the current task was asked to stop, for a loop that
    caught Exception: a library may turn the cancellation into an ordinary error on
    its way up (asyncpg's pool did; dispatcher.database.pool.Pool undoes that one), and
    a loop that retried would run on while its canceller waits for it for good."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


async def wait_for_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass (None: no limit).

    Returns whether the event is set. A cancellation always propagates.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has finished, whatever it ended with.

    The tasks are being discarded, so their exceptions are consumed, not raised.
    """
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled():
            task.exception()  # consumed: "exception was never retrieved" otherwise


def awaiting(task: asyncio.Task[Any], depth: int = 12) -> list[str]:
    """Where a task is suspended, outermost first: its await chain, which
    ``Task.get_stack`` does not follow on Python 3.11."""
    where: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(where) < depth:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        code = frame.f_code
        where.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return where
