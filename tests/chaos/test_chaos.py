"""The short chaos profile (part of `make test`): 3 replicas, ~2,000 jobs, every fault
kind at least once. `make chaos` runs the long profile with the same harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import FAULTS, SHORT, run_profile

pytestmark = pytest.mark.chaos


# About a minute of load and faults, plus start-up and drain on a busy machine.
@pytest.mark.timeout(400)
def test_short_chaos_profile_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_profile(SHORT, tmp_path)
    with capsys.disabled():
        print("\n" + report.table())
    assert report.problems == []
    assert {fault.kind for fault in report.faults} == set(FAULTS)
    assert report.inserted >= 1700
    assert report.lost == 0 and report.overlaps == 0
    assert report.max_concurrency <= report.type_limit
    assert report.crashed == []
