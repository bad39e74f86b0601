"""Names derived from the schema: its quoted identifier, NOTIFY channels, lock keys.

Everything a dispatcher installation puts in Postgres is keyed on one schema name, so
two installations in one database (or one test per schema) never see each other.
Bottom layer: imports nothing else from the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dispatcher.core.errors import ConfigError

DEFAULT_SCHEMA = "dispatcher"

# Lower-case only, so the quoted and unquoted spellings name the same schema, and
# short enough that "<schema>.leader" stays under Postgres' 63-byte identifier limit.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")


def validate_schema_name(name: str) -> str:
    """Return ``name`` if it is a usable schema name, else raise ConfigError."""
    if not _SCHEMA_NAME.fullmatch(name):
        raise ConfigError(
            [
                f"schema name {name!r} is invalid: use 1-40 characters of a-z, 0-9 "
                "and _, not starting with a digit"
            ]
        )
    return name


@dataclass(frozen=True)
class SchemaNames:
    """The identifiers one installation uses, all derived from its schema name."""

    schema: str

    def __post_init__(self) -> None:
        validate_schema_name(self.schema)

    @property
    def quoted(self) -> str:
        """The schema as a SQL identifier (validated, so quoting is trivial)."""
        return f'"{self.schema}"'

    @property
    def jobs_channel(self) -> str:
        """NOTIFY channel the insert trigger signals (see 0001_initial.sql)."""
        return f"{self.schema}.jobs"

    @property
    def cancel_channel(self) -> str:
        """NOTIFY channel a cancel request on a running job signals (payload: id)."""
        return f"{self.schema}.cancel"

    @property
    def control_channel(self) -> str:
        """NOTIFY channel of pause/resume and limit changes (job_types trigger)."""
        return f"{self.schema}.control"

    @property
    def leader_channel(self) -> str:
        """NOTIFY channel a leader signals when it releases leadership."""
        return f"{self.schema}.leader"

    @property
    def leader_lock_name(self) -> str:
        """Text hashed by Postgres (hashtextextended) into the leader advisory lock key."""
        return f"dispatcher:leader:{self.schema}"

    @property
    def session_lock_name(self) -> str:
        """Text hashed by Postgres (hashtext) into the first key of every replica's
        session lock; the second key is the holding backend's pid."""
        return f"dispatcher:session:{self.schema}"

    @property
    def migration_lock_name(self) -> str:
        """Text hashed by Postgres into the advisory lock key migrations run under."""
        return f"dispatcher:migrate:{self.schema}"
