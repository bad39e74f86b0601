"""The profile summary of bench/profile.py: self and inclusive shares from py-spy's
raw (collapsed-stack) output."""

from __future__ import annotations

from pathlib import Path

from bench.profile import short, summarize

SITE = "/app/.venv/lib/python3.11/site-packages"
MAIN = "main (/app/dispatcher/cli/main.py:10)"
DISPATCH = "/app/dispatcher/services/dispatch.py"


def test_summary_counts_self_and_inclusive_shares(tmp_path: Path) -> None:
    raw = tmp_path / "profile.raw"
    raw.write_text(
        f"{MAIN};run_once ({DISPATCH}:305);fetch ({SITE}/asyncpg/connection.py:690) 6\n"
        f"{MAIN};_start ({DISPATCH}:382);observe ({SITE}/prometheus_client/metrics.py:678) 3\n"
        f"{MAIN};_start ({DISPATCH}:370) 1\n"
        "not a sample line\n"
    )
    summary = summarize(raw)
    assert "10 samples" in summary
    own, inclusive = summary.split("inclusive, dispatcher code")
    assert "60.0%  fetch (asyncpg/connection.py)" in own
    assert "30.0%  observe (prometheus_client/metrics.py)" in own
    assert "10.0%  _start (dispatcher/services/dispatch.py)" in own
    assert "100.0%  main (dispatcher/cli/main.py)" in inclusive
    assert "40.0%  _start (dispatcher/services/dispatch.py)" in inclusive
    assert "asyncpg" not in inclusive


def test_frames_without_a_file_are_kept_as_they_are() -> None:
    assert short("<idle>") == "<idle>"
    stdlib = "select (/usr/lib/python3.11/selectors.py:468)"
    assert short(stdlib) == "select (python3.11/selectors.py)"


def test_an_empty_profile_says_so(tmp_path: Path) -> None:
    raw = tmp_path / "empty.raw"
    raw.write_text("")
    assert summarize(raw) == f"no samples in {raw}"
