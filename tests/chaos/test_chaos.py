"""The short chaos profile (part of `make test`): 3 replicas, every fault kind once (in
the harness's order), under load from before the first fault until an interval after
the last. `make chaos` runs the long profile with the same harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import FAULTS, SHORT, run_profile

pytestmark = pytest.mark.chaos


# One round of nine faults with 5 s of load between them (about 2 minutes with
# start-up and drain on this 2-core machine): no waiting on time, each fault waits for
# its own conditions, but a loaded machine stretches every step.
@pytest.mark.timeout(400)
def test_short_chaos_profile_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_profile(SHORT, tmp_path)
    with capsys.disabled():
        print("\n" + report.table())
    assert report.problems == []
    assert {fault.kind for fault in report.faults} == set(FAULTS)
    # The load lasts at least one fault_interval per fault, plus one, at `rate` jobs a
    # second by the clock (bursts and a margin for the PostgreSQL restart aside).
    assert report.inserted >= SHORT.rate * SHORT.fault_interval * (len(FAULTS) + 1) * 0.8
    assert report.lost == 0 and report.overlaps == 0
    assert report.max_concurrency <= report.type_limit
    assert report.crashed == []
