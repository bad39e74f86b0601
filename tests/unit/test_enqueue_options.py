"""The enqueue options are defined once (dispatcher.core.records.EnqueueOptions): every
surface takes each of them, so a new option cannot reach one and miss another."""

from __future__ import annotations

import argparse

import pytest

from dispatcher import EnqueueOptions
from dispatcher.cli.main import build_parser
from dispatcher.core.errors import InvalidJob
from dispatcher.core.records import ENQUEUE_OPTION_HELP, new_job_values
from dispatcher.http.jobs import EnqueueRequest
from dispatcher.producers.plans import prepare_bulk

OPTIONS = EnqueueOptions.__optional_keys__


def test_every_option_is_documented_once() -> None:
    assert set(ENQUEUE_OPTION_HELP) == OPTIONS


def test_post_jobs_takes_every_option() -> None:
    # run_at may also be given over HTTP as a delay in seconds.
    assert set(EnqueueRequest.model_fields) - {"type", "payload", "delay"} == OPTIONS


def test_dispatcher_enqueue_takes_every_option() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    enqueue = commands.choices["enqueue"]
    flags = {a.dest for a in enqueue._actions} - {"help", "json", "type", "payload", "delay"}
    assert flags == OPTIONS


def test_an_unknown_option_is_refused_by_name() -> None:
    with pytest.raises(InvalidJob, match="unknown enqueue option priorty; known: cache_ttl"):
        new_job_values("t", None, priorty=3)  # type: ignore[call-arg]
    with pytest.raises(InvalidJob, match="unknown enqueue_many option unique_key; known"):
        prepare_bulk("t", [{}], unique_key="k")  # type: ignore[call-arg]
