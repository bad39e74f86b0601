"""Who claims, and how the limits are counted: the two ways a replica takes jobs.

Both claim with one statement that starts the jobs it picks (``claim_jobs`` and
``claim_jobs_worker``, which share their pick-and-start part) and differ in how they
count the limits:

* :class:`LeaderClaims` (``DISPATCHER_MODE=leader``, the default): only the leader
  claims, under its term, which the statement checks on the leader row. The leader
  sees every claim, so it counts the limits itself: its own running jobs, those still
  running under others (a previous leader draining) and the recent starts of
  rate-limited types, in windows seeded from the table when it takes over.
* :class:`WorkerClaims` (``DISPATCHER_MODE=all``): every replica claims, SKIP LOCKED
  keeping them apart. A type with a cluster limit or a rate limit is claimed under a
  per-type transaction advisory lock, and the statement counts the jobs processing
  anywhere (and the recent starts) after taking it, so those limits stay exact; the
  global limit then bounds each replica on its own.

Types whose executor has a key limit (``key_concurrency``) are claimed by a statement
of their own (``claim_keyed_jobs``, ``claim_keyed_jobs_worker``), which counts the
jobs processing per concurrency key: the others' claim pays nothing for it. A claim
with both kinds sends both statements.

The dispatcher asks a mode when to claim (:meth:`claiming`), what else holds its
slots (:meth:`running_elsewhere`), how many a type may start (:meth:`allowance`), and
has it send the claim (:meth:`claim`). The leader's claim can also carry a batch of
outcomes, written in the same statement (:meth:`claim_completing`,
``complete_and_claim_jobs``): a slot's cycle in one round trip. A worker's claim
cannot (it may run in a transaction behind per-type locks), so its outcomes are
written apart.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import asyncpg

from dispatcher.core.app import App
from dispatcher.core.queries import Queries
from dispatcher.services.rate_limit import RateWindows


@dataclass(frozen=True)
class ClaimRequest:
    """One claim: per type (``types[i]``) at most ``frees[i]`` jobs, ``batch`` in all;
    a row without its own max_attempts or timeout takes its executor's."""

    owner: str
    number: int  # the claim's number, fenced by revoke_claims
    types: list[str]
    frees: list[int]
    batch: int
    max_attempts: list[int]
    timeouts: list[float | None]
    hints: list[int | None]  # where each type's priority scan starts (pick_due_jobs)
    since: list[tuple[dt.datetime, int] | None]  # (run_at, id) the hint's scan starts after
    cursors_generation: int  # ClaimCursors.generation when this claim was made
    timeout: float  # the statement's
    # Per type: at most this many processing per concurrency_key (None: no key limit).
    key_limits: list[int | None]

    def only(self, indexes: Sequence[int]) -> ClaimRequest:
        """This claim for the types at ``indexes`` only."""
        return replace(
            self,
            types=[self.types[i] for i in indexes],
            frees=[self.frees[i] for i in indexes],
            max_attempts=[self.max_attempts[i] for i in indexes],
            timeouts=[self.timeouts[i] for i in indexes],
            hints=[self.hints[i] for i in indexes],
            since=[self.since[i] for i in indexes],
            key_limits=[self.key_limits[i] for i in indexes],
        )

    @property
    def keyed(self) -> bool:
        """Whether some type of this claim has a key limit."""
        return any(limit is not None for limit in self.key_limits)

    def split_keyed(self) -> tuple[ClaimRequest | None, ClaimRequest | None]:
        """(the types without a key limit, the types with one); None where none."""
        keyed = [i for i, limit in enumerate(self.key_limits) if limit is not None]
        if not keyed:
            return self, None
        plain = [i for i, limit in enumerate(self.key_limits) if limit is None]
        return (self.only(plain) if plain else None), self.only(keyed)


class ClaimMode(Protocol):
    """What the dispatcher needs of a way of claiming."""

    # Whether claim_completing may be used.
    completes_in_claims: bool
    # Whether its claims of unkeyed types may run on the cycle pool, where statements
    # are planned once (database/pool.py): claim_jobs and complete_and_claim_jobs are
    # written for it; the keyed and worker claims read counts best planned per run.
    claims_planned_once: bool

    def started(self) -> bool:
        """The replica started: claim from now on?"""
        ...

    def elected(self, term: int) -> bool:
        """This replica leads under ``term``: claim from now on?"""
        ...

    def deposed(self) -> bool:
        """This replica no longer leads: stop claiming?"""
        ...

    def claiming(self) -> bool:
        """May this replica claim now?"""
        ...

    def running_elsewhere(self) -> Counter[str]:
        """Jobs per type running under other owners that count against our limits."""
        ...

    def allowance(self, type_: str, free: int) -> int:
        """How many jobs of ``type_`` to ask for, given ``free`` slots for it."""
        ...

    def recorded(self, claimed: Counter[str]) -> None:
        """A claim took ``claimed`` jobs per type."""
        ...

    def next_opening(self) -> float | None:
        """When a limit that holds jobs back opens again (monotonic), if one does."""
        ...

    async def prepare(self, pool: asyncpg.Pool) -> None:
        """What the mode needs before its first claim."""
        ...

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """What the mode recounts before each claim."""
        ...

    async def claim(self, conn: asyncpg.Connection, request: ClaimRequest) -> list[asyncpg.Record]:
        """Send the claim; the rows it took."""
        ...

    async def claim_completing(
        self, conn: asyncpg.Connection, request: ClaimRequest, outcomes: tuple[object, ...]
    ) -> list[asyncpg.Record]:
        """Send the claim with outcomes to write (complete_jobs' arguments): the rows
        it took (``claimed``) and the outcomes it wrote (not ``claimed``)."""
        ...


class LeaderClaims:
    """Only the leader claims, under its term (see the module docstring)."""

    completes_in_claims = True
    claims_planned_once = True

    def __init__(
        self, app: App, queries: Queries, owner_id: str, is_leader: Callable[[], bool]
    ) -> None:
        self._queries = queries
        self._owner_id = owner_id
        self._is_leader = is_leader
        self.term: int | None = None
        self._others: Counter[str] = Counter()
        self.rates = RateWindows(
            {t: s.rate_limit for t, s in app.executors.items() if s.rate_limit is not None}
        )

    def started(self) -> bool:
        return False  # not before an election

    def elected(self, term: int) -> bool:
        self.term = term
        return True

    def deposed(self) -> bool:
        self.term = None
        return True

    def claiming(self) -> bool:
        # Trusted only within the lease: a leader paused past it stops at once.
        return self.term is not None and self._is_leader()

    def running_elsewhere(self) -> Counter[str]:
        return self._others

    def allowance(self, type_: str, free: int) -> int:
        free -= self._others[type_]
        budget = self.rates.budget(type_)
        return free if budget is None else min(free, budget)

    def recorded(self, claimed: Counter[str]) -> None:
        """Count the starts of a claim into the rate windows."""
        for type_, count in claimed.items():
            self.rates.record(type_, count)

    def next_opening(self) -> float | None:
        """When a rate-limited type may start again (monotonic), if one is waiting."""
        openings = (self.rates.next_opening(t) for t in self.rates.limits)
        return min((t for t in openings if t is not None), default=None)

    async def prepare(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            await self._count_others(conn)
            if self.rates.limits:
                rows = await conn.fetch(
                    self._queries["recent_starts"],
                    list(self.rates.limits),
                    max(limit.per for limit in self.rates.limits.values()),
                )
                self.rates.seed((row["type"], row["ago"]) for row in rows)

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """Recount the jobs running elsewhere while there are any (they end)."""
        if self._others.total():
            async with pool.acquire() as conn:
                await self._count_others(conn)

    async def _count_others(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(self._queries["running_by_others"], self._owner_id)
        self._others = Counter({row["type"]: row["running"] for row in rows})

    async def claim(self, conn: asyncpg.Connection, request: ClaimRequest) -> list[asyncpg.Record]:
        if self.term is None:
            return []
        plain, keyed = request.split_keyed()
        rows: list[asyncpg.Record] = []
        if keyed is not None:
            rows += await conn.fetch(
                self._queries["claim_keyed_jobs"],
                self.term,
                *_claim_arguments(keyed),
                keyed.key_limits,
                timeout=request.timeout,
            )
        if plain is not None and request.batch > len(rows):
            rows += await conn.fetch(
                self._queries["claim_jobs"],
                self.term,
                *_claim_arguments(replace(plain, batch=request.batch - len(rows))),
                timeout=request.timeout,
            )
        return rows

    async def claim_completing(
        self, conn: asyncpg.Connection, request: ClaimRequest, outcomes: tuple[object, ...]
    ) -> list[asyncpg.Record]:
        # Keyed types are left to the next claim (the freed slots wake it).
        plain, _ = request.split_keyed()
        rows: list[asyncpg.Record] = await conn.fetch(
            self._queries["complete_and_claim_jobs"],
            self.term,  # None once deposed: the fence then claims nothing
            *_claim_arguments(plain or request.only([])),
            *outcomes,
            timeout=request.timeout,
        )
        return rows


class WorkerClaims:
    """Every replica claims while it runs (see the module docstring)."""

    completes_in_claims = False
    claims_planned_once = False

    def __init__(
        self, app: App, queries: Queries, schema: str, can_claim: Callable[[], bool]
    ) -> None:
        self._queries = queries
        self._schema = schema
        self._can_claim = can_claim
        self._cluster_limits = {t: s.concurrency for t, s in app.executors.items()}
        self._rate_limits = {t: s.rate_limit for t, s in app.executors.items()}
        self._none: Counter[str] = Counter()

    def started(self) -> bool:
        return True

    def elected(self, term: int) -> bool:
        return False  # leading changes nothing about claiming

    def deposed(self) -> bool:
        return False

    def claiming(self) -> bool:
        return self._can_claim()

    def running_elsewhere(self) -> Counter[str]:
        return self._none  # the statement counts the jobs running anywhere itself

    def allowance(self, type_: str, free: int) -> int:
        return free

    def recorded(self, claimed: Counter[str]) -> None:
        return None  # the statement counts recent starts itself

    def next_opening(self) -> float | None:
        return None

    async def prepare(self, pool: asyncpg.Pool) -> None:
        return None

    async def refresh(self, pool: asyncpg.Pool) -> None:
        return None

    async def claim(self, conn: asyncpg.Connection, request: ClaimRequest) -> list[asyncpg.Record]:
        plain, keyed = request.split_keyed()
        rows: list[asyncpg.Record] = []
        if keyed is not None:
            rows += await self._claim(conn, keyed, "claim_keyed_jobs_worker")
        if plain is not None and request.batch > len(rows):
            rest = replace(plain, batch=request.batch - len(rows))
            rows += await self._claim(conn, rest, "claim_jobs_worker")
        return rows

    async def _claim(
        self, conn: asyncpg.Connection, request: ClaimRequest, statement: str
    ) -> list[asyncpg.Record]:
        keyed = statement == "claim_keyed_jobs_worker"
        limits = [self._cluster_limits[t] for t in request.types]
        rates = [self._rate_limits[t] for t in request.types]
        arguments = (
            None,  # no term: every replica claims
            *_claim_arguments(request),
            limits,
            [r.starts if r else None for r in rates],
            [r.per if r else None for r in rates],
            *([request.key_limits] if keyed else []),
        )
        # Per-key counts, like cluster and rate limits, are exact only serialized.
        locked = [
            t
            for t, limit, rate in zip(request.types, limits, rates, strict=True)
            if limit is not None or rate is not None or keyed
        ]
        rows: list[asyncpg.Record]
        if not locked:  # no cluster-wide count to serialize: one statement, no transaction
            rows = await conn.fetch(self._queries[statement], *arguments, timeout=request.timeout)
            return rows
        async with conn.transaction():
            await conn.execute(
                self._queries["lock_types"], locked, self._schema, timeout=request.timeout
            )
            rows = await conn.fetch(self._queries[statement], *arguments, timeout=request.timeout)
        return rows

    async def claim_completing(
        self, conn: asyncpg.Connection, request: ClaimRequest, outcomes: tuple[object, ...]
    ) -> list[asyncpg.Record]:
        raise NotImplementedError("a worker's claim does not write outcomes (see claiming.py)")


def _claim_arguments(request: ClaimRequest) -> tuple[object, ...]:
    """claim_jobs' (and claim_jobs_worker's) $2 to $11."""
    return (
        request.owner,
        request.types,
        request.frees,
        request.batch,
        request.max_attempts,
        request.timeouts,
        request.number,
        request.hints,
        [at[0] if at else None for at in request.since],
        [at[1] if at else None for at in request.since],
    )
