"""How a replica lets go of its attempts: at shutdown, and when cut off from the
database with threads it cannot stop.

Shutdown: wait up to ``shutdown_timeout`` for in-flight jobs, then cancel the rest
(an async attempt stops at once and its job goes back to pending, attempt unspent) and
give them ``SHUTDOWN_GRACE`` more. A plain def executor's thread cannot be cancelled:
its job is handed back only once the thread has returned; or, when the replica owns
its process (``dispatcher run``: ``exit_process`` given), right before the process
exits, which stops the thread for good (:meth:`Drain.hand_back_and_exit`).

Cut off (the job heartbeat's ``on_unstoppable``): threads that did not stop when told,
while the reaper may soon rescue their jobs, end the process (status 75) when it is
ours; an embedded runtime can only say so.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import NoReturn

import asyncpg

from dispatcher.core.database_errors import describe
from dispatcher.core.log import get_logger
from dispatcher.core.queries import queries_for
from dispatcher.services.completer import Completer
from dispatcher.services.executor import Attempt, CancelReason, Outcome, OutcomeKind
from dispatcher.services.slots import Slots

# After the shutdown timeout, how long cancelled attempts get to end (async ones end at
# once; a polite thread notices job.cancelled).
SHUTDOWN_GRACE = 5.0
# A job handed back by a process about to exit with its thread still running is due
# this much later: the exit comes first, so no copy of the job can start beside it.
HAND_BACK_DELAY = 1.0
# Exit status of a replica that cut itself off: a plain def executor's thread would not
# stop while the database was unreachable, and the reaper may soon rescue its job.
EXIT_THREADS_UNSTOPPABLE = 75

ExitProcess = Callable[[int], NoReturn]


class Drain:
    """Lets go of the attempts in ``slots``, writing their outcomes through
    ``completer``; ``exit_process`` when the replica owns its process."""

    def __init__(
        self,
        slots: Slots,
        completer: Completer,
        *,
        schema: str,
        owner_id: str,
        exit_process: ExitProcess | None,
    ) -> None:
        self._slots = slots
        self._completer = completer
        self._queries = queries_for(schema)
        self._owner_id = owner_id
        self._exit_process = exit_process
        self._log = get_logger("drain")

    async def attempts(self, shutdown_timeout: float) -> None:
        """Wait for the attempts to end, cancel the rest, and wait for the threads that
        run on (an embedded runtime) or hand them back and exit (a process of ours)."""
        if not await self._slots.drain(shutdown_timeout):
            cancelled = self._slots.cancel_all(CancelReason.SHUTDOWN)
            self._log.warning("shutdown_requeueing", jobs=cancelled)
            await self._slots.drain(SHUTDOWN_GRACE)
        if self._exit_process is None:
            await self._wait_for_threads()
        if not await self._completer.flush(5.0):
            self._log.error("shutdown_outcomes_unwritten", outcomes=self._completer.backlog)

    async def _wait_for_threads(self) -> None:
        """Without a process to end, a thread that ignores job.cancelled keeps its
        attempt live (heartbeated, not handed back) until it returns."""
        while running := self._slots.threads_still_running():
            self._log.error(
                "shutdown_waiting_for_threads",
                job_ids=[a.job.id for a in running],
                hint="plain def executors should return when job.cancelled is set",
            )
            await self._slots.drain(SHUTDOWN_GRACE)

    async def hand_back_and_exit(self) -> None:
        """If threads still run (in a process of ours): hand their jobs back (due in
        HAND_BACK_DELAY), then end the process at once: its exit stops the threads."""
        stuck = self._slots.threads_still_running()
        if not stuck or self._exit_process is None:
            return
        for attempt in stuck:
            job = attempt.job
            self._completer.submit(
                Outcome(job.id, job.attempt, job.type, OutcomeKind.REQUEUE,
                        delay=HAND_BACK_DELAY, source=attempt)
            )  # fmt: skip
        written = await self._completer.flush(5.0)
        self._log.warning(
            "shutdown_exiting_with_threads_running",
            job_ids=[a.job.id for a in stuck],
            handed_back=written,
        )
        _flush_std_streams()
        self._exit_process(0)

    def threads_unstoppable(self, attempts: list[Attempt]) -> None:
        """Job heartbeat callback: cut off from the database, with threads that did not
        stop when told; the reaper may rescue their jobs soon."""
        job_ids = [a.job.id for a in attempts]
        if self._exit_process is None:
            self._log.critical(
                "sync_jobs_unstoppable",
                job_ids=job_ids,
                hint="the reaper may rescue these jobs while their threads still run; "
                "plain def executors should return when job.cancelled is set",
            )
            return
        self._log.critical("exiting_sync_jobs_unstoppable", job_ids=job_ids)
        _flush_std_streams()
        self._exit_process(EXIT_THREADS_UNSTOPPABLE)

    async def nothing_left_processing(self, pool: asyncpg.Pool) -> bool:
        """True when no row is processing under our owner id (False if unknown)."""
        try:
            async with pool.acquire(timeout=5) as conn:
                left: int = await conn.fetchval(
                    self._queries["owned_processing_count"], self._owner_id, timeout=5
                )
        except Exception as exc:
            self._log.warning("shutdown_check_failed", error=describe(exc))
            return False
        if left:
            self._log.warning("shutdown_left_jobs_processing", jobs=left)
        return left == 0


def _flush_std_streams() -> None:
    """Before os._exit: log lines still buffered would be lost."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
