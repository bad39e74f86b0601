"""Named queries: parsing, schema substitution, placeholder rewriting."""

from __future__ import annotations

import pytest

from dispatcher.core.errors import ConfigError
from dispatcher.core.queries import (
    for_psycopg,
    parse_named_queries,
    psycopg_params,
    queries_for,
)
from dispatcher.core.schema import SchemaNames, validate_schema_name


def test_parse_named_queries_splits_on_headers() -> None:
    text = "-- preamble\n-- name: one\n-- first\nSELECT 1;\n\n-- name: two\nSELECT $1;\n"
    assert parse_named_queries(text) == {"one": "-- first\nSELECT 1", "two": "SELECT $1"}


def test_parse_named_queries_refuses_a_repeated_name() -> None:
    with pytest.raises(ValueError, match="'one' is defined twice"):
        parse_named_queries("-- name: one\nSELECT 1;\n-- name: one\nSELECT 2;\n")


def test_a_fragment_is_spliced_into_every_query_that_names_it() -> None:
    text = (
        "-- fragment: tail\n-- what the tail does\nLIMIT $1;\n\n"
        "-- name: one\nSELECT 1 {{tail}};\n-- name: two\nSELECT {{schema}}.x {{tail}};\n"
    )
    assert parse_named_queries(text) == {
        "one": "SELECT 1 LIMIT $1",
        "two": "SELECT {{schema}}.x LIMIT $1",
    }


def test_a_fragment_may_use_fragments_but_not_itself() -> None:
    text = (
        "-- fragment: limit\nLIMIT $1;\n-- fragment: tail\nORDER BY 1 {{limit}};\n"
        "-- name: one\nSELECT 1 {{tail}};\n"
    )
    assert parse_named_queries(text) == {"one": "SELECT 1 ORDER BY 1 LIMIT $1"}
    with pytest.raises(ValueError, match="fragment 'a' uses itself: a -> b"):
        parse_named_queries(
            "-- fragment: a\nx {{b}};\n-- fragment: b\ny {{a}};\n-- name: one\nSELECT {{a}};\n"
        )


def test_a_fragment_used_with_a_shift_has_its_parameters_renumbered() -> None:
    text = (
        "-- fragment: limit\nLIMIT $1;\n-- fragment: tail\nWHERE a = $2 {{limit}};\n"
        "-- name: one\nSELECT $1, $2 FROM {{schema}}.t {{tail+2}};\n"
        "-- name: two\nSELECT 1 {{tail}};\n"
    )
    assert parse_named_queries(text) == {
        "one": "SELECT $1, $2 FROM {{schema}}.t WHERE a = $4 LIMIT $3",
        "two": "SELECT 1 WHERE a = $2 LIMIT $1",
    }


def test_an_unknown_fragment_is_an_error() -> None:
    with pytest.raises(ValueError, match="no fragment named 'tail'"):
        parse_named_queries("-- name: one\nSELECT 1 {{tail}};\n")


def test_an_unused_fragment_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"fragments never used in queries\.sql: tail"):
        parse_named_queries("-- fragment: tail\nLIMIT 1;\n-- name: one\nSELECT 1;\n")


def test_a_fragment_may_not_share_a_query_name() -> None:
    with pytest.raises(ValueError, match="fragment 'one' is defined twice"):
        parse_named_queries("-- name: one\nSELECT 1;\n-- fragment: one\nLIMIT 1;\n")


def test_both_claims_share_the_pick_and_start_tail() -> None:
    queries = queries_for("dispatcher")
    tail = "FOR UPDATE SKIP LOCKED"
    assert tail in queries["claim_jobs"] and tail in queries["claim_jobs_worker"]
    assert tail in queries["complete_and_claim_jobs"]
    # The completion it carries is complete_jobs' own, after claim_jobs' 11 parameters.
    assert "$12::text AS owner" in queries["complete_and_claim_jobs"]
    assert "$1::text AS owner" in queries["complete_jobs"]
    assert all("{{" not in sql for sql in queries.values())


def test_queries_for_substitutes_the_quoted_schema_everywhere() -> None:
    queries = queries_for("my_app")
    assert '"my_app".jobs' in queries["get_job"]
    assert all("{{schema}}" not in sql for sql in queries.values())


def test_unknown_query_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"no query named 'nope'.*get_job"):
        queries_for("dispatcher")["nope"]


def test_for_psycopg_rewrites_placeholders_and_escapes_percent() -> None:
    sql = "SELECT $1, $2, $1 WHERE x LIKE 'a%' AND $10 > 0"
    assert for_psycopg(sql) == ("SELECT %(p1)s, %(p2)s, %(p1)s WHERE x LIKE 'a%%' AND %(p10)s > 0")
    assert psycopg_params(["a", "b"]) == {"p1": "a", "p2": "b"}


@pytest.mark.parametrize("name", ["dispatcher", "t_0123", "_x", "a" * 40])
def test_valid_schema_names(name: str) -> None:
    assert validate_schema_name(name) == name


@pytest.mark.parametrize("name", ["", "Upper", "1abc", "has-dash", 'q"uote', "a" * 41, "x y"])
def test_invalid_schema_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(ConfigError, match="use 1-40 characters of a-z, 0-9 and _"):
        validate_schema_name(name)


def test_schema_names_derive_channels_and_locks() -> None:
    names = SchemaNames("app")
    assert names.quoted == '"app"'
    assert names.jobs_channel == "app.jobs"
    assert names.cancel_channel == "app.cancel"
    assert names.leader_channel == "app.leader"
    assert names.leader_lock_name != names.migration_lock_name
