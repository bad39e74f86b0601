"""The pytest plugin as a user meets it: the README's "Testing your executors" example,
written out as files and run by pytest in a process of its own against this test's
schema, passes as the README says; and fixtures used without what they need fail
with a line saying what to set."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.support.database import TestDatabase

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FILE_NAME = re.compile(r"\A# (\S+)\n")


def readme_blocks() -> list[tuple[str, str]]:
    """The fenced blocks (language, text) of the README's "Testing your executors"."""
    section = README.read_text(encoding="utf-8").split("\n## Testing your executors\n", 1)[1]
    return FENCE.findall(section.split("\n## ", 1)[0])


def pytest_in(folder: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """pytest run in ``folder`` by this venv's Python, with ``env`` and none of the
    variables the fixtures read from ours."""
    environment = {
        k: v for k, v in os.environ.items() if k not in ("DISPATCHER_TEST_DSN", "DISPATCHER_DSN")
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=folder,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_readme_example_passes_as_the_readme_shows(db: TestDatabase, tmp_path: Path) -> None:
    blocks = readme_blocks()
    files = [(FILE_NAME.match(text), text) for _, text in blocks]
    for named, text in files:
        if named is not None:
            path = tmp_path / named.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*")) == [
        "myapp/jobs.py",
        "pyproject.toml",
        "tests/test_signup.py",
    ]
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (_, console) = blocks[-1]
    command, *shown = console.splitlines()
    assignment, *args = shlex.split(command.removeprefix("$ "))
    assert assignment.startswith("DISPATCHER_TEST_DSN=") and args[:3] == [
        "python", "-m", "pytest",
    ]  # fmt: skip
    # The README's database and schema, swapped for this test's.
    ran = pytest_in(
        tmp_path, [*args[3:], f"--dispatcher-schema={db.schema}"], DISPATCHER_TEST_DSN=db.dsn
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    printed = [line for line in ran.stdout.splitlines() if line.strip()]
    timing = re.compile(r"in \d+\.\d+s$")
    assert [timing.sub("in Ns", line) for line in printed] == [
        timing.sub("in Ns", line) for line in shown
    ]


ASYNC_USER_TEST = """
import pytest

from dispatcher import App, Job
from dispatcher.testing import drain_async

app = App()


@app.executor("a.echo")
async def echo(job: Job) -> dict:
    return job.payload


@pytest.fixture
def dispatcher_app() -> App:  # the user's own fixture, instead of the ini setting
    return app


@pytest.mark.asyncio
async def test_drained_from_an_async_test(dispatcher_client, dispatcher_database, dispatcher_app):
    job = dispatcher_client.enqueue("a.echo", {"n": 1})
    dsn, schema = dispatcher_database
    drained = await drain_async(dispatcher_app, dsn, schema=schema)
    assert (drained.completed, dispatcher_client.get(job.id).result) == (1, {"n": 1})


def test_the_next_test_starts_empty(dispatcher_client):
    assert dispatcher_client.list_jobs() == []
    assert dispatcher_client.enqueue("a.echo").id == 1  # ids start at 1 again
"""


def test_an_async_test_drains_with_the_fixtures_as_the_readme_says(
    db: TestDatabase, tmp_path: Path
) -> None:
    (tmp_path / "test_async_user.py").write_text(ASYNC_USER_TEST, encoding="utf-8")
    ran = pytest_in(
        tmp_path, ["-q", f"--dispatcher-schema={db.schema}"], DISPATCHER_TEST_DSN=db.dsn
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "2 passed" in ran.stdout


def test_fixtures_say_what_they_are_missing(db: TestDatabase, tmp_path: Path) -> None:
    (tmp_path / "test_missing.py").write_text(
        "def test_client(dispatcher_client):\n    pass\n\n"
        "def test_drain(dispatcher_drain):\n    pass\n",
        encoding="utf-8",
    )
    no_database = pytest_in(tmp_path, ["-q", "test_missing.py::test_client"])
    assert no_database.returncode == 1
    assert "the dispatcher fixtures need a PostgreSQL database: pass --dispatcher-dsn" in (
        no_database.stdout
    )
    no_app = pytest_in(
        tmp_path,
        ["-q", f"--dispatcher-schema={db.schema}", "test_missing.py::test_drain"],
        DISPATCHER_TEST_DSN=db.dsn,
    )
    assert no_app.returncode == 1
    assert "dispatcher_drain needs your App: set `dispatcher_app = myapp.jobs:app`" in (
        no_app.stdout
    )
