"""The replica's own database session: while it lives, the replica's process lives.

Why
---
Without it, the only sign that a replica died is silence: its jobs' heartbeats stop,
and the reaper rescues them after ``stale_after`` (30 s), counting them against their
types' limits until then. Postgres knows much sooner: when a process dies (kill -9,
OOM, the kernel closing its sockets) its sessions end at once.

How
---
Each replica opens one connection of its own (never from a pool, on the session DSN
that bypasses a transaction pooler, like the elector's) and takes on it the advisory
lock (``hashtext(session_lock_name)``, its backend pid), then records that pid, the
server's start time and its *async types* (types it runs with ``async def``
executors) on its replica row. The leader looks every quarter second for replica rows
whose recorded session no longer holds its lock on the same server run
(``orphaned_owners``); an owner found so for ``orphan_grace`` (1 s) has its
processing jobs of its async types rescued at once (``orphaned_jobs``).

The rule that keeps "never two live copies"
-------------------------------------------
A lock can be freed while its process still runs: someone terminated the session, or
the server's backends were all restarted after a crash. So the owner side keeps its
half of the rule: the moment this connection is lost, every async attempt the
replica holds is cancelled, and no claim starts anything while its row may still
record the lost session (an attempt claimed across the loss is handed back unrun):
until a new session is recorded, or the old one is struck from the row through the
pool (then the replica runs on the ``stale_after`` path until it has a new one). The
leader waits ``orphan_grace`` after first seeing the lock free, which leaves that
cancellation ample time. Attempts that cannot be stopped at once (plain
``def`` executors run in threads) are never rescued this way: they keep the
``stale_after`` path, as does every replica whose session is not recorded.

Where the lock's absence proves nothing, nothing is rescued early:

* another server run (a restart, a fail-over to a standby): ``session_server_started``
  differs from ``pg_postmaster_start_time()``, so no row qualifies;
* a client cut off by the network (no FIN): the server would end the session only
  when its TCP keepalives or user timeout give up, which this connection sets well
  past ``stale_after``; by then the owner has stopped its attempts itself (the job
  heartbeat's give-up) and the ``stale_after`` path applies anyway;
* a process paused (SIGSTOP, a long GC): its socket stays open, so does its session.

A pooler between the replica and Postgres (the session DSN through PgBouncer) would
tie the lock to a server connection whose life is the pooler's, not the process's
(kept after the replica died, or closed under a live one, or freed by its own
keepalives before the replica gave up). So the session must reach Postgres directly:
a connection whose backend pid differs from the one the server reports (a pooler
answers the startup with keys of its own) records nothing, and the replica keeps the
``stale_after`` path, saying so once (``replica_session_behind_a_pooler``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import asyncpg

from dispatcher.core.cancellation import wait_for_event
from dispatcher.core.database_errors import describe
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.core.retry import backoff_delay
from dispatcher.core.schema import SchemaNames
from dispatcher.services.executor import CancelReason
from dispatcher.services.slots import Slots

# Keepalive probes this many seconds apart, this many times, after stale_after idle.
_PROBE_INTERVAL = 5
_PROBES = 3


def session_server_settings(stale_after: float) -> dict[str, str]:
    """Settings of the session's backend: it must not end a silent client's session
    (freeing its lock) before that client has given up its attempts (stale_after)."""
    idle = math.ceil(stale_after)
    ends_after = idle + _PROBE_INTERVAL * _PROBES
    return {
        "application_name": "dispatcher-session",
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": str(_PROBE_INTERVAL),
        "tcp_keepalives_count": str(_PROBES),
        # Unacknowledged replies: give up no sooner than the keepalives would.
        "tcp_user_timeout": str(ends_after * 1000),
        "idle_session_timeout": "0",
        "client_connection_check_interval": "0",
    }


class ReplicaSession:
    """Holds this replica's session lock; cancels async attempts when it is lost."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        owner_id: str,
        *,
        async_types: list[str],
        slots: Slots,
        pool: asyncpg.Pool,
        on_claims_allowed: Callable[[], None],
        interval: float,
        stale_after: float,
        metrics: Metrics,
        connect_timeout: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._queries = queries_for(schema)
        self._lock_name = SchemaNames(schema).session_lock_name
        self._owner_id = owner_id
        self._async_types = sorted(async_types)
        self._slots = slots
        self._pool = pool
        self._on_claims_allowed = on_claims_allowed
        self._interval = interval
        self._server_settings = session_server_settings(stale_after)
        self._connect_timeout = connect_timeout
        self._metrics = metrics
        self._log = get_logger("session")
        self._closing = False
        self._forget: asyncio.Task[None] | None = None
        # The pid our row may record (from the moment it was sent): what a loss must
        # strike from it.
        self.recorded_pid: int | None = None
        # False while our row may record a lost session: the leader may rescue what
        # we hold, so claims start nothing. generation counts the sessions lost, so
        # a claim whose reply crossed a loss is recognised.
        self.claims_allowed = True
        self.generation = 0
        self.behind_a_pooler = False

    async def run(self) -> None:
        """Connect, lock, record; keep the row current; after a loss, start again.
        Cancelled at shutdown (after the drain): the session then ends quietly."""
        failures = 0
        try:
            while True:
                try:
                    conn = await self._connect()
                except Exception as exc:
                    failures += 1
                    delay = backoff_delay(failures, 0.05, 2.0)
                    self._log.warning(
                        "session_connect_failed", error=describe(exc), retry_in=round(delay, 3)
                    )
                    self._metrics.database_errors.labels(Service.SESSION).inc()
                    await asyncio.sleep(delay)
                    continue
                if conn is None:
                    self._behind_a_pooler()
                    return
                failures = 0
                try:
                    await self._keep(conn)
                finally:
                    if not conn.is_closed():
                        conn.terminate()
        except asyncio.CancelledError:
            self._closing = True
            if self._forget is not None:
                self._forget.cancel()
            raise

    async def _connect(self) -> asyncpg.Connection | None:
        """A session holding the lock; None if it goes through a pooler."""
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            server_settings=self._server_settings,
            statement_cache_size=8,
        )
        try:
            row = await conn.fetchrow(
                self._queries["session_lock"], self._lock_name, timeout=self._connect_timeout
            )
            assert row is not None
            if row["pid"] != conn.get_server_pid():
                await conn.close(timeout=self._connect_timeout)
                return None
            if not row["locked"]:  # only a session with our pid could hold it: none can
                raise RuntimeError("the session lock is held by another session")
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _behind_a_pooler(self) -> None:
        self.behind_a_pooler = True
        self._log.warning(
            "replica_session_behind_a_pooler",
            detail="the session DSN (DISPATCHER_ELECTION_DSN, else DISPATCHER_DSN) goes "
            "through a connection pooler: a dead replica's jobs are rescued after "
            "stale_after, not orphan_grace; point it straight at PostgreSQL to get that",
        )

    async def _keep(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()

        def on_lost(_conn: object) -> None:
            lost.set()
            if not self._closing:
                self._lose()

        conn.add_termination_listener(on_lost)
        pid = conn.get_server_pid()
        while not lost.is_set():
            # From the moment the statement is sent our row may name this session (it
            # can commit and the reply be lost): a loss from then on is the loss of a
            # recorded session.
            self.recorded_pid = pid
            try:
                row = await conn.fetchrow(
                    self._queries["session_record"],
                    self._owner_id,
                    self._async_types,
                    timeout=2 * self._interval,
                )
            except Exception as exc:
                if lost.is_set() or conn.is_closed():
                    break
                # A slow statement is no loss: the session and its lock still stand.
                self._log.warning("session_record_failed", error=describe(exc))
                self._metrics.database_errors.labels(Service.SESSION).inc()
            else:
                assert row is not None
                if row["registered"] and not lost.is_set():
                    if row["written"]:
                        self._log.info("session_recorded", pid=pid)
                    self._allow_claims()
            await wait_for_event(lost, self._interval)

    def _lose(self) -> None:
        """The session ended: Postgres freed its lock, so the leader may rescue our
        async attempts within orphan_grace. Stop them now; start nothing while our
        row may still record that session."""
        self.generation += 1
        cancelled = self._slots.cancel_all(CancelReason.SESSION_LOST, async_only=True)
        self._log.error("session_lost", attempts_cancelled=cancelled)
        if self.recorded_pid is None:
            return  # nothing recorded: nothing the leader could rescue early
        self.claims_allowed = False
        if self._forget is None or self._forget.done():
            self._forget = asyncio.get_running_loop().create_task(
                self._forget_lost(self.recorded_pid), name="session-forget"
            )

    async def _forget_lost(self, pid: int) -> None:
        """Strike the lost session from our row through the pool, unless a new one
        is recorded first: then claims may go on (on the stale_after path)."""
        failures = 0
        while self.recorded_pid == pid:
            try:
                async with self._pool.acquire(timeout=2 * self._interval) as conn:
                    await conn.execute(
                        self._queries["session_forget"],
                        self._owner_id,
                        pid,
                        timeout=2 * self._interval,
                    )
            except Exception as exc:
                failures += 1
                self._log.warning("session_forget_failed", error=describe(exc))
                await asyncio.sleep(backoff_delay(failures, 0.05, self._interval))
                continue
            if self.recorded_pid == pid:
                self.recorded_pid = None
                self._allow_claims()
            return

    def _allow_claims(self) -> None:
        if not self.claims_allowed:
            self.claims_allowed = True
            self._on_claims_allowed()
