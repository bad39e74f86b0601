"""A PostgreSQL-aware TCP proxy, run in the test's event loop, to put a statement's
reply in flight at a moment the test chooses.

``hold_replies(to=...)``: from then on, a connection that executes a statement whose
SQL contains ``to`` has the server's replies kept back (the statement still runs, and
commits), until ``release_replies()`` delivers them or ``cut()`` drops every connection
with them. Statement preparation (Parse/Describe), other statements and connection
start-up are never held, so the rest of the replica goes on as usual.

The proxy answers SSL and GSS encryption requests with "no" itself, so the protocol
stays readable (the servers tests use accept plain connections from 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

from dispatcher.core.cancellation import cancel_and_wait

_ENCRYPTION_REQUESTS = {80877103, 80877104}  # SSLRequest, GSSENCRequest


class _Connection:
    """One client connection: where its client stream is, and whether it is held."""

    def __init__(self) -> None:
        self.started = False  # past the start-up packet
        self.pending = b""
        self.held = False
        self.statements: dict[bytes, bytes] = {}  # prepared statement name -> SQL
        self.bound = b""  # SQL of the statement the last Bind referred to

    def read_client(self, data: bytes) -> tuple[bytes, bool, list[bytes]]:
        """Split what the client sent: (bytes to forward, whether an encryption request
        was answered "no" here, the SQL of each statement executed)."""
        self.pending += data
        forward = b""
        refused = False
        executed: list[bytes] = []
        while True:
            if not self.started:
                if len(self.pending) < 8:
                    break
                length = int.from_bytes(self.pending[:4], "big")
                code = int.from_bytes(self.pending[4:8], "big")
                if len(self.pending) < length:
                    break
                packet, self.pending = self.pending[:length], self.pending[length:]
                if code in _ENCRYPTION_REQUESTS:
                    refused = True
                    continue
                self.started = True
                forward += packet
            else:
                if len(self.pending) < 5:
                    break
                length = int.from_bytes(self.pending[1:5], "big")
                if len(self.pending) < 1 + length:
                    break
                kind, body = self.pending[:1], self.pending[5 : 1 + length]
                if kind == b"P":  # Parse: statement name, SQL
                    name, sql = body.split(b"\0")[:2]
                    self.statements[name] = sql
                elif kind == b"B":  # Bind: portal name, statement name
                    self.bound = self.statements.get(body.split(b"\0")[1], b"")
                elif kind == b"E":
                    executed.append(self.bound)
                elif kind == b"Q":  # a simple query carries its SQL
                    executed.append(body)
                forward += self.pending[: 1 + length]
                self.pending = self.pending[1 + length :]
        return forward, refused, executed


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the server of ``dsn``."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"the proxy needs a host:port DSN, got {dsn!r}")
        self._dsn = parts
        self._target = (parts.hostname, parts.port)
        self._server: asyncio.Server | None = None
        self._holding: bytes | None = None  # held: replies to SQL containing this
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()
        self.held_replies = 0  # replies kept back right now

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def dsn(self) -> str:
        """The DSN that goes through the proxy."""
        assert self._server is not None, "start() first"
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._dsn.netloc.rsplit("@", 1)
        userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
        return urlunsplit(self._dsn._replace(netloc=f"{userinfo}127.0.0.1:{port}"))

    def hold_replies(self, to: str) -> None:
        """Keep back the replies to statements containing ``to`` executed from now on
        (and whatever follows them on the same connection)."""
        self._holding = to.encode()
        self._forwarding.clear()

    def release_replies(self) -> None:
        """Deliver what was held, and forward everything again."""
        self._holding = None
        self._forwarding.set()

    async def cut(self) -> None:
        """Drop every connection (both sides), and the replies held with them; new
        connections are forwarded normally."""
        self._holding = None
        writers, self._writers = self._writers, []
        pumps, self._pumps = set(self._pumps), set()
        await cancel_and_wait(pumps)
        for writer in writers:
            writer.transport.abort()
        self.held_replies = 0
        self._forwarding.set()

    async def close(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers += [writer, up_writer]
        connection = _Connection()
        loop = asyncio.get_running_loop()
        for pump in (
            self._from_client(connection, reader, writer, up_writer),
            self._from_server(connection, up_reader, writer),
        ):
            task = loop.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _from_client(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        server: asyncio.StreamWriter,
    ) -> None:
        try:
            while data := await reader.read(65536):
                forward, refused, executed = connection.read_client(data)
                if refused:
                    client.write(b"N")
                holding = self._holding
                if holding is not None and any(holding in sql for sql in executed):
                    connection.held = True
                if forward:
                    server.write(forward)
                    await server.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                server.close()

    async def _from_server(
        self, connection: _Connection, reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                if connection.held and not self._forwarding.is_set():
                    self.held_replies += 1
                    await self._forwarding.wait()
                    self.held_replies = 0
                connection.held = False
                client.write(data)
                await client.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                client.close()
