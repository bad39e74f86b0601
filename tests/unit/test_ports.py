"""Listening ports below the kernel's ephemeral range (dispatcher.database.ports)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.database import ports


def test_the_range_is_read_from_the_kernel_or_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("40000\t50000\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", range_file)
    assert ports.ephemeral_range() == (40000, 50000)
    range_file.write_text("garbage\n")
    assert ports.ephemeral_range() == ports.DEFAULT_EPHEMERAL_RANGE
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_range() == ports.DEFAULT_EPHEMERAL_RANGE


def test_a_listen_port_lies_between_the_floor_and_the_ephemeral_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("40000 50000\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", range_file)
    picked = {ports.free_listen_port() for _ in range(20)}
    assert all(ports.LISTEN_PORT_FLOOR <= port < 40000 for port in picked), picked
    assert all(ports.port_is_free(port) for port in picked)


def test_a_range_starting_at_the_floor_still_gives_a_free_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text(f"{ports.LISTEN_PORT_FLOOR} 60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", range_file)
    assert ports.port_is_free(ports.free_listen_port())
