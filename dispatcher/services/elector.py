"""Leader election: a session advisory lock, a lease row, and a fencing term.

States
------
    standby ──(lock acquired, term+1)──> leader ──(renewal failed | released)──> standby

* **standby**: every ``election_interval`` (0.5 s), and at once when the leader channel
  says a leader let go, try ``pg_try_advisory_lock(key)`` on the dedicated connection.
  Success bumps ``leader.term``, writes holder, backend pid and ``lease_until = now() +
  lease`` in the same statement. Failure checks the lease: if it lapsed on the
  database clock while the holder's session still holds the lock, the holder is hung
  or cut off (process paused, socket still open), so we ``pg_terminate_backend`` it
  and try again at once.
* **leader**: every ``heartbeat_interval`` (1 s) renew the lease with a statement
  scoped to our term, holder and session. A renewal that fails, errors or times out
  deposes us immediately: we can no longer know that we lead (Oban's rule). Deposing
  drops the connection, which releases the lock if the session still has it.
* **release** (shutdown): stop claiming, end the lease, unlock, then NOTIFY the leader
  channel (delivered at commit, after the unlock); a standby takes over within ms.

Trust window
------------
A leader trusts its leadership only until ``sent + lease - margin``, where ``sent`` is
when its last successful renewal was sent (our monotonic clock: the lease began no
earlier than that). A process paused past that point (SIGSTOP, a long GC) stops
claiming on waking before it has even talked to the database. The lease is measured
by standbys on the *database* clock only, so replica clock skew never matters.

Why renewals are scoped to a term
---------------------------------
The term is the fencing token. A standby that took over bumped it, so a deposed
leader's renewal matches no row and it learns it lost; its claims (which share-lock
the leader row and require their term) claim nothing; and completions are fenced by
owner and attempt. Two processes can never both act as leader of one term.

Trade-offs of the defaults
--------------------------
``election_interval`` 0.5 s bounds failover after a crash (Postgres drops the dead
session's lock at once; the next try wins). ``lease`` 10 s bounds failover after a
hang or partition (plus one election interval); a shorter lease reacts faster but
deposes a leader whose renewals are merely slow. ``heartbeat_interval`` 1 s keeps
renewals ten to a lease, so several may fail in a row... except that one failure
deposes, by design: a wrongly deposed leader costs one fast re-election; a wrongly
trusted one could double-run jobs.

Privilege: Postgres lets a role terminate backends of its own role, so replicas that
all log in as the same role need nothing more. Replicas with different login roles
need ``pg_signal_backend`` membership (and only a superuser may terminate a
superuser's backend). Without it the takeover is logged as
``leader_takeover_not_permitted`` (once) and the standby falls back to waiting: the
hung leader's lock is released when its connection finally dies (server-side TCP
keepalives, set on this connection, notice a dead host in about 11 s; a paused process
keeps its socket, so it resumes leading).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from dispatcher.core.cancellation import wait_for_event
from dispatcher.core.database_errors import DATABASE_TROUBLE
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import LeaderEvent, Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.core.schema import SchemaNames
from dispatcher.services.notifier import Notifier

OnElected = Callable[[int], Awaitable[None]]
OnDeposed = Callable[[str], Awaitable[None]]


class Role(enum.StrEnum):
    STANDBY = "standby"
    LEADER = "leader"


@dataclass(frozen=True)
class ElectionTiming:
    """Election intervals in seconds (see the module docstring for the trade-offs)."""

    election_interval: float = 0.5
    heartbeat_interval: float = 1.0
    lease: float = 10.0
    # How long pg_terminate_backend waits for a hung leader's backend to exit.
    terminate_wait: float = 2.0

    @property
    def statement_timeout(self) -> float:
        """A renewal or election statement slower than this counts as failed."""
        return max(self.lease / 4, 0.2)

    @property
    def trust_margin(self) -> float:
        return min(self.lease / 5, 1.0)


async def _noop_elected(_term: int) -> None:
    return None


async def _noop_deposed(_reason: str) -> None:
    return None


class Elector:
    """Contends for leadership of one schema on the notifier's dedicated connection.

    ``on_elected(term)`` and ``on_deposed(reason)`` are awaited in order, from the
    elector's own loop, so a deposition is always handled before the next election.
    """

    def __init__(
        self,
        notifier: Notifier,
        schema: str,
        owner_id: str,
        *,
        timing: ElectionTiming | None = None,
        on_elected: OnElected = _noop_elected,
        on_deposed: OnDeposed = _noop_deposed,
        metrics: Metrics,
    ) -> None:
        self.owner_id = owner_id
        self.timing = timing or ElectionTiming()
        self.role = Role.STANDBY
        self.term: int | None = None
        self._notifier = notifier
        self._names = SchemaNames(schema)
        self._queries = queries_for(schema)
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._metrics = metrics
        self._log = get_logger("elector", owner=owner_id)
        self._trusted_until = 0.0
        self._wake = asyncio.Event()
        self._stopping = False
        self._step_deadline = 3 * self.timing.statement_timeout + self.timing.terminate_wait
        self._takeover_refused_logged = False
        # One step at a time on the election connection: the release (at SIGTERM) waits
        # for a renewal or election in flight, as asyncpg refuses a second statement
        # beside it ("another operation is in progress"); and only after that step is it
        # known whether we lead.
        self._step_lock = asyncio.Lock()
        # The session we hold the lock on; any other session means we lost it.
        self._session: asyncpg.Connection | None = None
        notifier.subscribe(self._names.leader_channel, self._leader_released)
        notifier.on_disconnect(self._connection_lost)

    # --- what the rest of the runtime asks ---------------------------------------------

    def is_leader(self) -> bool:
        """True while we lead and our last renewal is within the trust window."""
        return self.role is Role.LEADER and time.monotonic() < self._trusted_until

    @property
    def stopping(self) -> bool:
        """Set by release(); a property because other tasks change it mid-loop."""
        return self._stopping

    # --- loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Contend and lead until :meth:`release` (or cancellation)."""
        while not self._stopping:
            self._wake.clear()
            started = time.monotonic()
            await self.run_once()
            if self.stopping:
                return
            interval = (
                self.timing.heartbeat_interval
                if self.role is Role.LEADER
                else self.timing.election_interval
            )
            remaining = interval - (time.monotonic() - started)
            if remaining > 0:
                await wait_for_event(self._wake, remaining)

    async def run_once(self) -> None:
        """One step: renew the lease if leading, else try to become leader."""
        async with self._step_lock:
            if not self._stopping:
                await self._step()

    async def _step(self) -> None:
        if self.role is Role.LEADER and self._notifier.current() is not self._session:
            await self._depose("database connection lost")
        try:
            conn = await self._notifier.connection(timeout=self.timing.statement_timeout)
        except TimeoutError:
            return
        try:
            # asyncpg bounds each statement; this bounds the whole step, whatever hangs.
            async with asyncio.timeout(self._step_deadline):
                if self.role is Role.LEADER:
                    await self._renew(conn)
                else:
                    await self._try_elect(conn)
        except DATABASE_TROUBLE as exc:
            reason = f"database error: {str(exc) or type(exc).__name__}"
            self._metrics.database_errors.labels(Service.ELECTOR).inc()
            # A failed statement may have taken the lock without recording the term
            # (session locks survive rollback): only a fresh session is trustworthy.
            self._notifier.reset(reason)
            if self.role is Role.LEADER:
                await self._depose(reason)
            else:
                self._log.warning("election_attempt_failed", error=reason)

    async def release(self) -> None:
        """Stop contending; if leading, hand over at once (unlock + NOTIFY)."""
        self._stopping = True
        self._wake.set()
        async with self._step_lock:
            await self._hand_over()

    async def _hand_over(self) -> None:
        if self.role is not Role.LEADER or self.term is None:
            return
        term = self.term
        await self._set_standby("released")
        try:
            conn = await self._notifier.connection(timeout=self.timing.statement_timeout)
            await conn.fetchrow(
                self._queries["leader_release"],
                term,
                self.owner_id,
                self._names.leader_lock_name,
                self._names.leader_channel,
                timeout=self.timing.statement_timeout,
            )
            self._log.info("leader_released", term=term)
        except DATABASE_TROUBLE as exc:
            # Dropping the session releases the lock too, just without the NOTIFY.
            self._notifier.reset(f"release failed: {exc}")
            self._log.warning("leader_release_failed", term=term, error=str(exc))

    # --- steps -------------------------------------------------------------------------

    async def _try_elect(self, conn: asyncpg.Connection) -> None:
        if await self._attempt(conn):
            return
        try:
            row = await conn.fetchrow(
                self._queries["leader_terminate_expired"],
                self._names.leader_lock_name,
                int(self.timing.terminate_wait * 1000),
                timeout=self.timing.statement_timeout + self.timing.terminate_wait,
            )
        except asyncpg.InsufficientPrivilegeError as exc:
            self._takeover_not_permitted(exc)
            return
        if row is None:
            return
        self._log.warning(
            "leader_takeover_terminated_backend",
            hung_holder=row["holder"],
            backend_pid=row["backend_pid"],
            hung_term=row["term"],
            exited=row["terminated"],
        )
        self._metrics.leader_takeovers.inc()
        await self._attempt(conn)

    def _takeover_not_permitted(self, exc: Exception) -> None:
        if self._takeover_refused_logged:
            return
        self._takeover_refused_logged = True
        self._log.error(
            "leader_takeover_not_permitted",
            error=str(exc),
            hint="replicas logging in as different roles need GRANT pg_signal_backend "
            "(a superuser's backend needs a superuser); until then standbys wait for the "
            "hung leader's connection to die",
        )

    async def _attempt(self, conn: asyncpg.Connection) -> bool:
        sent = time.monotonic()
        row = await conn.fetchrow(
            self._queries["leader_try_elect"],
            self._names.leader_lock_name,
            self.owner_id,
            self.timing.lease,
            timeout=self.timing.statement_timeout,
        )
        if row is None:
            return False
        self._session = conn
        await self._set_leader(row["term"], sent)
        return True

    async def _renew(self, conn: asyncpg.Connection) -> None:
        sent = time.monotonic()
        row = await conn.fetchrow(
            self._queries["leader_renew"],
            self.term,
            self.owner_id,
            self.timing.lease,
            timeout=self.timing.statement_timeout,
        )
        if row is None:
            self._notifier.reset("lease renewal found another leader")
            await self._depose("lease taken over by another replica")
            return
        self._trusted_until = sent + self.timing.lease - self.timing.trust_margin

    # --- transitions ---------------------------------------------------------------------

    async def _set_leader(self, term: int, sent: float) -> None:
        self.role = Role.LEADER
        self.term = term
        self._trusted_until = sent + self.timing.lease - self.timing.trust_margin
        self._takeover_refused_logged = False
        self._log.info("leader_elected", term=term)
        self._metrics.is_leader.set(1)
        self._metrics.leader_term.set(term)
        self._metrics.leader_transitions.labels(LeaderEvent.ELECTED).inc()
        await self._on_elected(term)

    async def _set_standby(self, reason: str) -> None:
        term, self.term = self.term, None
        self.role = Role.STANDBY
        self._session = None
        self._trusted_until = 0.0
        log = self._log.info if reason == "released" else self._log.warning
        log("leader_deposed", term=term, reason=reason)
        self._metrics.is_leader.set(0)
        self._metrics.leader_transitions.labels(LeaderEvent.DEPOSED).inc()
        await self._on_deposed(reason)

    async def _depose(self, reason: str) -> None:
        if self.role is Role.LEADER:
            await self._set_standby(reason)

    # --- notifier callbacks ----------------------------------------------------------------

    def _leader_released(self, _payload: str) -> None:
        self._wake.set()

    def _connection_lost(self) -> None:
        # Without the session we no longer hold the lock: stop trusting at once, and
        # let the loop run the deposition callbacks right away.
        if self.role is Role.LEADER:
            self._trusted_until = 0.0
        self._wake.set()
