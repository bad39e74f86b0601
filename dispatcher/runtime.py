"""Wiring of one replica: the only module that builds pools and starts services.

Always running: the notifier (dedicated connection), the elector, the completer, the
job heartbeat and the replica registry. While leading: the claim loop (in worker mode,
``mode=all``, it runs on every replica), the reaper, queue statistics and
backpressure, and the periodic scheduler, started on ``elected(term)`` and stopped on
``deposed``.

Graceful shutdown (SIGTERM/SIGINT): stop claiming and release leadership at once (the
next leader starts claiming while this one drains), wait up to ``shutdown_timeout``
for in-flight jobs, then cancel the rest and put them back to pending without
spending an attempt. A plain def executor's thread cannot be cancelled: its job is
handed back only once the thread has returned, or, when the runtime owns its process
(``dispatcher run``, ``exit_process`` given), right before the process exits, which
stops the thread for good. ``drained`` in the last log line is true only when no row
is left processing under this replica's owner id.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import asyncpg
import uvicorn

from dispatcher.core.app import App
from dispatcher.core.cancellation import awaiting, cancel_and_wait
from dispatcher.core.config import Settings
from dispatcher.core.database_errors import describe
from dispatcher.core.errors import DispatcherError
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.core.schema import SchemaNames
from dispatcher.database.migrate import check_schema_current, migrate_at
from dispatcher.http.api import build_api
from dispatcher.services.completer import Completer
from dispatcher.services.dispatch import Dispatcher
from dispatcher.services.elector import ElectionTiming, Elector, Role
from dispatcher.services.executor import Attempt, CancelReason, Outcome, OutcomeKind, thread_pool
from dispatcher.services.job_heartbeat import JobHeartbeat
from dispatcher.services.notifier import Notifier
from dispatcher.services.periodic import PeriodicScheduler
from dispatcher.services.queue_stats import QueueStats
from dispatcher.services.reaper import Reaper
from dispatcher.services.replicas import ReplicaRegistry, incarnation_id
from dispatcher.services.slots import Slots
from dispatcher.services.wakeup import Wakeup

VERSION = "0.1.0"
# Bounds on the parts of a graceful shutdown that wait on others (user code, the
# database), so SIGTERM always ends the process well inside Kubernetes' grace period.
SHUTDOWN_HOOK_TIMEOUT = 10.0
# How often the leader counts pending jobs (gauges, backpressure flags).
QUEUE_STATS_INTERVAL = 2.0
POOL_CLOSE_TIMEOUT = 5.0
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
        stopped any other way (see the module docstring)."""
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
        self._http: _HttpServer | None = None
        # The HTTP API; served by start() when serve_http, else reachable in-process.
        self.api = build_api(self, insecure_no_auth=insecure_no_auth)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        listener = self._listen() if self._serve_http else None
        self._pool = await _create_pool(self.dsn, s)
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

        self.threads = thread_pool(self._sync_threads())
        self.notifier = Notifier(
            s.election_dsn or self.dsn, listen=s.listen, log=get_logger("notifier")
        )
        # In dependency order: what wakes the claim loop; the slots it fills; the
        # completer that frees them; the heartbeat that keeps them alive; the claimer.
        self.wakeup = Wakeup()
        self.slots = Slots(self.app.executors, wakeup=self.wakeup, metrics=self.metrics)
        self.completer = Completer(
            self.pool, s.schema, self.owner_id, self.slots.release, metrics=self.metrics
        )
        self.heartbeat = JobHeartbeat(
            self.pool,
            s.schema,
            self.owner_id,
            self.slots,
            interval=s.heartbeat_interval,
            stale_after=s.stale_after,
            metrics=self.metrics,
            on_unstoppable=self._threads_unstoppable,
        )
        self.dispatcher = Dispatcher(
            pool=self.pool,
            app=self.app,
            schema=s.schema,
            owner_id=self.owner_id,
            slots=self.slots,
            wakeup=self.wakeup,
            deliver=self.completer.submit,
            threads=self.threads,
            is_leader=lambda: self.elector.is_leader(),
            metrics=self.metrics,
            concurrency=s.concurrency,
            poll_interval=s.poll_interval,
            claim_batch=s.claim_batch,
            mode=s.mode,
            can_claim=(lambda: not self._stopping) if s.mode == "all" else None,
            on_progress=self.heartbeat.progress_changed,
            # Past the heartbeat's give-up point the reaper may already have rescued it.
            start_within=self.heartbeat.give_up_after,
        )
        self.queue_stats = QueueStats(
            self.pool,
            s.schema,
            self.metrics,
            interval=QUEUE_STATS_INTERVAL,
            max_pending={t: spec.max_pending for t, spec in self.app.executors.items()},
        )
        self.periodic = PeriodicScheduler(self.pool, s.schema, list(self.app.schedules.values()))
        self.reaper = Reaper(
            self.pool,
            s.schema,
            self.app,
            stale_after=s.stale_after,
            interval=s.reaper_interval,
            replica_seen_within=max(s.stale_after, 3 * s.heartbeat_interval),
            unknown_type_grace=s.unknown_type_grace,
            retention_completed=s.retention_completed,
            retention_failed=s.retention_failed,
            metrics=self.metrics,
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
            metrics=self.metrics,
        )
        self.registry = ReplicaRegistry(
            self.pool,
            s.schema,
            owner_id=self.owner_id,
            name=s.replica_id,
            version=VERSION,
            role=lambda: self.role,
            job_types=sorted(self.app.executors),
            is_leader=self.elector.is_leader,
            interval=s.heartbeat_interval,
            prune_after=max(s.stale_after, 10 * s.heartbeat_interval),
        )
        self.notifier.subscribe(self.names.jobs_channel, lambda _: self.wakeup.wake("notify"))
        self.notifier.subscribe(self.names.cancel_channel, self._cancel_hinted)
        self.notifier.subscribe(self.names.control_channel, lambda _: self.wakeup.wake("control"))
        self.notifier.on_reconnect(lambda: self.wakeup.wake("reconnect"))
        self.metrics.init_series(self.app.executors, version=VERSION, replica=self.owner_id)

        for hook in self.app.startup_hooks:
            await hook()
        await self.registry.run_once()
        for name, run in (
            ("notifier", self.notifier.run),
            ("elector", self.elector.run),
            ("completer", self.completer.run),
            ("heartbeat", self.heartbeat.run),
            ("replicas", self.registry.run),
        ):
            self._tasks.always.append(self._supervised(name, run))
        if s.mode == "all":
            self.dispatcher.start_claiming()
        if listener is not None:
            self._http = _HttpServer(
                uvicorn.Config(self.api, log_config=None, access_log=False, lifespan="off")
            )
            self._tasks.always.append(
                asyncio.create_task(self._http.serve(sockets=[listener]), name="http")
            )
        self.log.info(
            "replica_started",
            owner=self.owner_id,
            schema=s.schema,
            types=sorted(self.app.executors),
            concurrency=self.dispatcher.limit,
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
        return {"global": self.dispatcher.limit, "types": dict(self.dispatcher.type_limits)}

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

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where the HTTP API listens (None unless serving)."""
        if self._http is None or not self._http.servers:
            return None
        address: tuple[str, int] = self._http.servers[0].sockets[0].getsockname()[:2]
        return address

    async def stop(self) -> None:
        """Graceful shutdown: release, drain, requeue what is left, close."""
        if self._stopping:
            return
        self._stopping = True
        s = self.settings
        self.log.info("shutdown_started", running=len(self.slots))
        watchdog = asyncio.create_task(self._report_stuck_shutdown(s.shutdown_timeout + 20))
        try:
            await self._stop(s)
        finally:
            watchdog.cancel()

    async def _report_stuck_shutdown(self, after: float) -> None:
        """A shutdown this slow is a bug: log where every task is waiting."""
        await asyncio.sleep(after)
        stacks = {task.get_name(): awaiting(task) for task in asyncio.all_tasks()}
        self.log.error("shutdown_stuck", after=after, tasks=stacks)

    async def _stop(self, s: Settings) -> None:
        await self.elector.release()
        if s.mode == "all":
            await self.dispatcher.step_down()
        await self._hand_back_unheld()
        if not await self.slots.drain(s.shutdown_timeout):
            cancelled = self.slots.cancel_all(CancelReason.SHUTDOWN)
            self.log.warning("shutdown_requeueing", jobs=cancelled)
            await self.slots.drain(SHUTDOWN_GRACE)
        if self.slots.threads_still_running() and self._exit_process is None:
            await self._wait_for_threads()
        if not await self.completer.flush(5.0):
            self.log.error("shutdown_outcomes_unwritten", outcomes=self.completer.backlog)
        for hook in self.app.shutdown_hooks:
            name = getattr(hook, "__qualname__", repr(hook))
            try:
                async with asyncio.timeout(SHUTDOWN_HOOK_TIMEOUT):
                    await hook()
            except TimeoutError:
                self.log.error("shutdown_hook_timed_out", hook=name, after=SHUTDOWN_HOOK_TIMEOUT)
            except Exception:
                self.log.exception("shutdown_hook_failed", hook=name)
        stuck = self.slots.threads_still_running()
        if stuck and self._exit_process is not None:
            await self._hand_back_and_exit(stuck, self._exit_process)
        if self._http is not None:
            self._http.should_exit = True
        await cancel_and_wait(self._tasks.leading)
        await cancel_and_wait(self._tasks.always)
        self.drained = await self._nothing_left_processing()
        await self.registry.remove()
        await self.notifier.close()
        if self._pool is not None:
            try:
                # close() waits for every borrowed connection; never wait forever.
                async with asyncio.timeout(POOL_CLOSE_TIMEOUT):
                    await self._pool.close()
            except TimeoutError:
                self.log.warning("pool_close_timed_out", after=POOL_CLOSE_TIMEOUT)
                self._pool.terminate()
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.log.info("shutdown_complete", drained=self.drained)

    async def _hand_back_unheld(self) -> None:
        """Rows a claim committed whose reply was lost: pending again (best effort; the
        reaper rescues what this cannot reach)."""
        try:
            async with asyncio.timeout(SHUTDOWN_HOOK_TIMEOUT):
                await self.dispatcher.hand_back_unheld()
        except Exception as exc:
            self.log.warning("shutdown_hand_back_failed", error=describe(exc))

    async def _wait_for_threads(self) -> None:
        """Without a process to end, a thread that ignores job.cancelled keeps its
        attempt live (heartbeated, not handed back) until it returns."""
        while True:
            running = self.slots.threads_still_running()
            if not running:
                return
            self.log.error(
                "shutdown_waiting_for_threads",
                job_ids=[a.job.id for a in running],
                hint="plain def executors should return when job.cancelled is set",
            )
            await self.slots.drain(SHUTDOWN_GRACE)

    async def _hand_back_and_exit(self, stuck: list[Attempt], exit_process: ExitProcess) -> None:
        """Hand the jobs of threads that will not stop back (due in HAND_BACK_DELAY),
        then end the process at once: its exit is what stops the threads."""
        for attempt in stuck:
            job = attempt.job
            self.completer.submit(
                Outcome(job.id, job.attempt, job.type, OutcomeKind.REQUEUE,
                        delay=HAND_BACK_DELAY, source=attempt)
            )  # fmt: skip
        written = await self.completer.flush(5.0)
        self.log.warning(
            "shutdown_exiting_with_threads_running",
            job_ids=[a.job.id for a in stuck],
            handed_back=written,
        )
        _flush_std_streams()
        exit_process(0)

    def _threads_unstoppable(self, attempts: list[Attempt]) -> None:
        """Heartbeat callback: cut off from the database, with threads that did not stop
        when told; the reaper may rescue their jobs soon."""
        job_ids = [a.job.id for a in attempts]
        if self._exit_process is None:
            self.log.critical(
                "sync_jobs_unstoppable",
                job_ids=job_ids,
                hint="the reaper may rescue these jobs while their threads still run; "
                "plain def executors should return when job.cancelled is set",
            )
            return
        self.log.critical("exiting_sync_jobs_unstoppable", job_ids=job_ids)
        _flush_std_streams()
        self._exit_process(EXIT_THREADS_UNSTOPPABLE)

    async def _nothing_left_processing(self) -> bool:
        """True when no row is processing under our owner id (False if unknown)."""
        try:
            async with self.pool.acquire(timeout=5) as conn:
                left: int = await conn.fetchval(
                    queries_for(self.settings.schema)["owned_processing_count"],
                    self.owner_id,
                    timeout=5,
                )
        except Exception as exc:
            self.log.warning("shutdown_check_failed", error=describe(exc))
            return False
        if left:
            self.log.warning("shutdown_left_jobs_processing", jobs=left)
        return left == 0

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
        if self.settings.mode == "leader":
            self.dispatcher.lead(term)
        for name, run in (
            ("reaper", self.reaper.run),
            ("queue_stats", self.queue_stats.run),
            ("periodic", self.periodic.run),
        ):
            self._tasks.leading.append(self._supervised(name, run))

    async def _deposed(self, reason: str) -> None:
        if self.settings.mode == "leader":
            await self.dispatcher.step_down()
        await cancel_and_wait(self._tasks.leading)
        self._tasks.leading.clear()
        self.periodic.forget()

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
                    restarts += 1
                    self.log.exception("service_crashed", service=name, restarts=restarts)
                    await asyncio.sleep(min(5.0, 0.1 * 2**restarts))

        return asyncio.create_task(supervise(), name=name)

    def _listen(self) -> socket.socket:
        """Bind the HTTP port ourselves, so a taken port is a clear error at start."""
        host, port = self.settings.http_host, self.settings.http_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise DispatcherError(
                f"cannot listen on {host}:{port} ({exc.strerror}); set DISPATCHER_HTTP_PORT"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    # --- helpers -------------------------------------------------------------------------

    def _sync_threads(self) -> int:
        limit = self.settings.concurrency or self.app.concurrency
        sync = [s for s in self.app.executors.values() if not s.is_async]
        return min(limit, sum(s.concurrency or limit for s in sync)) if sync else 1


class _HttpServer(uvicorn.Server):
    """uvicorn inside our event loop: the runtime owns SIGTERM/SIGINT (a graceful
    drain), so uvicorn must not install its own handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _flush_std_streams() -> None:
    """Before os._exit: log lines still buffered would be lost."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


async def _create_pool(dsn: str, s: Settings) -> asyncpg.Pool:
    """The runtime pool, with or without prepared statements (``prepared_statements``).

    With them (the default) asyncpg names and caches every statement, so each is parsed
    once per connection. The batch statements take arrays (unnest, = ANY) whose size a
    cached generic plan cannot know: after five runs Postgres switched to one that
    scanned a thousand-row batch 20x slower, so these sessions plan every run
    (plan_cache_mode, a fraction of a millisecond per batch).

    Without them, for PgBouncer in transaction mode (before 1.21 it cannot carry a named
    statement from one transaction to the next, and no version accepts a startup
    parameter it does not know, such as plan_cache_mode): statement_cache_size=0 makes
    asyncpg (0.29+) use the unnamed statement and send its Parse again with Bind,
    Execute and Sync, so one server connection runs the whole statement whichever one
    PgBouncer hands out after the Describe. Each unnamed statement is executed once,
    and Postgres plans a statement's first five executions with their parameters (a
    custom plan): plan_cache_mode is moot there (measured: docs/operations.md).
    """
    server_settings = {"application_name": "dispatcher"}
    options: dict[str, Any] = {"statement_cache_size": 0}
    if s.prepared_statements:
        server_settings["plan_cache_mode"] = "force_custom_plan"
        options = {}
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=s.pool_size,
            timeout=10,
            max_inactive_connection_lifetime=60,
            server_settings=server_settings,
            reset=_keep_session,
            **options,
        )
    except asyncpg.ProtocolViolationError as exc:
        # PgBouncer's answer to a startup parameter it does not pass on.
        if "startup parameter" not in str(exc):
            raise
        raise DispatcherError(
            f"the database refused a startup parameter ({exc}): DISPATCHER_DSN goes "
            "through a pooler such as PgBouncer; set DISPATCHER_PREPARED_STATEMENTS=false"
        ) from None
    return pool


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool reset: none. asyncpg's default sends RESET ALL, UNLISTEN *, ... on every
    release, a round trip per statement on the hot path; our pool connections never
    change session state (LISTEN and session locks live on the notifier's own
    connection), and asyncpg still rolls back a transaction left open."""
