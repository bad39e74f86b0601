"""Listening ports below the kernel's ephemeral range (dispatcher.database.ports)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dispatcher.database import ports

SetRange = Callable[[str], None]


@pytest.fixture
def kernel_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SetRange:
    """Sets what the kernel's ip_local_port_range file says."""
    range_file = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", range_file)

    def set_range(text: str) -> None:
        range_file.write_text(text)

    return set_range


def test_the_range_is_read_from_the_kernel_or_defaults(
    kernel_range: SetRange, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel_range("40000\t50000\n")
    assert ports.ephemeral_range() == (40000, 50000)
    kernel_range("garbage\n")
    assert ports.ephemeral_range() == ports.DEFAULT_EPHEMERAL_RANGE
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_range() == ports.DEFAULT_EPHEMERAL_RANGE


def test_a_listen_port_lies_between_the_floor_and_the_ephemeral_range(
    kernel_range: SetRange,
) -> None:
    kernel_range("40000 50000\n")
    picked = {ports.free_listen_port() for _ in range(20)}
    assert all(ports.LISTEN_PORT_FLOOR <= port < 40000 for port in picked), picked
    assert all(ports.port_is_free(port) for port in picked)


def test_a_range_starting_at_the_floor_still_gives_a_free_port(kernel_range: SetRange) -> None:
    kernel_range(f"{ports.LISTEN_PORT_FLOOR} 60999\n")
    assert ports.port_is_free(ports.free_listen_port())
