"""A real PgBouncer process in front of the test PostgreSQL, on a free port.

The Debian package (``apt-get install -y pgbouncer``; .ci/run installs it) gives the
binary; nothing else of the package is used: the test writes its own pgbouncer.ini and
runs its own process, never the system service. PgBouncer refuses to run as root, so
as root it runs as ``nobody`` and reads a config folder it is allowed to read.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict

from tests.support.processes import free_port
from tests.support.system_packages import missing_package
from tests.support.waiting import eventually_sync

INSTALL_HINT = "apt-get install -y pgbouncer"
DEBIAN_BINARY = Path("/usr/sbin/pgbouncer")
# Unprivileged user PgBouncer runs as when the tests run as root.
RUN_AS_WHEN_ROOT = "nobody"
# Fewer server connections than the replica and the producers have clients together, so
# PgBouncer really hands one server connection to many clients, transaction by
# transaction (the case that breaks named prepared statements).
SERVER_POOL_SIZE = 6


def pgbouncer_binary() -> str:
    """The pgbouncer executable; fails (in CI) or skips with how to install it."""
    found = shutil.which("pgbouncer") or (str(DEBIAN_BINARY) if DEBIAN_BINARY.exists() else None)
    if found:
        return found
    message = (
        f"pgbouncer is not installed (no pgbouncer on PATH, no {DEBIAN_BINARY}); "
        f"install it with: {INSTALL_HINT}"
    )
    missing_package(message)


def version(binary: str) -> str:
    """``PgBouncer 1.18.0`` (the first line of ``pgbouncer --version``)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


@dataclass(frozen=True)
class PgBouncer:
    """A running PgBouncer: ``dsn`` reaches the test database through it."""

    host: str
    port: int
    user: str
    dbname: str
    version: str
    config: str
    log: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://{quote(self.user)}@{self.host}:{self.port}/{quote(self.dbname)}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def config_text(
    server_dsn: str, *, port: int, auth_file: Path, pool_mode: str, ignored: str = ""
) -> str:
    """A pgbouncer.ini for the database of ``server_dsn`` (the one docs/operations.md
    shows, with this test's addresses); ``ignored``: its ignore_startup_parameters."""
    server = conninfo_to_dict(server_dsn)
    dbname = str(server.get("dbname") or server.get("user") or "postgres")
    target = [
        f"host={server.get('host') or '127.0.0.1'}",
        f"port={server.get('port') or 5432}",
        f"dbname={dbname}",
    ]
    if server.get("user"):
        target.append(f"user={server['user']}")
    if server.get("password"):
        target.append(f"password={server['password']}")
    return f"""\
[databases]
{dbname} = {" ".join(target)}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
pool_mode = {pool_mode}
default_pool_size = {SERVER_POOL_SIZE}
max_client_conn = 200
""" + (f"ignore_startup_parameters = {ignored}\n" if ignored else "")


@contextmanager
def running_pgbouncer(
    server_dsn: str, *, pool_mode: str = "transaction", ignored: str = ""
) -> Iterator[PgBouncer]:
    """Start PgBouncer in front of ``server_dsn``'s database; stop it afterwards."""
    binary = pgbouncer_binary()
    server = conninfo_to_dict(server_dsn)
    user = str(server.get("user") or "postgres")
    dbname = str(server.get("dbname") or user)
    # Not pytest's tmp_path: its parents are private to root, and PgBouncer may run as
    # an unprivileged user that must read these files.
    folder = Path(tempfile.mkdtemp(prefix="dispatcher-pgbouncer-"))
    folder.chmod(0o755)
    auth_file = folder / "userlist.txt"
    # auth_type=trust still needs the user listed; the password is not checked.
    auth_file.write_text(f'"{user}" ""\n', encoding="utf-8")
    port = free_port()
    config = folder / "pgbouncer.ini"
    text = config_text(
        server_dsn, port=port, auth_file=auth_file, pool_mode=pool_mode, ignored=ignored
    )
    config.write_text(text, encoding="utf-8")
    for path in (auth_file, config):
        path.chmod(0o644)
    log = folder / "pgbouncer.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            user=RUN_AS_WHEN_ROOT if os.geteuid() == 0 else None,
        )
    bouncer = PgBouncer("127.0.0.1", port, user, dbname, version(binary), text, log)
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"pgbouncer exited with status {process.returncode}:\n{bouncer.log_tail()}"
                )
            return _accepts(port)

        eventually_sync(up, timeout=10, what=f"pgbouncer to listen on port {port}")
        yield bouncer
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)
