"""The `dispatcher` command line, as real processes, against a real Postgres."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.database import TestDatabase
from tests.support.processes import free_port
from tests.support.waiting import eventually_sync


def dispatcher(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def env(db: TestDatabase) -> dict[str, str]:
    return {"DISPATCHER_DSN": db.dsn, "DISPATCHER_SCHEMA": db.schema}


def test_enqueue_list_show_cancel_retry(env: dict[str, str]) -> None:
    out = dispatcher("enqueue", "demo.echo", "--payload", '{"n": 1}', "--delay", "600", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("enqueued job 1 (demo.echo), run_at ")

    listed = dispatcher("jobs", "list", env=env)
    assert listed.returncode == 0
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "TYPE", "STATUS", "ATTEMPTS", "PRIO", "RUN_AT", "LAST_ERROR"]
    assert row.split()[:3] == ["1", "demo.echo", "pending"]

    as_json = json.loads(dispatcher("jobs", "show", "1", "--json", env=env).stdout)
    assert as_json["payload"] == {"n": 1} and as_json["status"] == "pending"
    assert "status            cancelled" in dispatcher("jobs", "cancel", "1", env=env).stdout
    again = dispatcher("jobs", "cancel", "1", env=env)
    assert again.returncode == 1
    assert "cannot cancel job 1: it is cancelled" in again.stderr
    assert "status            pending" in dispatcher("jobs", "retry", "1", env=env).stdout
    missing = dispatcher("jobs", "show", "99", env=env)
    assert (missing.returncode, missing.stderr.strip()) == (1, "error: no job with id 99")

    filtered = json.loads(
        dispatcher("jobs", "list", "--status", "failed", "--json", env=env).stdout
    )
    assert filtered == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "t", "--payload", "{bad"], "--payload is not valid JSON"),
        (["enqueue", "t", "--run-at", "tomorrow"], "is not an ISO 8601 time"),
        (["enqueue", "t", "--run-at", "2030-01-01T00:00:00"], "run_at must be timezone-aware"),
        (["enqueue", "", "--payload", "{}"], "type must be a non-empty string"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    env: dict[str, str], args: list[str], message: str
) -> None:
    out = dispatcher(*args, env=env)
    assert out.returncode == 2
    assert message in out.stderr


def test_three_config_mistakes_give_three_lines_and_exit_2(env: dict[str, str]) -> None:
    bad = {
        **env,
        "DISPATCHER_LEASE": "forever",
        "DISPATCHER_HTTP_PORT": "99999",
        "DISPATCHER_LOG_FORMAT": "xml",
    }
    out = dispatcher("status", env=bad)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith("config error: DISPATCHER_") for line in lines)


def test_config_masks_secrets(env: dict[str, str]) -> None:
    out = dispatcher("config", "--json", env={**env, "DISPATCHER_API_TOKEN": "s3cret"})
    shown = json.loads(out.stdout)
    assert shown["api_token"] == "***" and shown["dsn"] == "***"
    assert shown["schema"] == env["DISPATCHER_SCHEMA"]
    assert "s3cret" not in out.stdout


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    dispatcher("embedded", "stop", env={"DISPATCHER_HOME": str(tmp_path)})


def test_the_embedded_default_with_no_flags(home: Path) -> None:
    env = {"DISPATCHER_HOME": str(home)}
    status = dispatcher("status", env=env, timeout=120)
    assert status.returncode == 0, status.stderr
    first_line = status.stderr.splitlines()[0]
    assert first_line.startswith(f"using the embedded PostgreSQL under {home}")
    assert "psql: " in first_line and "postgresql://postgres@127.0.0.1:" in first_line
    assert "leader: none" in status.stdout and "queues: empty" in status.stdout
    assert dispatcher("enqueue", "demo.noop", env=env).returncode == 0
    listed = dispatcher("jobs", "list", env=env)
    assert listed.returncode == 0 and "demo.noop" in listed.stdout
    shown = dispatcher("embedded", "status", env=env)
    assert "running under" in shown.stdout


def test_dev_cluster_serves_the_api_and_runs_jobs(home: Path) -> None:
    """What `make run` does: embedded database, a token, a replica on a port."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")},
        "DISPATCHER_HOME": str(home),
        "DISPATCHER_HTTP_PORT": str(port),
    }
    dev = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", "dev", "--replicas", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        token = eventually_sync(
            lambda: (home / "api-token").exists() and (home / "api-token").read_text().strip(),
            timeout=60,
            what="the dev token",
        )
        auth = {"Authorization": f"Bearer {token}"}

        def healthy(p: int) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        started = time.monotonic()
        eventually_sync(lambda: healthy(port) and healthy(port + 1), timeout=60, what="healthz")
        assert time.monotonic() - started < 60
        created = httpx.post(
            f"http://127.0.0.1:{port + 1}/jobs",
            headers=auth,
            json={"type": "demo.echo", "payload": {"hello": "dev"}},
        )
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        def completed() -> dict[str, object] | None:
            job = httpx.get(f"http://127.0.0.1:{port}/jobs/{job_id}", headers=auth).json()
            return job if job["status"] == "completed" else None

        job = eventually_sync(completed, timeout=30, what="demo.echo to complete")
        assert job["result"] == {"hello": "dev"}
    finally:
        dev.send_signal(signal.SIGTERM)
        output, _ = dev.communicate(timeout=60)
    assert dev.returncode == 0, output[-3000:]
    assert f"curl -s -X POST localhost:{port}/jobs -H 'Authorization: Bearer {token}'" in output
    assert "[replica-0]" in output and "[replica-1]" in output
    assert "shutdown_complete" in output
