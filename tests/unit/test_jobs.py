"""Checks on a new job before it reaches the database (clients, API and CLI share them)."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest

from dispatcher.core.errors import InvalidJob
from dispatcher.core.records import JobStatus, encode_json, new_job_values
from dispatcher.producers.plans import prepare_bulk


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def contains_itself() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


def test_defaults() -> None:
    job = new_job_values("email.send")
    assert job.payload_json == "{}"
    assert (job.priority, job.max_attempts, job.timeout, job.unique_key) == (0, None, None, None)
    assert job.run_at is None and job.run_in is None


def test_run_at_datetime_or_delay() -> None:
    when = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert new_job_values("t", run_at=when).run_at == when
    assert new_job_values("t", run_at=dt.timedelta(seconds=5)).run_in == dt.timedelta(seconds=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": ""}, "type must be a non-empty string"),
        ({"type": "   "}, "type must be a non-empty string"),
        ({"type": "x" * 201}, "at most 200 characters"),
        ({"type": "a\x00b"}, "NUL"),
        ({"priority": 40000}, "priority must be between -32768 and 32767"),
        ({"priority": "1"}, "priority must be an integer"),
        ({"priority": True}, "priority must be an integer"),
        ({"max_attempts": 0}, "max_attempts must be 1 to 10000"),
        ({"max_attempts": 10001}, "max_attempts must be 1 to 10000, got 10001"),
        ({"max_attempts": 1.5}, "max_attempts must be an integer"),
        ({"timeout": -1}, "timeout must be a positive number of seconds"),
        ({"timeout": math.inf}, "timeout must be a positive number of seconds"),
        ({"timeout": "10"}, "timeout must be a number of seconds"),
        ({"unique_key": ""}, "unique_key must be a non-empty string"),
        ({"run_at": dt.datetime(2030, 1, 1)}, "run_at must be timezone-aware"),
        ({"run_at": "tomorrow"}, "run_at must be a datetime, a timedelta or None"),
        ({"payload": {"x": math.nan}}, "payload is not JSON-serializable"),
        ({"payload": {"x": object()}}, "payload is not JSON-serializable"),
        ({"payload": {"x": "a\x00b"}}, "NUL character"),
        ({"payload": nested(100_000)}, "payload is not JSON-serializable: nested too deeply"),
        ({"payload": contains_itself()}, "payload is not JSON-serializable: nested too deeply"),
    ],
)
def test_bad_jobs_are_refused_with_a_message_naming_the_field(
    kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"type": "t", **kwargs}
    with pytest.raises(InvalidJob, match=message):
        new_job_values(args.pop("type"), **args)


def test_encode_json_is_compact_and_keeps_unicode() -> None:
    assert encode_json({"a": [1, "é"]}, what="x") == '{"a":[1,"é"]}'


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1, "b": [1.5, None, True, False, "é\u2028", -0.0, 1e300, 10**30]},
        {"c": {"d": 'quote " backslash \\ newline \n tab \t'}},
        {7: "int key", 2.5: "float key", True: "bool key", None: "None key"},
        "a plain string",
        42,
        None,
        [],
    ],
)
def test_encode_json_writes_what_the_json_module_writes(value: Any) -> None:
    # The C encoder is reused across calls (records._C_ENCODER); its text must stay the
    # standard encoder's, byte for byte.
    expected = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    assert encode_json(value, what="x") == expected


def test_prepare_bulk_names_the_bad_payload() -> None:
    with pytest.raises(InvalidJob, match="payload #2 is not JSON-serializable"):
        prepare_bulk("t", [{}, {}, {"x": {1, 2}}])


def test_prepare_bulk_checks_unique_keys_line_up() -> None:
    with pytest.raises(InvalidJob, match="unique_keys has 1 entries but there are 2 payloads"):
        prepare_bulk("t", [{}, {}], unique_keys=["a"])
    with pytest.raises(InvalidJob, match=r"unique_keys\[1\] must be a non-empty string"):
        prepare_bulk("t", [{}, {}], unique_keys=["a", ""])


def test_job_status_finished() -> None:
    assert [s.value for s in JobStatus if s.finished] == ["completed", "failed", "cancelled"]
