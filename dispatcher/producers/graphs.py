"""A small graph of jobs enqueued in one call: ``enqueue_graph``, for both clients.

A graph is a mapping of node names to jobs::

    {
        "fetch": {"type": "image.fetch", "payload": {"url": "..."}},
        "resize": {"type": "image.resize", "depends_on": ["fetch"]},
        "upload": {"type": "image.upload", "depends_on": ["resize", 41]},
    }

Each node takes ``type`` (required), ``payload``, ``depends_on`` (names of other
nodes, and ids of jobs that exist already) and the enqueue options of
:class:`dispatcher.EnqueueOptions` but ``unique_key`` and ``cache_ttl`` (a graph is
inserted whole). Its nodes get ids in a dependency order (each job's dependencies
lower), drawn from the jobs sequence first, and are inserted by one statement: all
of them or none, waiting where they must. A cycle, or a name that is no node, is
refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from dispatcher.core.errors import InvalidJob
from dispatcher.core.records import (
    MAX_DEPENDENCIES,
    NewJob,
    check_dependency_failure,
    dependency_ids,
    new_job_values,
)
from dispatcher.core.tracing import sending
from dispatcher.producers.plans import Plan, Run, queue_full_error

# Node keys beside the enqueue options.
_NODE_KEYS = frozenset({"type", "payload", "depends_on"})
# Enqueue options a node cannot take: a graph is inserted whole, never deduplicated.
_NOT_IN_GRAPHS = frozenset({"unique_key", "cache_ttl"})


@dataclass(frozen=True)
class GraphJob:
    """One validated node: its job (``depends_on``: the ids outside the graph) and the
    nodes it waits for."""

    name: str
    job: NewJob
    after: tuple[str, ...]


def prepare_graph(nodes: Mapping[str, Mapping[str, Any]]) -> list[GraphJob]:
    """Check every node; return them in a dependency order (InvalidJob naming the
    first problem: a bad node, an unknown name, a cycle)."""
    if not isinstance(nodes, Mapping):
        raise InvalidJob(f"a graph is a mapping of node names to jobs, got {nodes!r}")
    prepared: dict[str, GraphJob] = {}
    for name, node in nodes.items():
        prepared[name] = _node(name, node)
    for job in prepared.values():
        for before in job.after:
            if before not in prepared:
                raise InvalidJob(
                    f"node {job.name!r} depends on {before!r}, which is not a node of the graph"
                )
    return _in_dependency_order(prepared)


def _node(name: Any, node: Any) -> GraphJob:
    if not isinstance(name, str) or not name:
        raise InvalidJob(f"graph node names must be non-empty strings, got {name!r}")
    if not isinstance(node, Mapping):
        raise InvalidJob(f"node {name!r} must be a mapping (type, payload, ...), got {node!r}")
    refused = sorted(_NOT_IN_GRAPHS & set(node))
    if refused:
        raise InvalidJob(f"node {name!r}: a graph's jobs take no {', '.join(refused)}")
    if "type" not in node:
        raise InvalidJob(f"node {name!r} has no type")
    raw = node.get("depends_on") or []
    if isinstance(raw, str | bytes) or not isinstance(raw, list | tuple):
        raise InvalidJob(f"node {name!r}: depends_on must be a list of node names and job ids")
    after = tuple(dict.fromkeys(d for d in raw if isinstance(d, str)))
    if name in after:
        raise InvalidJob(f"node {name!r} depends on itself")
    outside = [d for d in raw if not isinstance(d, str)]
    options = {k: v for k, v in node.items() if k not in _NODE_KEYS}
    failure = options.pop("on_dependency_failure", None)
    try:
        external = dependency_ids(outside)
        job = new_job_values(node["type"], node.get("payload"), **options)
        check_dependency_failure(failure, has_dependencies=bool(raw))
    except InvalidJob as exc:
        raise InvalidJob(f"node {name!r}: {exc}") from None
    if len(after) + len(external or ()) > MAX_DEPENDENCIES:
        raise InvalidJob(f"node {name!r} may depend on at most {MAX_DEPENDENCIES} jobs")
    return GraphJob(name, replace(job, depends_on=external, on_dependency_failure=failure), after)


def _in_dependency_order(nodes: dict[str, GraphJob]) -> list[GraphJob]:
    """Kahn's algorithm, in the graph's own order among equals; InvalidJob naming a
    cycle if there is one."""
    waiting = {name: set(job.after) for name, job in nodes.items()}
    ordered: list[GraphJob] = []
    while waiting:
        ready = [name for name, before in waiting.items() if not before]
        if not ready:
            raise InvalidJob(f"the graph has a cycle: {' -> '.join(_cycle(waiting))}")
        for name in ready:
            ordered.append(nodes[name])
            del waiting[name]
        for before in waiting.values():
            before.difference_update(ready)
    return ordered


def _cycle(waiting: dict[str, set[str]]) -> list[str]:
    """A cycle among nodes that all wait on one another: follow any edge until a node
    comes round again."""
    path: list[str] = []
    name = next(iter(waiting))
    while name not in path:
        path.append(name)
        name = sorted(waiting[name])[0]
    return [*path[path.index(name) :], name]


def enqueue_graph_plan(graph: list[GraphJob]) -> Plan[dict[str, int]]:
    """Insert the graph (prepared by :func:`prepare_graph`); {node name: job id}, in
    one producer span (see plans.py) whose context all its jobs store."""
    if not graph:
        return {}
    types = {g.job.type for g in graph}
    with sending(next(iter(types)) if len(types) == 1 else None, len(graph)) as send:
        return (yield from _insert_graph(graph, send.carrier))


def _insert_graph(graph: list[GraphJob], trace_context: str | None) -> Plan[dict[str, int]]:
    closed = yield Run("closed_queues", (sorted({g.job.type for g in graph}),))
    if closed:
        raise queue_full_error(closed[0]["type"], closed[0])
    reserved = yield Run("reserve_ids", (len(graph),))
    # Sequence values, ascending in the dependency order: dependencies get lower ids.
    ids = dict(zip((g.name for g in graph), sorted(reserved[0]["ids"]), strict=True))
    jobs = [g.job for g in graph]
    depends_on = [
        _array_literal([*(g.job.depends_on or ()), *(ids[name] for name in g.after)]) for g in graph
    ]
    yield Run(
        "insert_job_graph",
        (
            list(ids.values()),
            [j.type for j in jobs],
            [j.payload_json for j in jobs],
            [j.priority for j in jobs],
            [j.max_attempts for j in jobs],
            [j.run_at for j in jobs],
            [j.run_in for j in jobs],
            [j.timeout for j in jobs],
            [j.concurrency_key for j in jobs],
            depends_on,
            [j.on_dependency_failure for j in jobs],
            trace_context,
        ),
    )
    return ids


def _array_literal(ids: list[int]) -> str | None:
    """A bigint[] literal for insert_job_graph ('{3,4}'); None for no dependencies."""
    return "{" + ",".join(map(str, ids)) + "}" if ids else None
