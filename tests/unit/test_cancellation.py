"""Timed waits and task cancellation that never swallow a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.core.cancellation import (
    awaiting,
    cancel_and_wait,
    raise_if_cancel_requested,
    wait_for_event,
)
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics, Service
from dispatcher.services.service_loop import run_every
from tests.support.lost_cancellation import converts_its_cancellation
from tests.support.waiting import eventually


async def test_returns_true_once_the_event_is_set() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_for_event(event, 5) is True


async def test_returns_false_when_the_timeout_passes_first() -> None:
    assert await wait_for_event(asyncio.Event(), 0.01) is False


async def test_a_cancel_in_the_same_iteration_as_the_set_still_cancels() -> None:
    # asyncio.wait_for(event.wait(), t) returns normally here on Python 3.11: a loop
    # waiting on a wake-up event then never stops.
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_for_event(event, 5))
    await asyncio.sleep(0)  # parked in event.wait()
    event.set()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_cancel_and_wait_waits_for_each_task_to_end_and_consumes_its_error() -> None:
    ended: list[str] = []

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # cleanup that takes a moment
            ended.append("slow")

    async def fails() -> None:
        raise ValueError("already failed")

    failed = asyncio.create_task(fails())
    slow = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    await cancel_and_wait([slow, failed])
    assert ended == ["slow"] and slow.cancelled() and failed.done()


async def test_cancel_and_wait_never_swallows_the_callers_own_cancellation() -> None:
    # The old spelling (cancel; suppress(CancelledError): await task) returned
    # normally here, so a deadline around a shutdown silently stopped applying.
    cleaning_up = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaning_up.set()
            await asyncio.sleep(0.2)  # cleanup that takes a moment

    slow = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait([slow]))
    # slow's cleanup begins once the caller has cancelled it, and the caller then
    # waits for it: cancel the caller in the middle of that wait.
    await eventually(
        lambda: asyncio.sleep(0, cleaning_up.is_set()), timeout=5, what="slow's cleanup"
    )
    assert not caller.done(), "the caller waits for slow's cleanup"
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait({slow})


async def test_awaiting_follows_the_await_chain_of_a_suspended_task() -> None:
    event = asyncio.Event()

    async def inner() -> None:
        await wait_for_event(event, 5)

    async def outer() -> None:
        await inner()

    task = asyncio.create_task(outer())
    await asyncio.sleep(0)
    names = [where.split()[-1] for where in awaiting(task)]
    event.set()
    await task
    assert names[:3] == ["outer", "inner", "wait_for_event"]


async def test_a_periodic_service_whose_cancellation_was_lost_stops() -> None:
    entered = asyncio.Event()
    metrics = Metrics()
    loop = asyncio.create_task(
        run_every(
            converts_its_cancellation(entered),
            0.01,
            service=Service.REAPER,
            metrics=metrics,
            log=get_logger("test"),
            failed="step_failed",
        )
    )
    await asyncio.wait_for(entered.wait(), 10)
    try:
        await asyncio.wait_for(cancel_and_wait([loop]), 10)
    except TimeoutError:
        raise AssertionError("the periodic loop ran on after its cancellation") from None
    assert loop.cancelled()


async def test_raise_if_cancel_requested_raises_only_once_a_cancel_was_asked() -> None:
    asked = asyncio.Event()
    seen: list[str] = []

    async def loop_that_catches_everything() -> None:
        raise_if_cancel_requested()
        seen.append("not asked yet")
        asked.set()
        while True:
            try:
                await asyncio.Event().wait()  # until cancelled
            except BaseException:
                seen.append("caught")  # a cancellation swallowed, as a library might
            raise_if_cancel_requested()

    task = asyncio.create_task(loop_that_catches_everything())
    await asked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["not asked yet", "caught"]
