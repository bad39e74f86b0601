"""Settings from environment and TOML: parsing, precedence, and error reporting."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.core.config import load_settings, parse_duration
from dispatcher.core.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1.5", 1.5), ("500ms", 0.5), ("10s", 10), ("5m", 300), ("2h", 7200), ("14d", 1209600)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "10 parsecs", "inf"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults_with_an_empty_environment() -> None:
    settings, warnings = load_settings(env={})
    assert settings.schema == "dispatcher"
    assert settings.http_port == 8080
    assert (settings.election_interval, settings.heartbeat_interval, settings.lease) == (
        0.5,
        1.0,
        10.0,
    )
    assert settings.stale_after == 30.0
    assert warnings == []


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    config = tmp_path / "dispatcher.toml"
    config.write_text('schema = "from_file"\nhttp_port = 9000\nlease = "20s"\n')
    settings, _ = load_settings(
        env={"DISPATCHER_HTTP_PORT": "9100", "DISPATCHER_CONFIG": str(config)},
        overrides={"lease": "30s"},
    )
    assert settings.schema == "from_file"
    assert settings.http_port == 9100
    assert settings.lease == 30.0


def test_every_mistake_is_reported_once_each(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("htp_port = 1\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(
            env={
                "DISPATCHER_HTTP_PORT": "eighty",
                "DISPATCHER_LEASE": "-3",
                "DISPATCHER_SCHEMA": "Bad-Name",
            },
            config_file=config,
        )
    problems = raised.value.problems
    assert len(problems) == 4, problems
    assert any("unknown setting 'htp_port'" in p for p in problems)
    assert any(p.startswith("DISPATCHER_HTTP_PORT:") for p in problems)
    assert any(p.startswith("DISPATCHER_LEASE:") for p in problems)
    assert any(p.startswith("DISPATCHER_SCHEMA:") for p in problems)


def test_settings_that_contradict_each_other() -> None:
    with pytest.raises(ConfigError, match=r"heartbeat_interval .* must be shorter than lease"):
        load_settings(env={"DISPATCHER_HEARTBEAT_INTERVAL": "20s", "DISPATCHER_STALE_AFTER": "5m"})
    with pytest.raises(ConfigError, match=r"orphan_grace \(0.1s\) must be at least 0.25s"):
        load_settings(env={"DISPATCHER_ORPHAN_GRACE": "100ms"})
    settings, _ = load_settings(env={"DISPATCHER_ORPHAN_GRACE": "250ms"})
    assert (settings.orphan_grace, settings.replica_sessions) == (0.25, True)


def test_unknown_variables_warn_but_kubernetes_service_links_do_not() -> None:
    _, warnings = load_settings(
        env={
            "DISPATCHER_LEESE": "1",
            "DISPATCHER_PORT": "tcp://10.0.0.1:8080",
            "DISPATCHER_SERVICE_HOST": "10.0.0.1",
            "DISPATCHER_PORT_8080_TCP_ADDR": "10.0.0.1",
        }
    )
    assert warnings == ["ignoring unknown environment variable DISPATCHER_LEESE"]


def test_masked_hides_secrets() -> None:
    settings, _ = load_settings(env={"DISPATCHER_DSN": "postgresql://u:pw@h/db"})
    assert settings.masked()["dsn"] == "***"
    assert settings.masked()["api_token"] is None


def test_every_setting_is_documented() -> None:
    import dataclasses
    from pathlib import Path

    from dispatcher.core.config import Settings, env_name

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    missing = [
        env_name(f.name) for f in dataclasses.fields(Settings) if env_name(f.name) not in doc
    ]
    assert missing == []


def test_prepared_statements_and_listen_default_on_and_turn_off() -> None:
    settings, _ = load_settings(env={})
    assert (settings.prepared_statements, settings.listen) == (True, True)
    settings, _ = load_settings(
        env={"DISPATCHER_PREPARED_STATEMENTS": "false", "DISPATCHER_LISTEN": "off"}
    )
    assert (settings.prepared_statements, settings.listen) == (False, False)


def test_prepared_statements_and_listen_take_booleans_only(tmp_path: Path) -> None:
    config = tmp_path / "dispatcher.toml"
    config.write_text("prepared_statements = false\nlisten = true\n")
    settings, _ = load_settings(config_file=config, env={})
    assert (settings.prepared_statements, settings.listen) == (False, True)
    with pytest.raises(ConfigError) as raised:
        load_settings(env={"DISPATCHER_PREPARED_STATEMENTS": "maybe", "DISPATCHER_LISTEN": "2"})
    assert raised.value.problems == [
        "DISPATCHER_PREPARED_STATEMENTS: expected true or false, got 'maybe'",
        "DISPATCHER_LISTEN: expected true or false, got '2'",
    ]


def test_a_dsn_with_connect_timeout_is_refused_with_the_reason() -> None:
    # asyncpg sends options it does not know to the server as settings; Postgres then
    # refuses every connection ("unrecognized configuration parameter").
    for env in (
        {"DISPATCHER_DSN": "postgresql://u@db1:5432,db2:5432/app?connect_timeout=2"},
        {"DISPATCHER_ELECTION_DSN": "host=db1 connect_timeout=2 dbname=app"},
    ):
        with pytest.raises(ConfigError, match="connect_timeout is a libpq option"):
            load_settings(env=env)
    multi_host = "postgresql://u@db1:5432,db2:5432/app?target_session_attrs=read-write"
    settings, _ = load_settings(env={"DISPATCHER_DSN": multi_host})
    assert settings.dsn == multi_host
