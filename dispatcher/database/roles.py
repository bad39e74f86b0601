"""Least-privilege roles: the SQL that creates them and grants each what it needs
(``sql/roles.sql``, printed by ``dispatcher roles``), and the check a replica's
readiness makes that its own role has what the runtime needs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dispatcher.core.errors import ConfigError
from dispatcher.core.queries import sql_dir
from dispatcher.core.schema import SchemaNames

_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class RoleNames:
    """The three roles (lower-case identifiers; Postgres' 63-character limit)."""

    runtime: str = "dispatcher_runtime"
    producer: str = "dispatcher_producer"
    readonly: str = "dispatcher_readonly"

    def __post_init__(self) -> None:
        problems = [
            f"role name {name!r} is invalid: use 1-63 characters of a-z, 0-9 and _, "
            "not starting with a digit"
            for name in (self.runtime, self.producer, self.readonly)
            if not _ROLE_NAME.fullmatch(name)
        ]
        if problems:
            raise ConfigError(problems)


def roles_sql(schema: str, names: RoleNames | None = None) -> str:
    """sql/roles.sql for ``schema`` and ``names``, ready for psql."""
    names = names or RoleNames()
    text = (sql_dir() / "roles.sql").read_text(encoding="utf-8")
    # Validated names: quoting them is all the escaping they need.
    values = {
        "schema": SchemaNames(schema).quoted,
        "runtime": f'"{names.runtime}"',
        "producer": f'"{names.producer}"',
        "readonly": f'"{names.readonly}"',
        "runtime_text": f"'{names.runtime}'",
        "producer_text": f"'{names.producer}'",
        "readonly_text": f"'{names.readonly}'",
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text
