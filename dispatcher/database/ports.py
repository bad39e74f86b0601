"""TCP ports for servers this machine starts and restarts on the same port.

Outgoing connections take their local ports from the kernel's ephemeral range. A
server listening on a port from that range (what binding port 0 hands out) can find
it taken when it restarts: while it was down, any client's connection may have been
given that port as its local end. So listening ports are chosen below that range.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below this lie well-known and registered services' ports that a developer's machine
# is more likely to be running.
LISTEN_PORT_FLOOR = 20000
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# IANA's dynamic range, what BSDs and macOS use when no Linux range can be read.
DEFAULT_EPHEMERAL_RANGE = (49152, 65535)
ATTEMPTS = 200


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (inclusive)."""
    try:
        low, high = EPHEMERAL_RANGE_FILE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Postgres does: connections of a stopped server in TIME_WAIT must not
        # make its own port look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_listen_port() -> int:
    """A free port on 127.0.0.1 outside the ephemeral range, picked at random so that
    servers started at the same moment rarely pick the same one."""
    low, _ = ephemeral_range()
    if low - LISTEN_PORT_FLOOR >= ATTEMPTS:
        for port in random.sample(range(LISTEN_PORT_FLOOR, low), ATTEMPTS):
            if port_is_free(port):
                return port
    # A machine whose ephemeral range starts this low, or a crowded one: any free port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        any_port: int = sock.getsockname()[1]
        return any_port
