"""Wiring of one replica: the only module that builds pools and starts services.

Built in dependency order, each service given its collaborators at construction:
what wakes the claim loop (:class:`Wakeup`), the slots it fills (:class:`Slots`),
the completer that frees them, the drain that lets go of them, the job heartbeat
that keeps them alive, the dispatcher that claims into them (in its claim mode:
:mod:`dispatcher.services.claiming`), then the leader's housekeeping and the elector.

Always running: the notifier (dedicated connection), the elector, the completer, the
job heartbeat and the replica registry. While leading: the reaper, queue statistics
and backpressure, and the periodic scheduler, started on ``elected(term)`` and
stopped on ``deposed``; the dispatcher claims as its mode says (the leader only, or
every replica from the start).

Graceful shutdown (SIGTERM/SIGINT): stop claiming and release leadership at once (the
next leader starts claiming while this one drains), then let go of the attempts
(:mod:`dispatcher.services.draining`). ``drained`` in the last log line is true only
when no row is left processing under this replica's owner id.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from dispatcher.core.app import App
from dispatcher.core.cancellation import awaiting, cancel_and_wait, raise_if_cancel_requested
from dispatcher.core.config import Settings
from dispatcher.core.database_errors import describe
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.core.retry import backoff_delay
from dispatcher.core.schema import SchemaNames
from dispatcher.core.version import VERSION
from dispatcher.database.migrate import check_schema_current, migrate_at
from dispatcher.database.pool import cycle_pool, runtime_pool
from dispatcher.http.app import build_api
from dispatcher.http.serving import HttpServer, listen
from dispatcher.services.claiming import ClaimMode, LeaderClaims, WorkerClaims
from dispatcher.services.completer import Completer
from dispatcher.services.dependencies import DependencyResults
from dispatcher.services.dispatch import Dispatcher
from dispatcher.services.draining import Drain, ExitProcess
from dispatcher.services.elector import ElectionTiming, Elector, Role
from dispatcher.services.executor import CancelReason, thread_pool
from dispatcher.services.job_heartbeat import JobHeartbeat
from dispatcher.services.notifier import Notifier
from dispatcher.services.periodic import PeriodicScheduler
from dispatcher.services.queue_stats import QueueStats
from dispatcher.services.reaper import Reaper
from dispatcher.services.replica_session import ReplicaSession
from dispatcher.services.replicas import ReplicaRegistry, incarnation_id
from dispatcher.services.slots import Slots
from dispatcher.services.wakeup import Wakeup

# Bounds on the parts of a graceful shutdown that wait on others (user code, the
# database), so SIGTERM always ends the process well inside Kubernetes' grace period.
SHUTDOWN_HOOK_TIMEOUT = 10.0
# How often the leader counts pending jobs (gauges, backpressure flags).
QUEUE_STATS_INTERVAL = 2.0
POOL_CLOSE_TIMEOUT = 5.0


@dataclass
class _Tasks:
    always: list[asyncio.Task[Any]] = field(default_factory=list)
    leading: list[asyncio.Task[Any]] = field(default_factory=list)


class Runtime:
    """One dispatcher replica. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        *,
        dsn: str,
        metrics: Metrics | None = None,
        migrate_schema: bool = False,
        owner_id: str | None = None,
        serve_http: bool = False,
        insecure_no_auth: bool = False,
        exit_process: ExitProcess | None = None,
    ) -> None:
        """``exit_process``: given when this runtime owns its process (``dispatcher
        run``); called to end the process when a plain def executor's thread cannot be
        stopped any other way (see dispatcher.services.draining)."""
        self.app = app
        self.settings = settings
        self.dsn = dsn
        self.metrics = metrics or Metrics()
        self.owner_id = owner_id or incarnation_id(settings.replica_id)
        self.names = SchemaNames(settings.schema)
        self.log = get_logger("runtime")
        self.version = VERSION
        self.started_at = time.monotonic()
        self._migrate = migrate_schema
        self._serve_http = serve_http
        self._exit_process = exit_process
        self.drained: bool | None = None  # set by stop()
        self._tasks = _Tasks()
        self._stopping = False
        self._pool: asyncpg.Pool | None = None
        # A slot's cycle planned once (None: on _pool; see database/pool.py).
        self._cycle_pool: asyncpg.Pool | None = None
        self._http: HttpServer | None = None
        # The HTTP API; served by start() when serve_http, else reachable in-process.
        self.api = build_api(self, insecure_no_auth=insecure_no_auth)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        listener = listen(s.http_host, s.http_port) if self._serve_http else None
        await self._open_database()
        self._build_job_path()
        self._build_leader_duties()
        self._subscribe()
        self.metrics.init_series(self.app.executors, version=VERSION, replica=self.owner_id)
        for hook in self.app.startup_hooks:
            await hook()
        await self.registry.run_once()
        if self.session is not None:
            self._tasks.always.append(self._supervised("session", self.session.run))
        for name, run in (
            ("notifier", self.notifier.run),
            ("elector", self.elector.run),
            ("completer", self.completer.run),
            ("heartbeat", self.heartbeat.run),
            ("replicas", self.registry.run),
        ):
            self._tasks.always.append(self._supervised(name, run))
        self.dispatcher.start()
        if listener is not None:
            self._http = HttpServer(self.api)
            self._tasks.always.append(
                asyncio.create_task(self._http.serve(sockets=[listener]), name="http")
            )
        self._log_started()

    async def _open_database(self) -> None:
        s = self.settings
        self._pool = await runtime_pool(self.dsn, s)
        self._cycle_pool = await cycle_pool(self.dsn, s)
        if self._migrate:
            # Migrations hold a session advisory lock: on the session DSN, never through
            # a transaction pooler.
            await migrate_at(
                s.election_dsn or self.dsn,
                s.schema,
                report=lambda line: self.log.info("migrated", detail=line),
            )
        async with self.pool.acquire() as conn:
            await check_schema_current(conn, s.schema)

    def _build_job_path(self) -> None:
        """What a job meets, built in dependency order."""
        s, pool, metrics = self.settings, self.pool, self.metrics
        limits = self.app.limits(s.concurrency)
        self.threads = thread_pool(limits.sync_threads)
        self.notifier = Notifier(s.election_dsn or self.dsn, listen=s.listen)
        self.wakeup = Wakeup()
        self.slots = Slots(self.app.executors, wakeup=self.wakeup, metrics=metrics)
        self.completer = Completer(
            self._cycle_pool or pool, s.schema, self.owner_id, self.slots.release, metrics=metrics
        )
        self.drain = Drain(
            self.slots,
            self.completer,
            schema=s.schema,
            owner_id=self.owner_id,
            exit_process=self._exit_process,
        )
        self.session = (
            ReplicaSession(
                s.election_dsn or self.dsn,
                s.schema,
                self.owner_id,
                async_types=[t for t, spec in self.app.executors.items() if spec.is_async],
                slots=self.slots,
                pool=pool,
                on_claims_allowed=lambda: self.wakeup.wake("session"),
                interval=s.heartbeat_interval,
                stale_after=s.stale_after,
                metrics=metrics,
            )
            if s.replica_sessions
            else None
        )
        self.heartbeat = JobHeartbeat(
            pool,
            s.schema,
            self.owner_id,
            self.slots,
            interval=s.heartbeat_interval,
            stale_after=s.stale_after,
            metrics=metrics,
            on_unstoppable=self.drain.threads_unstoppable,
        )
        self.dispatcher = Dispatcher(
            pool=pool,
            cycle_pool=self._cycle_pool,
            app=self.app,
            schema=s.schema,
            owner_id=self.owner_id,
            mode=self._claim_mode(),
            slots=self.slots,
            wakeup=self.wakeup,
            deliver=self.completer.submit,
            threads=self.threads,
            metrics=metrics,
            concurrency=s.concurrency,
            poll_interval=s.poll_interval,
            claim_batch=s.claim_batch,
            on_progress=self.heartbeat.progress_changed,
            # Past the heartbeat's give-up point the reaper may already have rescued it.
            start_within=self.heartbeat.give_up_after,
            session=self.session,
            dependencies=DependencyResults(pool, s.schema),
            otel=s.otel,
        )
        # A batch of outcomes carries the claim of the slots it frees, when one is wanted.
        self.completer.write_with_claim = self.dispatcher.write_with_claim

    def _claim_mode(self) -> ClaimMode:
        queries = queries_for(self.settings.schema)
        if self.settings.mode == "all":
            return WorkerClaims(self.app, queries, self.settings.schema, lambda: not self._stopping)
        return LeaderClaims(self.app, queries, self.owner_id, lambda: self.elector.is_leader())

    def _build_leader_duties(self) -> None:
        """The leader's housekeeping, the elector that decides who leads, the registry."""
        s, pool, metrics = self.settings, self.pool, self.metrics
        self.queue_stats = QueueStats(
            pool,
            s.schema,
            metrics,
            interval=QUEUE_STATS_INTERVAL,
            max_pending={t: spec.max_pending for t, spec in self.app.executors.items()},
        )
        self.periodic = PeriodicScheduler(
            pool, s.schema, list(self.app.schedules.values()), metrics
        )
        self.reaper = Reaper(
            pool,
            s.schema,
            self.app,
            stale_after=s.stale_after,
            interval=s.reaper_interval,
            replica_seen_within=max(s.stale_after, 3 * s.heartbeat_interval),
            unknown_type_grace=s.unknown_type_grace,
            retention_completed=s.retention_completed,
            retention_failed=s.retention_failed,
            orphan_grace=s.orphan_grace,
            on_rescued=lambda: self.wakeup.wake("rescue"),
            metrics=metrics,
        )
        self.elector = Elector(
            self.notifier,
            s.schema,
            self.owner_id,
            timing=ElectionTiming(
                election_interval=s.election_interval,
                heartbeat_interval=s.heartbeat_interval,
                lease=s.lease,
            ),
            on_elected=self._elected,
            on_deposed=self._deposed,
            metrics=metrics,
        )
        self.registry = ReplicaRegistry(
            pool,
            s.schema,
            owner_id=self.owner_id,
            name=s.replica_id,
            version=VERSION,
            role=lambda: self.role,
            job_types=sorted(self.app.executors),
            is_leader=self.elector.is_leader,
            interval=s.heartbeat_interval,
            prune_after=max(s.stale_after, 10 * s.heartbeat_interval),
            metrics=metrics,
        )

    def _subscribe(self) -> None:
        notifier, names, wakeup = self.notifier, self.names, self.wakeup
        notifier.subscribe(names.jobs_channel, self._jobs_inserted)
        notifier.subscribe(names.cancel_channel, self._cancel_hinted)
        notifier.subscribe(names.control_channel, lambda _: wakeup.wake("control"))
        notifier.on_reconnect(lambda: wakeup.wake("reconnect"))

    def _log_started(self) -> None:
        s = self.settings
        self.log.info(
            "replica_started",
            owner=self.owner_id,
            schema=s.schema,
            types=sorted(self.app.executors),
            concurrency=self.dispatcher.limits.global_limit,
            listen=s.listen,
            prepared_statements=s.prepared_statements,
        )
        if not s.listen:
            self.log.info(
                "poll_only_mode",
                detail="DISPATCHER_LISTEN=false: no LISTEN; new jobs are seen on the poll "
                "tick, cancel requests on the job heartbeat, a released leadership on the "
                "election interval",
                poll_interval=s.poll_interval,
                heartbeat_interval=s.heartbeat_interval,
                election_interval=s.election_interval,
            )

    # --- what the API and operators read ------------------------------------------------

    @property
    def role(self) -> str:
        return Role.LEADER.value if self.elector.is_leader() else Role.STANDBY.value

    @property
    def term(self) -> int | None:
        return self.elector.term if self.elector.is_leader() else None

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the runtime is not started")
        return self._pool

    def running_by_type(self) -> dict[str, int]:
        return self.slots.running_by_type()

    def claiming_problem(self) -> str | None:
        """Why the claim loop cannot start, while it cannot (readiness)."""
        return self.dispatcher.preparing_failed

    def limits(self) -> dict[str, Any]:
        limits = self.dispatcher.limits
        return {
            "global": limits.global_limit,
            "types": dict(limits.per_type),
            "rates": {
                spec.type: {"starts": spec.rate_limit.starts, "per": spec.rate_limit.per}
                for spec in self.app.executors.values()
                if spec.rate_limit is not None
            },
        }

    def status_extras(self) -> dict[str, Any]:
        next_runs = self.periodic.next_runs
        return {
            "mode": self.settings.mode,
            "paused": sorted(self.dispatcher.paused),
            "schedules": [
                {
                    "name": p.name,
                    "cron": p.cron,
                    "timezone": p.timezone,
                    "type": p.type,
                    "next_run_at": next_runs[p.name].isoformat() if p.name in next_runs else None,
                }
                for p in self.app.schedules.values()
            ],
        }

    # --- shutdown ----------------------------------------------------------------------

    async def stop(self) -> None:
        """Graceful shutdown: release, drain, requeue what is left, close."""
        if self._stopping:
            return
        self._stopping = True
        s = self.settings
        self.log.info("shutdown_started", running=len(self.slots))
        watchdog = asyncio.create_task(self._report_stuck_shutdown(s.shutdown_timeout + 20))
        try:
            await self._stop_claiming()
            await self.drain.attempts(s.shutdown_timeout)
            await self._run_shutdown_hooks()
            await self.drain.hand_back_and_exit()
            await self._stop_services()
            self.drained = await self.drain.nothing_left_processing(self.pool)
            await self._close()
        finally:
            watchdog.cancel()
        self.log.info("shutdown_complete", drained=self.drained)

    async def _report_stuck_shutdown(self, after: float) -> None:
        """A shutdown this slow is a bug: log where every task is waiting."""
        await asyncio.sleep(after)
        stacks: dict[str, list[str]] = {}
        for task in asyncio.all_tasks():
            # Two tasks of one name (a claim loop and its successor) must both show.
            name = task.get_name()
            stacks[f"{name} #{id(task):x}" if name in stacks else name] = awaiting(task)
        self.log.error("shutdown_stuck", after=after, tasks=stacks)

    async def _stop_claiming(self) -> None:
        """Hand leadership over at once (the deposition stops a leader's claims), stop
        a worker's claims, and hand back rows a lost claim took (best effort: the reaper
        rescues what this cannot reach)."""
        await self.elector.release()
        await self.dispatcher.stop()
        try:
            async with asyncio.timeout(SHUTDOWN_HOOK_TIMEOUT):
                await self.dispatcher.hand_back_unheld()
        except Exception as exc:
            self.log.warning("shutdown_hand_back_failed", error=describe(exc))

    async def _run_shutdown_hooks(self) -> None:
        for hook in self.app.shutdown_hooks:
            name = getattr(hook, "__qualname__", repr(hook))
            try:
                async with asyncio.timeout(SHUTDOWN_HOOK_TIMEOUT):
                    await hook()
            except TimeoutError:
                self.log.error("shutdown_hook_timed_out", hook=name, after=SHUTDOWN_HOOK_TIMEOUT)
            except Exception:
                self.log.exception("shutdown_hook_failed", hook=name)

    async def _stop_services(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
        await cancel_and_wait(self._tasks.leading)
        await cancel_and_wait(self._tasks.always)

    async def _close(self) -> None:
        await self.registry.remove()
        await self.notifier.close()
        pools = [pool for pool in (self._cycle_pool, self._pool) if pool is not None]
        try:
            # close() waits for every borrowed connection; never wait forever.
            async with asyncio.timeout(POOL_CLOSE_TIMEOUT):
                await asyncio.gather(*(pool.close() for pool in pools))
        except TimeoutError:
            self.log.warning("pool_close_timed_out", after=POOL_CLOSE_TIMEOUT)
            for pool in pools:
                pool.terminate()
        self.threads.shutdown(wait=False, cancel_futures=True)

    async def run_until_signalled(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then shut down gracefully. A second
        signal skips the drain: in-flight jobs are put back to pending at once."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals
            signals += 1
            self.log.info("signal_received", signal=sig.name)
            if signals == 1:
                stop.set()
            else:
                self.slots.cancel_all(CancelReason.SHUTDOWN)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # --- leadership ------------------------------------------------------------------------

    async def _elected(self, term: int) -> None:
        if self._stopping:
            return
        self.dispatcher.elected(term)
        for name, run in (
            ("reaper", self.reaper.run),
            ("orphan_watch", self.reaper.watch_orphans),
            ("queue_stats", self.queue_stats.run),
            ("periodic", self.periodic.run),
        ):
            self._tasks.leading.append(self._supervised(name, run))

    async def _deposed(self, reason: str) -> None:
        await self.dispatcher.deposed()
        await cancel_and_wait(self._tasks.leading)
        self._tasks.leading.clear()
        self.periodic.forget()

    def _jobs_inserted(self, payload: str) -> None:
        """An insert NOTIFY: claim now, from the start for the types it names as late
        (see claim_cursors.py)."""
        self.dispatcher.cursors.heard(payload)
        self.wakeup.wake("notify")

    def _cancel_hinted(self, payload: str) -> None:
        """A cancel NOTIFY is a hint, not an order: anyone may send one. If it names a
        job we run, heartbeat now; the row's cancel_requested decides."""
        try:
            job_id = int(payload)
        except ValueError:
            self.log.warning("cancel_notification_ignored", payload=payload[:100])
            return
        if self.slots.holds_job(job_id):
            self.heartbeat.beat_soon()

    def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run a service for good: one that dies of an unexpected error is logged with
        its traceback and started again, so no bug in one service silently stops
        another replica duty (a dead elector would never notice it was deposed)."""

        async def supervise() -> None:
            restarts = 0
            while True:
                try:
                    await run()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    raise_if_cancel_requested()
                    restarts += 1
                    self.log.exception("service_crashed", service=name, restarts=restarts)
                    await asyncio.sleep(backoff_delay(restarts, 0.1, 5.0))

        return asyncio.create_task(supervise(), name=name)
