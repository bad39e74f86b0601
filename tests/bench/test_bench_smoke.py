"""Each benchmark script starts, runs on tiny inputs and prints its table (no timing is
asserted: benchmarks live in bench/ and run with `make bench`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.database import TestDatabase

TINY = {
    "ab": ["--revisions", "HEAD,.", "--jobs", "300", "--rounds", "1", "--concurrency", "16"],
    "raw_sql": ["--jobs", "300"],
    "burndown": ["--jobs", "300", "--rounds", "1"],
    "latency": ["--probes", "10", "--gap", "0.01", "--load", "100"],
    "bulk_enqueue": ["--jobs", "2000"],
    "failover": ["--rounds", "1"],
    "table_growth": ["--jobs", "300", "--finished", "3000", "--rounds", "1"],
    "memory": ["--jobs", "50", "--seconds", "3"],
    "heartbeat_hot": ["--jobs", "50", "--beats", "3"],
    "dashboard": ["--finished", "3000", "--pending", "300", "--repeats", "2"],
    "keyed_claim": ["--pending", "2000", "--keys", "5", "--claims", "5"],
    "dependencies": ["--branches", "20", "--rounds", "1"],
    "steady": ["--rates", "100", "--slots", "4", "--phase-seconds", "2", "--restart-after", "1"],
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(TINY))
def test_benchmark_runs_on_tiny_inputs(name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_BENCH_RESULTS"] = str(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *TINY[name]],
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[0] == name, run.stdout
    (line,) = (tmp_path / f"{name}.jsonl").read_text().splitlines()
    figures = json.loads(line)
    assert figures["benchmark"] == name and figures["machine"]["cpus"] >= 1


@pytest.mark.timeout(180)
def test_burndown_profile_names_where_the_replica_spent_its_samples(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_BENCH_RESULTS"] = str(tmp_path)
    raw = tmp_path / "burn.raw"
    run = subprocess.run(
        [sys.executable, "-m", "bench.burndown", *TINY["burndown"], "--profile", str(raw)],
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert raw.stat().st_size > 0
    summary = run.stdout.split("profile: ", 1)[1]
    assert "self (on top of the stack):" in summary
    assert "(dispatcher/cli/main.py)" in summary.split("inclusive, dispatcher code")[1]


@pytest.mark.timeout(180)
def test_peers_benchmark_skips_a_peer_it_cannot_run_and_still_measures_the_dispatcher(
    tmp_path: Path,
) -> None:
    # make bench-peers installs the peers into .venv-peers; make test does not, so this
    # runs the orchestrator with an interpreter that does not exist.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_BENCH_RESULTS"] = str(tmp_path)
    missing = tmp_path / "no-such-venv" / "bin" / "python"
    run = subprocess.run(
        [sys.executable, "-m", "bench.peers", "--python", str(missing),
         "--peers", "pgqueuer,procrastinate", "--jobs", "300", "--concurrency", "16",
         "--rounds", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "pgqueuer: SKIPPED" in run.stdout and "procrastinate: SKIPPED" in run.stdout
    (line,) = (tmp_path / "peers.jsonl").read_text().splitlines()
    figures = json.loads(line)
    assert figures["benchmark"] == "peers", figures
    assert "dispatcher burn-down" in run.stdout, run.stdout


def test_ab_reads_settings_per_revision_and_refuses_malformed_ones() -> None:
    from bench.ab import parse_env

    assert parse_env("", 2) == [{}, {}]
    assert parse_env(";A=1,B=x=y", 2) == [{}, {"A": "1", "B": "x=y"}]
    with pytest.raises(SystemExit, match="is not NAME=value"):
        parse_env("A", 2)
    with pytest.raises(SystemExit, match="names 3 revisions' settings, there are 2"):
        parse_env("A=1;B=2;C=3", 2)


def test_ab_names_a_revision_it_cannot_check_out() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--revisions", "no-such-revision,.", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "cannot check out 'no-such-revision'" in run.stderr, run.stderr


async def test_burn_down_counts_cpu_from_the_first_start_even_if_every_job_is_done(
    db: TestDatabase,
) -> None:
    # A small burn-down can start and finish every job between two polls: "started"
    # must then hold, or the benchmark would wait for a processing row until it times out.
    from bench.burndown import STARTED

    started = STARTED.format(jobs=db.jobs)
    conn = await db.connect()
    try:
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 'demo.noop' FROM generate_series(1, 3)"
        )
        assert await conn.fetchval(started) is False
        await conn.execute(
            f"UPDATE {db.jobs} SET status = 'processing', attempts = 1, started_at = now(), "
            f"heartbeat_at = now(), owner = 'bench-1-x' WHERE id = (SELECT min(id) FROM {db.jobs})"
        )
        assert await conn.fetchval(started) is True
        await conn.execute(
            f"UPDATE {db.jobs} SET status = 'completed', attempts = 1, owner = 'bench-1-x', "
            f"started_at = now(), finished_at = now()"
        )
        assert await conn.fetchval(started) is True
    finally:
        await conn.close()
