"""Serving the API inside the replica's own event loop."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from dispatcher.core.errors import DispatcherError


def listen(host: str, port: int) -> socket.socket:
    """Bind the HTTP port ourselves, so a taken port is a clear error at start."""
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


class HttpServer(uvicorn.Server):
    """uvicorn inside our event loop: the runtime owns SIGTERM/SIGINT (a graceful
    drain), so uvicorn must not install its own handlers."""

    def __init__(self, api: FastAPI) -> None:
        super().__init__(uvicorn.Config(api, log_config=None, access_log=False, lifespan="off"))

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
