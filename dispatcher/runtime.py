"""Wiring of one replica: the only module that builds pools and starts services.

Always running: the notifier (dedicated connection), the elector, the completer, the
job heartbeat and the replica registry. While leading: the claim loop (in worker mode,
``mode=all``, it runs on every replica), the reaper, queue statistics and
backpressure, and the periodic scheduler, started on ``elected(term)`` and stopped on
``deposed``.

Graceful shutdown (SIGTERM/SIGINT): stop claiming and release leadership at once (the
next leader starts claiming while this one drains), wait up to ``shutdown_timeout``
for in-flight jobs, then cancel the rest and put them back to pending without
spending an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import uvicorn

from dispatcher.api import build_api
from dispatcher.app import App
from dispatcher.cancellation import awaiting, cancel_and_wait
from dispatcher.completer import Completer
from dispatcher.config import Settings
from dispatcher.dispatch import Dispatcher
from dispatcher.elector import ElectionTiming, Elector, Role
from dispatcher.errors import DispatcherError
from dispatcher.executor import Attempt, CancelReason, thread_pool
from dispatcher.heartbeat import JobHeartbeat
from dispatcher.log import get_logger
from dispatcher.metrics import Metrics
from dispatcher.migrate import check_schema_current, migrate
from dispatcher.notifier import Notifier
from dispatcher.periodic import PeriodicScheduler
from dispatcher.queue_stats import QueueStats
from dispatcher.reaper import Reaper
from dispatcher.replicas import ReplicaRegistry, incarnation_id
from dispatcher.schema import SchemaNames

VERSION = "0.1.0"
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
    ) -> None:
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
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=s.pool_size,
            timeout=10,
            max_inactive_connection_lifetime=60,
            server_settings={
                "application_name": "dispatcher",
                # The batch statements take arrays (unnest, = ANY) whose size a cached
                # generic plan cannot know: after five runs Postgres switched to one
                # that scanned a thousand-row batch 20x slower. Planning each run
                # costs a fraction of a millisecond per batch.
                "plan_cache_mode": "force_custom_plan",
            },
            reset=_keep_session,
        )
        async with self.pool.acquire() as conn:
            if self._migrate:
                await migrate(
                    conn, s.schema, report=lambda line: self.log.info("migrated", detail=line)
                )
            await check_schema_current(conn, s.schema)

        self.threads = thread_pool(self._sync_threads())
        self.notifier = Notifier(s.election_dsn or self.dsn, log=get_logger("notifier"))
        attempts: dict[int, Attempt] = {}
        self.heartbeat = JobHeartbeat(
            self.pool,
            s.schema,
            self.owner_id,
            attempts,
            interval=s.heartbeat_interval,
            stale_after=s.stale_after,
            metrics=self.metrics,
        )
        self.dispatcher = Dispatcher(
            pool=self.pool,
            app=self.app,
            schema=s.schema,
            owner_id=self.owner_id,
            is_leader=lambda: self.elector.is_leader(),
            threads=self.threads,
            attempts=attempts,
            concurrency=s.concurrency,
            poll_interval=s.poll_interval,
            claim_batch=s.claim_batch,
            mode=s.mode,
            can_claim=(lambda: not self._stopping) if s.mode == "all" else None,
            on_progress=self.heartbeat.progress_changed,
            # Past the heartbeat's give-up point the reaper may already have rescued it.
            start_within=self.heartbeat.give_up_after,
            metrics=self.metrics,
        )
        # The completer frees the dispatcher's slots; the dispatcher feeds it outcomes.
        self.completer = Completer(
            self.pool, s.schema, self.owner_id, self.dispatcher.release, metrics=self.metrics
        )
        self.dispatcher.completer = self.completer
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
        self.notifier.subscribe(self.names.jobs_channel, lambda _: self.dispatcher.wake("notify"))
        self.notifier.subscribe(self.names.cancel_channel, self._cancel_requested)
        self.notifier.subscribe(
            self.names.control_channel, lambda _: self.dispatcher.wake("control")
        )
        self.notifier.on_reconnect(lambda: self.dispatcher.wake("reconnect"))
        self.metrics.info.labels(VERSION, self.owner_id).set(1)

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
        return self.dispatcher.running_by_type()

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
        self.log.info("shutdown_started", running=len(self.dispatcher.attempts))
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
        drained = await self.dispatcher.drain(s.shutdown_timeout)
        if not drained:
            cancelled = self.dispatcher.cancel_all(CancelReason.SHUTDOWN)
            self.log.warning("shutdown_requeueing", jobs=cancelled)
            drained = await self.dispatcher.drain(5.0)
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
        if self._http is not None:
            self._http.should_exit = True
        await cancel_and_wait(self._tasks.leading)
        await cancel_and_wait(self._tasks.always)
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
        self.log.info("shutdown_complete", drained=drained)

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
                self.dispatcher.cancel_all(CancelReason.SHUTDOWN)

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

    def _cancel_requested(self, payload: str) -> None:
        try:
            job_id = int(payload)
        except ValueError:
            self.log.warning("cancel_notification_ignored", payload=payload[:100])
            return
        if self.dispatcher.cancel(job_id, CancelReason.REQUESTED):
            self.log.info("job_cancel_requested", job_id=job_id)

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


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool reset: none. asyncpg's default sends RESET ALL, UNLISTEN *, ... on every
    release, a round trip per statement on the hot path; our pool connections never
    change session state (LISTEN and session locks live on the notifier's own
    connection), and asyncpg still rolls back a transaction left open."""
