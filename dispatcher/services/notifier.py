"""The replica's dedicated connection: LISTEN, and the session the elector leads on.

Session advisory locks and LISTEN need one long-lived session, which a transaction
pooler (PgBouncer) cannot give; so this connection is opened on its own, never taken
from a pool, and may use its own DSN (``election_dsn``) that bypasses the pooler.

The notifier keeps that connection alive: it connects, LISTENs on every subscribed
channel, and when the connection dies (server restart, network, ``pg_terminate_backend``)
reconnects with capped exponential backoff and full jitter, then tells its
subscribers so they can catch up on notifications they may have missed. TCP
keepalives are set on both ends so a silently dead peer is noticed in seconds, not
the kernel's default two hours.

Poll-only mode (``listen=False``, where LISTEN is not available at all): the connection
is kept for the elector, subscriptions are recorded but never LISTENed, so their
callbacks never run and the replica relies on its polls alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from dispatcher.core.cancellation import cancel_and_wait, wait_for_event
from dispatcher.core.log import get_logger
from dispatcher.core.retry import backoff_delay

NotificationCallback = Callable[[str], None]
ReconnectCallback = Callable[[], Awaitable[None] | None]

# Server side: the backend probes an idle client after 5 s, every 2 s, 3 times; a dead
# replica's session (and its advisory lock) is gone in ~11 s even without a FIN.
_SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "application_name": "dispatcher-elector",
}


def _set_client_keepalives(conn: asyncpg.Connection) -> None:
    """Client side keepalives (asyncpg has no option for them; set them on the socket)."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class Notifier:
    """Owns the dedicated connection; routes notifications to subscribers."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = 5.0,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        listen: bool = True,
    ) -> None:
        self._dsn = dsn
        self.listening = listen
        self._connect_timeout = connect_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._log = get_logger("notifier")
        self._subscribers: dict[str, list[NotificationCallback]] = {}
        self._on_reconnect: list[ReconnectCallback] = []
        self._on_disconnect: list[Callable[[], None]] = []
        self._conn: asyncpg.Connection | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.connections_made = 0

    # --- subscriptions --------------------------------------------------------------

    def subscribe(self, channel: str, callback: NotificationCallback) -> None:
        """Call ``callback(payload)`` for every NOTIFY on ``channel`` (from now on);
        never, in poll-only mode."""
        first = channel not in self._subscribers
        self._subscribers.setdefault(channel, []).append(callback)
        if not self.listening:
            return
        if first and self._conn is not None and not self._conn.is_closed():
            asyncio.get_running_loop().create_task(self._listen(self._conn, channel))

    def on_reconnect(self, callback: ReconnectCallback) -> None:
        """Call ``callback()`` after every reconnect (not the first connect)."""
        self._on_reconnect.append(callback)

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` as soon as the connection is lost or reset."""
        self._on_disconnect.append(callback)

    # --- connection -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def current(self) -> asyncpg.Connection | None:
        """The live connection, or None while there is none (never waits)."""
        return self._conn if self.connected else None

    async def connection(self, timeout: float | None = None) -> asyncpg.Connection:
        """The live connection, waiting (up to ``timeout``) while it reconnects."""
        while True:
            conn = self._conn
            if conn is not None:
                if not conn.is_closed():
                    return conn
                # Closed, but asyncpg runs our termination callback only on the next
                # loop iteration: mark it lost now, or the still-set event would send
                # us round this loop forever without yielding.
                self._mark_lost(conn)
            if not await wait_for_event(self._connected, timeout):
                raise TimeoutError(f"no database connection after {timeout}s")

    def reset(self, reason: str) -> None:
        """Drop the connection (the loop reconnects); used when it cannot be trusted."""
        conn = self._conn
        if conn is None:
            return
        self._log.warning("notifier_connection_reset", reason=reason)
        self._mark_lost(conn)
        if not conn.is_closed():
            conn.terminate()

    def _mark_lost(self, conn: asyncpg.Connection) -> None:
        # Only the current connection counts: a late termination callback from one we
        # already replaced must not tear down its successor.
        if conn is not self._conn:
            return
        self._conn = None
        self._connected.clear()
        self._lost.set()
        for callback in self._on_disconnect:
            callback()

    @property
    def closing(self) -> bool:
        """Set by close(); read through a property because other tasks change it."""
        return self._closing

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="notifier")

    async def close(self) -> None:
        self._closing = True
        self._lost.set()
        if self._task is not None:
            await cancel_and_wait([self._task])
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.close()
            if not conn.is_closed():
                conn.terminate()

    async def run(self) -> None:
        """Keep the connection up until close()."""
        failures = 0
        while not self._closing:
            try:
                conn = await self._connect()
            except Exception as exc:  # whatever a failed connect raises: try again
                failures += 1
                delay = backoff_delay(failures, self._backoff_base, self._backoff_cap)
                self._log.warning(
                    "notifier_connect_failed",
                    error=str(exc) or type(exc).__name__,
                    attempt=failures,
                    retry_in=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            reconnect = self.connections_made > 0
            self.connections_made += 1
            self._lost.clear()
            conn.add_termination_listener(self._mark_lost)
            self._conn = conn
            self._connected.set()
            self._log.info("notifier_connected", reconnect=reconnect)
            if reconnect:
                for callback in self._on_reconnect:
                    result = callback()
                    if result is not None:
                        await result
            await self._lost.wait()
            if self.closing:
                return
            self._log.warning("notifier_connection_lost")
            if not conn.is_closed():
                conn.terminate()

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            server_settings=_SERVER_KEEPALIVES,
            # Statements here are tiny and their timeouts are set per call.
            statement_cache_size=32,
        )
        try:
            _set_client_keepalives(conn)
            for channel in self._subscribers if self.listening else ():
                await self._listen(conn, channel)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _listen(self, conn: asyncpg.Connection, channel: str) -> None:
        def deliver(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            for callback in self._subscribers.get(channel, ()):
                try:
                    callback(payload)
                except Exception:
                    self._log.exception("notification_callback_failed", channel=channel)

        await conn.add_listener(channel, deliver)
