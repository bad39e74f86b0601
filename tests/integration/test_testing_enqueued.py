"""dispatcher.testing's assertions on what was enqueued, on a real Postgres: payloads
match by subset, other fields by equality, through a Client or inside the caller's
own psycopg transaction, and a failed assertion lists what is there instead."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import psycopg
import pytest

from dispatcher import Client
from dispatcher.testing import all_enqueued, assert_enqueued, refute_enqueued
from dispatcher.testing.enqueued import payload_matches
from tests.support.database import TestDatabase


@pytest.fixture
def client(db: TestDatabase) -> Iterator[Client]:
    with Client(db.dsn, schema=db.schema) as client:
        yield client


def test_payloads_match_by_subset() -> None:
    actual = {"to": "a@b.c", "vars": {"name": "A", "plan": "pro"}, "tags": [1, {"x": 1, "y": 2}]}
    assert payload_matches({}, actual)
    assert payload_matches({"vars": {"plan": "pro"}}, actual)
    assert payload_matches({"tags": [1, {"x": 1}]}, actual)
    assert not payload_matches({"tags": [1]}, actual)  # lists: element by element
    assert not payload_matches({"vars": {"plan": "free"}}, actual)
    assert not payload_matches({"missing": None}, actual)
    assert not payload_matches({"to": {"nested": 1}}, actual)
    assert payload_matches(3, 3) and not payload_matches(3, "3")


def test_assert_enqueued_finds_the_job_by_type_payload_and_fields(client: Client) -> None:
    first = client.enqueue("mail.send", {"to": "a@b.c", "template": "welcome"}, priority=5)
    second = client.enqueue("mail.send", {"to": "d@e.f", "template": "welcome"})
    client.enqueue("sms.send", {"to": "+1"}, run_at=dt.timedelta(hours=1))

    assert assert_enqueued(client, "mail.send", {"to": "a@b.c"}).id == first.id
    assert assert_enqueued(client, "mail.send", {"template": "welcome"}).id == first.id
    assert assert_enqueued(client, "mail.send", priority=0).id == second.id
    assert assert_enqueued(client, "sms.send").status == "pending"  # scheduled counts
    assert [j.id for j in all_enqueued(client, "mail.send")] == [first.id, second.id]
    assert len(all_enqueued(client)) == 3
    refute_enqueued(client, "mail.send", {"to": "x@y.z"})
    refute_enqueued(client, "push.send")


def test_a_failed_assertion_lists_what_is_enqueued(client: Client) -> None:
    job = client.enqueue("mail.send", {"to": "a@b.c"})
    with pytest.raises(AssertionError) as failed:
        assert_enqueued(client, "mail.send", {"to": "x@y.z"}, priority=0)
    message = str(failed.value)
    assert (
        "expected a job matching type='mail.send', payload={'to': 'x@y.z'}, priority=0" in message
    )
    assert f"job {job.id} 'mail.send' pending payload={{'to': 'a@b.c'}}" in message
    with pytest.raises(AssertionError, match=r"no job of type 'push\.send' is enqueued"):
        assert_enqueued(client, "push.send")
    with pytest.raises(AssertionError, match=r"expected no job matching type='mail.send'.*found 1"):
        refute_enqueued(client, "mail.send")
    with pytest.raises(TypeError, match="unknown job field"):
        assert_enqueued(client, "mail.send", colour="red")


def test_started_and_finished_jobs_are_not_enqueued_unless_asked(client: Client) -> None:
    job = client.enqueue("mail.send", {"to": "a@b.c"})
    client.cancel(job.id)
    refute_enqueued(client, "mail.send")
    assert assert_enqueued(client, "mail.send", status="cancelled").id == job.id
    waiting = client.enqueue("mail.send", {"to": "later"}, depends_on=[client.enqueue("x").id])
    assert assert_enqueued(client, "mail.send", {"to": "later"}).id == waiting.id
    assert assert_enqueued(client, "mail.send", status="waiting").id == waiting.id


def test_on_a_connection_it_sees_the_open_transaction(db: TestDatabase, client: Client) -> None:
    with psycopg.connect(db.dsn) as conn:  # a transaction, as in the caller's own code
        client.enqueue("mail.send", {"to": "a@b.c"}, conn=conn)
        assert_enqueued(conn, "mail.send", {"to": "a@b.c"}, schema=db.schema)
        refute_enqueued(client, "mail.send")  # not committed: other sessions see nothing
        conn.rollback()
        refute_enqueued(conn, "mail.send", schema=db.schema)
    with pytest.raises(ValueError, match="the client's schema is"):
        assert_enqueued(client, "mail.send", schema="elsewhere")
