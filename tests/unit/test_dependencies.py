"""Job dependencies without a database: the checks on depends_on, graphs put in a
dependency order (cycles named), the statements the graph and enqueue plans send, and
how a Job reads its dependencies' results."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dispatcher.core.errors import InvalidJob
from dispatcher.core.records import new_job_values
from dispatcher.producers.graphs import enqueue_graph_plan, prepare_graph
from dispatcher.producers.plans import Run, enqueue_plan, refused_job
from dispatcher.services.dependencies import DependencyResults
from dispatcher.services.job import Job


def test_depends_on_is_a_list_of_distinct_job_ids() -> None:
    assert new_job_values("t", depends_on=[5, 3, 5]).depends_on == (5, 3)
    assert new_job_values("t", depends_on=[]).depends_on is None
    assert new_job_values("t").insert_args()[-3:] == (None, None, None)
    job = new_job_values("t", depends_on=(4,), on_dependency_failure="cancel")
    assert job.insert_args()[-3:-1] == ([4], "cancel")
    refusals = {
        "depends_on must be a list of job ids, got '12'": {"depends_on": "12"},
        "depends_on must hold job ids (positive integers), got True": {"depends_on": [True]},
        "depends_on must hold job ids (positive integers), got 0": {"depends_on": [0]},
        "depends_on must hold job ids (positive integers), got '1'": {"depends_on": ["1"]},
        "depends_on must hold job ids (positive integers), got 9223372036854775808": {
            "depends_on": [2**63]
        },
        "depends_on may name at most 10000 jobs, got 10001": {"depends_on": list(range(1, 10_002))},
        "depends_on and unique_key do not combine": {"depends_on": [1], "unique_key": "k"},
        "on_dependency_failure must be 'fail' or 'cancel', got 'ignore'": {
            "depends_on": [1],
            "on_dependency_failure": "ignore",
        },
        "on_dependency_failure needs depends_on": {"on_dependency_failure": "fail"},
    }
    for message, options in refusals.items():
        with pytest.raises(InvalidJob) as refused:
            new_job_values("t", None, **options)  # type: ignore[arg-type]
        assert str(refused.value).startswith(message), refused.value


def test_a_graph_comes_out_in_a_dependency_order() -> None:
    graph = prepare_graph(
        {
            "publish": {"type": "p", "depends_on": ["small", "large"]},
            "small": {"type": "r", "depends_on": ["fetch"], "payload": {"w": 1}},
            "fetch": {"type": "f", "depends_on": [7]},
            "large": {"type": "r", "depends_on": ["fetch"], "on_dependency_failure": "cancel"},
            "alone": {"type": "a"},
        }
    )
    assert [g.name for g in graph] == ["fetch", "alone", "small", "large", "publish"]
    by_name = {g.name: g for g in graph}
    assert by_name["fetch"].job.depends_on == (7,) and by_name["fetch"].after == ()
    assert by_name["publish"].after == ("small", "large")
    assert by_name["publish"].job.depends_on is None
    assert by_name["large"].job.on_dependency_failure == "cancel"
    assert by_name["small"].job.payload_json == '{"w":1}'
    assert prepare_graph({}) == []


def test_a_cycle_is_named() -> None:
    with pytest.raises(InvalidJob, match=r"^the graph has a cycle: b -> c -> b$"):
        prepare_graph(
            {
                "a": {"type": "t", "depends_on": ["b"]},
                "b": {"type": "t", "depends_on": ["c"]},
                "c": {"type": "t", "depends_on": ["b"]},
            }
        )


def test_bad_nodes_are_named() -> None:
    refusals = {
        "a graph is a mapping of node names to jobs": [("a", {"type": "t"})],
        "graph node names must be non-empty strings, got ''": {"": {"type": "t"}},
        "node 'a' must be a mapping": {"a": "t"},
        "node 'a': a graph's jobs take no cache_ttl, unique_key": {
            "a": {"type": "t", "unique_key": "k", "cache_ttl": 5}
        },
        "node 'a': depends_on must be a list": {"a": {"type": "t", "depends_on": "b"}},
        "node 'a': on_dependency_failure needs depends_on": {
            "a": {"type": "t", "on_dependency_failure": "cancel"}
        },
        "node 'a': unknown enqueue option colour": {"a": {"type": "t", "colour": "red"}},
        "node 'b': depends_on must hold job ids": {"b": {"type": "t", "depends_on": [1.5]}},
    }
    for message, nodes in refusals.items():
        with pytest.raises(InvalidJob) as refused:
            prepare_graph(nodes)  # type: ignore[arg-type]
        assert str(refused.value).startswith(message), refused.value


def test_the_graph_plan_reserves_ids_and_inserts_once() -> None:
    graph = prepare_graph(
        {"join": {"type": "j", "depends_on": ["x", "y", 3]}, "x": {"type": "b"}, "y": {"type": "b"}}
    )
    plan = enqueue_graph_plan(graph)
    assert next(plan) == Run("closed_queues", (["b", "j"],))
    assert plan.send([]) == Run("reserve_ids", (3,))
    insert = plan.send([{"ids": [12, 10, 11]}])
    assert isinstance(insert, Run) and insert.query == "insert_job_graph"
    ids, types, *_, depends_on, failure, trace_context = insert.args
    assert (ids, types) == ([10, 11, 12], ["b", "b", "j"])
    assert depends_on == [None, None, "{3,10,11}"] and failure == [None, None, None]
    assert trace_context is None
    with pytest.raises(StopIteration) as done:
        plan.send([{"id": 10}, {"id": 11}, {"id": 12}])
    assert done.value.value == {"x": 10, "y": 11, "join": 12}


def test_a_full_queue_refuses_the_whole_graph() -> None:
    plan = enqueue_graph_plan(prepare_graph({"a": {"type": "busy"}}))
    next(plan)
    with pytest.raises(Exception, match="the 'busy' queue is full"):
        plan.send([{"type": "busy", "max_pending": 10, "pending": 12}])


def test_enqueue_reads_a_job_with_dependencies_again() -> None:
    plan = enqueue_plan(new_job_values("t", depends_on=[1]))
    assert next(plan).query == "insert_job"  # type: ignore[union-attr]
    assert plan.send([{"id": 9, "status": "pending"}]) == Run("get_job", (9,))


def test_only_the_dependency_refusals_become_invalid_jobs() -> None:
    refusal = refused_job("depends_on_must_name_existing_jobs", "depends_on names jobs ...: 4")
    assert isinstance(refusal, InvalidJob) and str(refusal).endswith(": 4")
    assert refused_job("depends_on_must_name_earlier_jobs", "x") is not None
    assert refused_job("type_must_not_be_empty", "x") is None
    assert refused_job(None, "x") is None


class FakeReader:
    async def read(self, job_id: int) -> dict[int, Any]:
        return {job_id - 1: {"from": "async"}}

    def read_blocking(self, job_id: int) -> dict[int, Any]:
        return {job_id - 1: {"from": "thread"}}


async def test_a_job_reads_its_dependencies_results_through_its_reader() -> None:
    job = Job(5, "t", "{}", 1, 3, None, dependencies=FakeReader())
    assert await job.dependency_results() == {4: {"from": "async"}}
    assert job.dependency_results_sync() == {4: {"from": "thread"}}
    alone = Job(6, "t", "{}", 1, 3, None)
    with pytest.raises(RuntimeError, match="job 6 was built without a database"):
        await alone.dependency_results()


async def test_the_sync_form_refuses_to_block_the_event_loop() -> None:
    reader = DependencyResults(pool=None, schema="dispatcher")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"await job\.dependency_results"):
        reader.read_blocking(1)
    # From a thread it hands the read to the loop (which here has no pool to read with).
    with pytest.raises(AttributeError):
        await asyncio.to_thread(reader.read_blocking, 1)
