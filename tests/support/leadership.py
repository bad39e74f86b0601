"""Waiting on in-process replicas (Runtime): for exactly one of them to lead, and for
a leader's claim loop to have looked at the queue.

A test that shows a job is *not* claimed (its type paused, say) cannot wait for the
claim; it waits instead for a claim pass that would have made it, then asserts.
"""

from __future__ import annotations

import asyncio

from dispatcher.runtime import Runtime
from tests.support.waiting import eventually


async def leading(runtimes: list[Runtime], timeout: float = 10) -> Runtime:
    """The one replica of ``runtimes`` that leads, once exactly one does."""

    async def one() -> Runtime | None:
        leaders = [r for r in runtimes if not r.stopping and r.elector.is_leader()]
        return leaders[0] if len(leaders) == 1 else None

    return await eventually(one, timeout=timeout, what="exactly one leader")


def claim_loop_wakeups(runtime: Runtime) -> float:
    """How many passes the runtime's claim loop has begun (dispatcher_wakeups_total,
    every source together)."""
    total = 0.0
    for family in runtime.metrics.registry.collect():
        if family.name == "dispatcher_wakeups":
            total += sum(s.value for s in family.samples if s.name == "dispatcher_wakeups_total")
    return total


async def claim_pass_since_now(runtime: Runtime, *, what: str, timeout: float = 10) -> None:
    """Return once a whole claim pass of ``runtime`` began after this call, and ended.

    The loop counts a wake-up as it begins a pass, and begins the next only after the
    last ended: two more wake-ups than now mean one pass ran start to end since. A
    leader's passes come at least every poll interval (and at once on a NOTIFY)."""
    begun = claim_loop_wakeups(runtime)
    await eventually(
        lambda: asyncio.sleep(0, claim_loop_wakeups(runtime) >= begun + 2),
        timeout=timeout,
        what=f"a claim pass of {runtime.owner_id} since {what}",
    )
