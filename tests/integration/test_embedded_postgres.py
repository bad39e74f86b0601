"""The embedded server's port: chosen where no client can take it, and kept on restart.

A test that stops its private server and starts it again (readiness, database loss,
failover) holds a DSN naming the server's port. A port from the kernel's ephemeral
range could be handed to some client's outgoing connection while the server was down;
the restart then moved the server to another port and the test waited for a server
that never came back (a CI run timed out that way).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dispatcher.core.errors import EmbeddedPostgresUnavailable
from dispatcher.database.embedded import EmbeddedPostgres
from dispatcher.database.ports import LISTEN_PORT_FLOOR, ephemeral_range
from tests.support.private_postgres import private_postgres


@contextmanager
def client_connection_from(port: int) -> Iterator[None]:
    """An outgoing connection whose local end is 127.0.0.1:``port``, as the kernel
    gives a client when ``port`` lies in its ephemeral range."""
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.bind(("127.0.0.1", port))
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        with accepted:
            yield


def test_a_new_server_listens_below_the_ephemeral_range(tmp_path: Path) -> None:
    low, high = ephemeral_range()
    with private_postgres(tmp_path / "pg") as server:
        assert LISTEN_PORT_FLOOR <= server.port < low, (server.port, (low, high))


def test_a_restart_keeps_the_port_or_says_it_is_taken(tmp_path: Path) -> None:
    with private_postgres(tmp_path / "pg") as server:
        port = server.port
        server.stop("fast")
        with (
            client_connection_from(port),
            pytest.raises(EmbeddedPostgresUnavailable, match=f"port {port}"),
        ):
            server.start()
        assert server.port == port
        assert not server.is_running()
        server.start()
        assert server.port == port and server.is_running()


def test_a_fresh_start_moves_off_a_taken_port(tmp_path: Path) -> None:
    """ensure_running (`make run`, a new replica) prints the DSN after it starts, so
    there a taken port is simply replaced."""
    with private_postgres(tmp_path / "pg") as server:
        port = server.port
        server.stop("fast")
        with client_connection_from(port):
            EmbeddedPostgres(tmp_path / "pg").ensure_running()
            assert server.port != port and server.is_running()


def test_a_server_whose_state_cannot_be_read_is_not_taken_for_stopped(tmp_path: Path) -> None:
    """A CI run's stop() did nothing when pg_ctl status could not read the data
    directory (its parent's mode had changed): the server stayed up, and the restart
    after it found the port taken."""
    with private_postgres(tmp_path / "pg") as server:
        mode = server.pgdata.stat().st_mode
        server.pgdata.chmod(0)  # briefly: the running server reads it too
        try:
            with pytest.raises(EmbeddedPostgresUnavailable, match="cannot tell whether"):
                server.is_running()
        finally:
            server.pgdata.chmod(mode)
        assert server.is_running()
