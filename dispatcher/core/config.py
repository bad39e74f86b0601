"""Settings: environment variables ``DISPATCHER_*`` over an optional TOML file.

Every setting has one name: ``lease`` in the TOML file is ``DISPATCHER_LEASE`` in the
environment. The environment wins over the file; command-line flags win over both.
All mistakes are collected and reported together, one line each (ConfigError), so
an operator fixes them in one go. Durations take seconds (``1.5``) or a unit
(``500ms``, ``10s``, ``5m``, ``2h``, ``14d``).

Bottom layer: imports only errors and schema.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatcher.core.errors import ConfigError
from dispatcher.core.schema import DEFAULT_SCHEMA, validate_schema_name

ENV_PREFIX = "DISPATCHER_"
# Read from the environment but not settings of a running dispatcher.
_OTHER_ENV = {"DISPATCHER_CONFIG", "DISPATCHER_TEST_DSN"}
# Less than this leaves a replica that lost its session too little time to stop its
# attempts before the leader rescues them (see replica_session.py).
MIN_ORPHAN_GRACE = 0.25
# Kubernetes injects <SERVICE>_PORT, <SERVICE>_SERVICE_HOST, ... for a Service named
# "dispatcher"; they are not ours and must not be reported as typos.
_KUBERNETES_SERVICE_ENV = re.compile(r"DISPATCHER_(PORT|SERVICE_[A-Z_]+|PORT_\d+_[A-Z]+.*)")

_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"500ms"`` or ``"14d"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value))
        if match is None:
            raise ValueError(f"expected a duration like 1.5, 500ms, 10s, 5m or 14d, got {value!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


def parse_positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a positive integer, got {value!r}")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"must be at least 1, got {number}")
    return number


def parse_port(value: Any) -> int:
    port = parse_positive_int(value)
    if port > 65535:
        raise ValueError(f"must be a TCP port (1-65535), got {port}")
    return port


def parse_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def parse_optional_text(value: Any) -> str | None:
    text = parse_text(value)
    return text or None


_CONNECT_TIMEOUT = re.compile(r"(?:^|[?&\s])connect_timeout\s*=")


def parse_dsn(value: Any) -> str | None:
    """A DSN, or None. Refuses ``connect_timeout``: asyncpg passes options it does not
    know to the server as settings, and the server refuses that one, so every
    connection would fail (dispatcher bounds its connects itself)."""
    dsn = parse_optional_text(value)
    if dsn is not None and _CONNECT_TIMEOUT.search(dsn):
        raise ValueError(
            "connect_timeout is a libpq option that asyncpg hands to the server, which "
            "refuses it (unrecognized configuration parameter); remove it from the DSN"
        )
    return dsn


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def parse_otel(value: Any) -> str:
    """auto, true or false (any spelling parse_bool takes); true needs the otel extra."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        enabled = parse_bool(value)
    except ValueError:
        raise ValueError(f"expected auto, true or false, got {value!r}") from None
    if enabled and not _otel_installed():
        raise ValueError(
            "true needs opentelemetry-api, which is not installed: pip install 'dispatcher[otel]'"
        )
    return "true" if enabled else "false"


def _otel_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ImportError:  # opentelemetry itself missing, or blocked
        return False


def _schema(value: Any) -> str:
    try:
        return validate_schema_name(parse_text(value))
    except ConfigError as exc:
        raise ValueError(exc.problems[0]) from None


def _setting(default: Any, parse: Callable[[Any], Any], doc: str, secret: bool = False) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Everything an operator can tune. Defaults are production-sane."""

    dsn: str | None = _setting(
        None, parse_dsn, "PostgreSQL DSN; unset means the embedded server", secret=True
    )
    election_dsn: str | None = _setting(
        None,
        parse_dsn,
        "DSN for the election/LISTEN connection when dsn goes through a transaction pooler",
        secret=True,
    )
    schema: str = _setting(DEFAULT_SCHEMA, _schema, "schema holding dispatcher's tables")
    home: str = _setting(".dispatcher", parse_text, "folder for the embedded server and dev files")
    replica_id: str = _setting(
        socket.gethostname(), parse_text, "replica name (the pod name); owner ids add pid + suffix"
    )
    http_host: str = _setting("0.0.0.0", parse_text, "address the HTTP API listens on")
    http_port: int = _setting(8080, parse_port, "port of the HTTP API, health and metrics")
    api_token: str | None = _setting(
        None, parse_optional_text, "bearer token guarding the HTTP API", secret=True
    )
    ui_readonly_token: str | None = _setting(
        None,
        parse_optional_text,
        "token that logs into the dashboard (/ui/) read-only: every page, no actions",
        secret=True,
    )
    log_format: str = _setting("auto", _choice("auto", "json", "console"), "log line format")
    log_level: str = _setting(
        "info", _choice("debug", "info", "warning", "error"), "lowest level logged"
    )
    election_interval: float = _setting(0.5, parse_duration, "how often standbys try to lead")
    heartbeat_interval: float = _setting(
        1.0, parse_duration, "leader lease renewal, job and replica heartbeats"
    )
    lease: float = _setting(10.0, parse_duration, "how long a leader's lease lasts unrenewed")
    poll_interval: float = _setting(1.0, parse_duration, "claim poll tick when no NOTIFY comes")
    gc_threshold: int = _setting(
        50_000,
        parse_positive_int,
        "`dispatcher run` collects Python's youngest garbage generation every this many "
        "net allocations (Python's default: 700); see docs/performance.md",
    )
    concurrency: int | None = _setting(
        None, parse_positive_int, "global limit of running jobs (overrides the app's)"
    )
    stale_after: float = _setting(
        30.0, parse_duration, "a processing job unheartbeated this long is rescued"
    )
    reaper_interval: float = _setting(5.0, parse_duration, "how often the leader's reaper runs")
    replica_sessions: bool = _setting(
        True,
        parse_bool,
        "each replica holds a session lock of its own; when its process dies, the leader "
        "rescues its async jobs within orphan_grace instead of stale_after (needs a "
        "session DSN that reaches PostgreSQL directly, like the election's)",
    )
    orphan_grace: float = _setting(
        1.0,
        parse_duration,
        "how long a replica's session lock must be gone before its async jobs are rescued",
    )
    unknown_type_grace: float | None = _setting(
        None,
        parse_duration,
        "pending jobs of a type no replica runs fail after this (default: the app's, 10m)",
    )
    retention_completed: float = _setting(
        86400.0, parse_duration, "completed and cancelled jobs are deleted after this"
    )
    retention_failed: float = _setting(
        14 * 86400.0, parse_duration, "failed jobs (dead letters) are deleted after this"
    )
    shutdown_timeout: float = _setting(
        25.0, parse_duration, "on SIGTERM, how long in-flight jobs may finish"
    )
    mode: str = _setting(
        "leader",
        _choice("leader", "all"),
        "leader: only the leader claims; all: every replica claims (worker mode)",
    )
    claim_batch: int | None = _setting(
        None,
        parse_positive_int,
        "most jobs one claim statement takes (default: a quarter of the global limit, "
        "at least 100)",
    )
    pool_size: int = _setting(8, parse_positive_int, "connections in the runtime pool")
    prepared_statements: bool = _setting(
        True,
        parse_bool,
        "false: no named prepared statements or non-standard startup parameters on the "
        "runtime pool (PgBouncer in transaction mode, any version)",
    )
    listen: bool = _setting(
        True,
        parse_bool,
        "false: poll-only, no LISTEN at all (wake-ups on the poll tick, cancels on the job "
        "heartbeat, hand-over on the election interval)",
    )
    max_payload_bytes: int = _setting(
        1024 * 1024, parse_positive_int, "largest job payload the HTTP API accepts, in bytes"
    )
    otel: str = _setting(
        "auto",
        parse_otel,
        "OpenTelemetry spans for attempts: auto (when an SDK tracer provider is set by the "
        "time claiming starts), true, false (producers: false stores no trace context)",
    )

    def masked(self) -> dict[str, Any]:
        """All settings, secrets replaced by '***' (for `dispatcher config`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata["secret"] and value else value
        return out

    @property
    def alive_within(self) -> float:
        """A replica unseen for longer than this (3 heartbeats) counts as gone."""
        return max(3 * self.heartbeat_interval, 2.0)

    def check(self) -> list[str]:
        """Problems between settings (each one fine alone)."""
        problems = []
        if self.heartbeat_interval >= self.lease:
            problems.append(
                f"heartbeat_interval ({self.heartbeat_interval:g}s) must be shorter than "
                f"lease ({self.lease:g}s), or the lease lapses between renewals"
            )
        if self.orphan_grace < MIN_ORPHAN_GRACE:
            problems.append(
                f"orphan_grace ({self.orphan_grace:g}s) must be at least {MIN_ORPHAN_GRACE:g}s: "
                "it is the time a replica that lost its session has to stop its attempts"
            )
        if self.heartbeat_interval * 3 >= self.stale_after:
            problems.append(
                f"stale_after ({self.stale_after:g}s) must be more than 3 heartbeat_intervals "
                f"({self.heartbeat_interval:g}s), or live jobs get rescued"
            )
        return problems


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def load_settings(
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Settings, list[str]]:
    """Build Settings from file, environment and overrides (in rising precedence).

    Returns the settings and warnings (unknown DISPATCHER_* variables). Raises
    ConfigError listing every problem found.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get("DISPATCHER_CONFIG") or None
    problems: list[str] = []
    warnings: list[str] = []
    by_name = {f.name: f for f in dataclasses.fields(Settings)}
    raw: dict[str, tuple[Any, str]] = {}

    if config_file:
        path = Path(config_file)
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(f"config file {path}: cannot read it ({exc.strerror})")
            file_values = {}
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"config file {path}: not valid TOML ({exc})")
            file_values = {}
        for key, value in file_values.items():
            if key not in by_name:
                problems.append(f"config file {path}: unknown setting {key!r}")
            else:
                raw[key] = (value, f"{key} in {path}")

    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key in _OTHER_ENV:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in by_name:
            raw[name] = (value, key)
        elif not _KUBERNETES_SERVICE_ENV.fullmatch(key):
            warnings.append(f"ignoring unknown environment variable {key}")

    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = (value, f"--{key.replace('_', '-')}")

    values: dict[str, Any] = {}
    for name, (value, source) in raw.items():
        try:
            values[name] = by_name[name].metadata["parse"](value)
        except ValueError as exc:
            problems.append(f"{source}: {exc}")
    settings = Settings(**values)
    if not problems:
        problems.extend(settings.check())
    if problems:
        raise ConfigError(problems)
    return settings, warnings
