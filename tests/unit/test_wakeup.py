"""The claim loop's wake-ups: every reason given between two passes counts."""

from __future__ import annotations

from dispatcher.services.wakeup import Wakeup


async def test_every_reason_since_the_last_pass_is_kept() -> None:
    wakeup = Wakeup()
    wakeup.wake("control")  # a pause: the pass must read the paused types again
    wakeup.wake("slot")  # a slot freed before the loop ran
    woken = await wakeup.wait(60)
    assert woken.source == "slot"
    assert woken.sources == {"control", "slot"}


async def test_a_pass_clears_the_reasons_it_was_given() -> None:
    wakeup = Wakeup()
    wakeup.wake("reconnect")
    await wakeup.wait(60)
    wakeup.wake("notify")
    assert (await wakeup.wait(60)).sources == {"notify"}


async def test_no_wake_up_is_a_poll_or_a_timer() -> None:
    wakeup = Wakeup()
    assert await wakeup.wait(0.001) == ("poll", frozenset({"poll"}))
    wakeup.due_at(0)
    assert await wakeup.wait(60) == ("timer", frozenset({"timer"}))
