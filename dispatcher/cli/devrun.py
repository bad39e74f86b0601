"""``dispatcher dev`` (what ``make run`` runs): a local cluster for development.

Starts the embedded PostgreSQL (unless DISPATCHER_DSN is set), migrates it, makes sure
there is an API token (DISPATCHER_API_TOKEN, else one generated once and kept in
``.dispatcher/api-token``), prints how to reach everything, then runs N replicas of
the app as child processes on consecutive ports from DISPATCHER_HTTP_PORT (8080),
each log line prefixed with its replica. Ctrl-C (or SIGTERM) stops them gracefully.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import asyncpg

from dispatcher.core.config import Settings
from dispatcher.database.migrate import migrate


def dev_token(settings: Settings) -> str:
    """DISPATCHER_API_TOKEN, or a token generated once under the dispatcher home."""
    if settings.api_token:
        return settings.api_token
    path = Path(settings.home) / "api-token"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def _pump(name: str, stream: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()


async def _migrate(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, schema, report=print)
    finally:
        await conn.close()


def run_dev(settings: Settings, *, app: str, replicas: int) -> int:
    if settings.dsn:
        dsn = settings.dsn
        where = "DISPATCHER_DSN"
        psql = f"psql '{dsn}'"
    else:
        from dispatcher.database.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(Path(settings.home))
        dsn = server.ensure_running()
        where = f"the embedded PostgreSQL under {server.home}"
        psql = server.psql_command()
    asyncio.run(_migrate(dsn, settings.schema))
    token = dev_token(settings)
    base_port = settings.http_port
    print(f"database: {where}\n  psql: {psql}")
    print(f"API token: {token}  (kept in {Path(settings.home) / 'api-token'})")
    print("try:")
    print(
        f"  curl -s -X POST localhost:{base_port}/jobs -H 'Authorization: Bearer {token}' "
        """-H 'Content-Type: application/json' -d '{"type": "demo.echo", "payload": {"hi": 1}}'"""
    )
    print(f"  curl -s localhost:{base_port}/status -H 'Authorization: Bearer {token}'")
    print(f"dashboard: http://localhost:{base_port}/ui/ (log in with the API token)")
    print(f"starting {replicas} replica(s) of {app} on ports "
          f"{base_port}..{base_port + replicas - 1}; Ctrl-C stops them", flush=True)  # fmt: skip

    lock = threading.Lock()
    children: list[subprocess.Popen[str]] = []
    for index in range(replicas):
        name = f"replica-{index}"
        env = {
            **os.environ,
            "DISPATCHER_DSN": dsn,
            "DISPATCHER_SCHEMA": settings.schema,
            "DISPATCHER_API_TOKEN": token,
            "DISPATCHER_HTTP_PORT": str(base_port + index),
            "DISPATCHER_REPLICA_ID": name,
            "DISPATCHER_LOG_FORMAT": os.environ.get("DISPATCHER_LOG_FORMAT", "console"),
            "PYTHONUNBUFFERED": "1",
        }
        child = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "run", app],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Its own session: a Ctrl-C reaches only us, and we forward one SIGTERM
            # (a second signal would make the replica skip its graceful drain).
            start_new_session=True,
        )
        assert child.stdout is not None
        threading.Thread(target=_pump, args=(name, child.stdout, lock), daemon=True).start()
        children.append(child)

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [child.wait() for child in children]
    for index, code in enumerate(codes):
        if code != 0:
            print(f"replica-{index} exited with status {code}", flush=True)
    return 0 if all(code == 0 for code in codes) else 1
