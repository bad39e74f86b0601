"""Named SQL queries, loaded from the .sql files under ``sql/``.

``sql/queries.sql`` holds every runtime statement under a ``-- name: <name>`` header
followed by a one-line ``--`` description. Two kinds of templating, both resolved when
the file is loaded: ``{{schema}}``, replaced by the validated, quoted schema name, and
``{{<fragment>}}``, replaced by the text under a ``-- fragment: <fragment>`` header
(SQL that two statements share, such as the claim's pick-and-start tail, and which
is not a statement of its own). ``{{<fragment>+K}}`` shifts the fragment's bind
parameters by K (``$1`` becomes ``$(1+K)``), so a statement can use a fragment after
parameters of its own. Every value is a bind parameter (``$1``, ``$2``, ...
as asyncpg and Postgres spell them).

psycopg spells bind parameters ``%(name)s``; :func:`for_psycopg` rewrites a query for
it, so the sync client runs the very same statements.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from dispatcher.core.schema import SchemaNames

_HEADER = re.compile(r"^-- (name|fragment): ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_FRAGMENT_USE = re.compile(r"\{\{([a-z_][a-z0-9_]*)(?:\+(\d+))?\}\}")
_LEADING_COMMENTS = re.compile(r"\A(?:--[^\n]*\n)+")
_PLACEHOLDER = re.compile(r"\$(\d+)")


def sql_dir() -> Path:
    """The folder holding migrations and named queries.

    Installed from a wheel it is ``dispatcher/sql``; in a checkout (editable install)
    it is the top-level ``sql/`` next to the package.
    """
    packaged = Path(str(resources.files("dispatcher"))) / "sql"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "sql"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"dispatcher's sql folder is missing (looked in {packaged}, {checkout})"
    )


def render(text: str, names: SchemaNames) -> str:
    """Substitute the schema into a SQL text."""
    return text.replace("{{schema}}", names.quoted)


def parse_named_queries(text: str) -> dict[str, str]:
    """Split a queries file into {name: sql}, with every ``{{fragment}}`` use replaced
    by the fragment's text (its description comments left out; fragments it uses
    replaced in turn). A repeated name, an unknown fragment, an unused one or one that
    uses itself is an error."""
    queries: dict[str, str] = {}
    fragments: dict[str, str] = {}
    parts = _HEADER.split(text)
    # parts = [preamble, kind1, name1, body1, kind2, name2, body2, ...]
    for kind, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        if name in queries or name in fragments or name == "schema":
            raise ValueError(f"{kind} {name!r} is defined twice in queries.sql")
        if kind == "fragment":
            fragments[name] = _LEADING_COMMENTS.sub("", body.strip()).rstrip(";")
        else:
            queries[name] = body.strip().rstrip(";")
    used: set[str] = set()
    expanding: list[str] = []

    def expand(match: re.Match[str]) -> str:
        name, shift = match.group(1), int(match.group(2) or 0)
        if name == "schema":
            return match.group(0)
        if name not in fragments:
            raise ValueError(f"no fragment named {name!r} in queries.sql")
        if name in expanding:
            raise ValueError(f"fragment {name!r} uses itself: {' -> '.join(expanding)}")
        used.add(name)
        expanding.append(name)
        try:  # a fragment may use fragments too
            text = _FRAGMENT_USE.sub(expand, fragments[name])
        finally:
            expanding.pop()
        if not shift:
            return text
        return _PLACEHOLDER.sub(lambda p: f"${int(p.group(1)) + shift}", text)

    expanded = {name: _FRAGMENT_USE.sub(expand, sql) for name, sql in queries.items()}
    if unused := sorted(set(fragments) - used):
        raise ValueError(f"fragments never used in queries.sql: {', '.join(unused)}")
    return expanded


class Queries(Mapping[str, str]):
    """The named queries of one schema. ``queries["claim_jobs"]`` is the SQL text."""

    def __init__(self, queries: dict[str, str]) -> None:
        self._queries = queries

    def __getitem__(self, name: str) -> str:
        try:
            return self._queries[name]
        except KeyError:
            known = ", ".join(sorted(self._queries))
            raise KeyError(f"no query named {name!r} in queries.sql; known: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._queries)

    def __len__(self) -> int:
        return len(self._queries)


@functools.lru_cache(maxsize=64)
def queries_for(schema: str) -> Queries:
    """The named queries with ``schema`` substituted (cached per schema)."""
    names = SchemaNames(schema)
    text = (sql_dir() / "queries.sql").read_text(encoding="utf-8")
    return Queries({name: render(sql, names) for name, sql in parse_named_queries(text).items()})


@functools.lru_cache(maxsize=256)
def for_psycopg(sql: str) -> str:
    """Rewrite ``$n`` placeholders as psycopg's ``%(pn)s`` (and escape literal ``%``)."""
    return _PLACEHOLDER.sub(r"%(p\1)s", sql.replace("%", "%%"))


def psycopg_params(args: Sequence[Any]) -> dict[str, Any]:
    """Bind values for a query rewritten by :func:`for_psycopg`, in ``$n`` order."""
    return {f"p{i}": value for i, value in enumerate(args, start=1)}
