"""OpenTelemetry on a real Postgres: the trace context an enqueue stores, and the span
each attempt runs in (in-process replicas, and a real replica process).

Jobs enqueued in a span by the async client, the sync client, the HTTP API (a
``traceparent`` header) and plain SQL (a ``traceparent`` in ``trace_context``) run
in a child span of it; a job that fails and is retried records each failure on the
span of its attempt; a job without a context, or with one that cannot be read, gets
a root span and runs as usual; a replica with ``otel=false`` starts no span; and
the README's example runs as written.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dispatcher import AsyncClient, Client, InvalidJob, Job
from dispatcher.core import tracing
from dispatcher.core.app import App
from dispatcher.core.retry import RetryPolicy
from tests.support.database import TestDatabase
from tests.support.processes import ReplicaProcess
from tests.support.runtimes import StartRuntime, fast_env
from tests.support.tracing import by_name, recorded_spans, tracer
from tests.support.waiting import eventually

TOKEN = "tracing-token-0123456789"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans() as exporter:
        yield exporter


def traced_app() -> App:
    app = App(concurrency=20, retry=RetryPolicy(base=0.05, cap=0.1))

    @app.executor("tr.work")
    async def work(job: Job) -> Any:
        with tracer().start_as_current_span("work inner"):
            return job.payload

    @app.executor("tr.sync")
    def sync_work(job: Job) -> str:
        with tracer().start_as_current_span("sync inner"):
            return "ok"

    @app.executor("tr.flaky", max_attempts=3)
    async def flaky(job: Job) -> str:
        if job.attempt < 3:
            raise ValueError(f"flaky failure {job.attempt}")
        return "third time lucky"

    return app


def hex_ids(span: trace.Span | ReadableSpan) -> tuple[str, str]:
    """(trace id, span id) of ``span``, as a traceparent writes them."""
    context = span.get_span_context()
    assert context is not None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def parent_of(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


def ancestors(span: ReadableSpan | dict[str, Any], spans: Sequence[Any]) -> list[str]:
    """The ids of ``span``'s parent, its parent's, ... as far as ``spans`` (spans, or
    dicts as tests.support.tracing.described makes them) know them, and the last
    parent beyond (e.g. a remote one)."""
    parents = {}
    for s in spans:
        described_ = (
            s if isinstance(s, dict) else {"span_id": hex_ids(s)[1], "parent_id": parent_of(s)}
        )
        parents[described_["span_id"]] = described_["parent_id"]
    found = []
    parent = span["parent_id"] if isinstance(span, dict) else parent_of(span)
    while parent is not None:
        found.append(parent)
        parent = parents.get(parent)
    return found


def process_spans(exporter: InMemorySpanExporter, job_id: int) -> list[ReadableSpan]:
    """The attempts' spans of job ``job_id``, in attempt order."""
    found = [
        span
        for span in exporter.get_finished_spans()
        if span.name.startswith("process ")
        and (span.attributes or {}).get("messaging.message.id") == str(job_id)
    ]
    return sorted(found, key=lambda span: int(str((span.attributes or {})[tracing.ATTEMPT])))


async def attempts_traced(
    exporter: InMemorySpanExporter, job_ids: Sequence[int], *, attempts: int = 1
) -> dict[int, list[ReadableSpan]]:
    """Wait until each job's attempts ended in spans; {job id: its spans}."""

    async def done() -> dict[int, list[ReadableSpan]] | None:
        found = {job_id: process_spans(exporter, job_id) for job_id in job_ids}
        return found if all(len(s) >= attempts for s in found.values()) else None

    return await eventually(done, timeout=20, what=f"{attempts} traced attempts of {job_ids}")


async def statuses(db: TestDatabase, job_ids: Sequence[int]) -> list[str]:
    conn = await db.connect()
    try:
        rows = await conn.fetch(f"SELECT id, status FROM {db.jobs} WHERE id = ANY($1)", job_ids)
    finally:
        await conn.close()
    by_id = {row["id"]: row["status"] for row in rows}
    return [by_id[job_id] for job_id in job_ids]


async def test_every_producer_puts_its_jobs_in_the_trace_of_its_caller(
    db: TestDatabase, start_runtime: StartRuntime, spans: InMemorySpanExporter
) -> None:
    runtime = await start_runtime(traced_app(), api_token=TOKEN)
    aclient = await AsyncClient.connect(db.dsn, schema=db.schema)
    client = Client(db.dsn, schema=db.schema)
    try:
        with tracer().start_as_current_span("async caller") as async_caller:
            by_async = (await aclient.enqueue("tr.work", {"n": 1})).id
            graph = await aclient.enqueue_graph(
                {"a": {"type": "tr.work"}, "b": {"type": "tr.sync", "depends_on": ["a"]}}
            )
        with tracer().start_as_current_span("sync caller") as sync_caller:
            by_sync = (await asyncio.to_thread(client.enqueue, "tr.sync")).id
            by_many = await asyncio.to_thread(client.enqueue_many, "tr.work", [{"m": 1}, {"m": 2}])
        # A request from another service, with no span current here: the header is all.
        caller = tracer().start_span("remote caller")
        caller.end()
        header = f"00-{hex_ids(caller)[0]}-{hex_ids(caller)[1]}-01"
        transport = httpx.ASGITransport(app=runtime.api)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as http:
            response = await http.post(
                "/jobs",
                json={"type": "tr.work"},
                headers={"Authorization": f"Bearer {TOKEN}", "traceparent": header},
            )
        assert response.status_code == 201, response.text
        by_http = response.json()["id"]
        conn = await db.connect()
        try:
            by_sql = await conn.fetchval(
                f"INSERT INTO {db.jobs} (type, trace_context) VALUES ('tr.work', $1) RETURNING id",
                json.dumps({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}),
            )
        finally:
            await conn.close()
        ids = [by_async, graph["a"], graph["b"], by_sync, *by_many, by_http, by_sql]
        traced = await attempts_traced(spans, ids)
    finally:
        await aclient.close()
        await asyncio.to_thread(client.close)
    finished = spans.get_finished_spans()

    def sent_under(caller: trace.Span | ReadableSpan, name: str) -> ReadableSpan:
        """The one producer span ``name`` under ``caller`` (its child; or, over HTTP,
        a child of the server's spans, when FastAPI makes them)."""
        trace_id, caller_id = hex_ids(caller)
        (sent,) = [s for s in by_name(finished, name) if caller_id in ancestors(s, finished)]
        assert sent.kind is SpanKind.PRODUCER
        assert hex_ids(sent)[0] == trace_id
        return sent

    graph_sent = sent_under(async_caller, "send")  # two types: no destination in the name
    assert (graph_sent.attributes or {})["messaging.batch.message_count"] == 2
    many_sent = sent_under(sync_caller, "send tr.work")
    assert (many_sent.attributes or {})["messaging.batch.message_count"] == 2
    expected_parent = {
        by_async: sent_under(async_caller, "send tr.work"),
        graph["a"]: graph_sent,
        graph["b"]: graph_sent,
        by_sync: sent_under(sync_caller, "send tr.sync"),
        by_many[0]: many_sent,
        by_many[1]: many_sent,
        by_http: sent_under(caller, "send tr.work"),
    }
    for job_id, sent in expected_parent.items():
        (process,) = traced[job_id]
        assert process.kind is SpanKind.CONSUMER
        assert hex_ids(process)[0] == hex_ids(sent)[0], job_id
        assert parent_of(process) == hex_ids(sent)[1], job_id
    assert (sent_under(async_caller, "send tr.work").attributes or {})[
        "messaging.message.id"
    ] == str(by_async)
    (from_sql,) = traced[by_sql]
    assert (hex_ids(from_sql)[0], parent_of(from_sql)) == (TRACE_ID, PARENT_ID)
    assert dict(from_sql.attributes or {}) == {
        "messaging.system": "dispatcher",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "tr.work",
        "messaging.message.id": str(by_sql),
        tracing.ATTEMPT: 1,
        tracing.OUTCOME: "completed",
    }
    # The executors' own spans nest under their attempt's, async and in a thread.
    for inner_name, job_id in (("work inner", by_async), ("sync inner", by_sync)):
        (process,) = traced[job_id]
        inner = [s for s in by_name(finished, inner_name) if parent_of(s) == hex_ids(process)[1]]
        assert len(inner) == 1, inner_name
    assert await statuses(db, ids) == ["completed"] * len(ids)


async def test_an_enqueue_the_database_refuses_records_why_on_its_span(
    db: TestDatabase, spans: InMemorySpanExporter
) -> None:
    async with await AsyncClient.connect(db.dsn, schema=db.schema) as aclient:
        with tracer().start_as_current_span("request"), pytest.raises(InvalidJob):
            await aclient.enqueue("tr.work", depends_on=[987654321])
    client = Client(db.dsn, schema=db.schema)
    try:
        with tracer().start_as_current_span("request"), pytest.raises(InvalidJob):
            await asyncio.to_thread(client.enqueue, "tr.work", depends_on=[987654321])
    finally:
        client.close()
    sends = by_name(spans.get_finished_spans(), "send tr.work")
    assert len(sends) == 2
    for send in sends:
        assert send.status.status_code is StatusCode.ERROR
        (event,) = send.events
        assert (event.name, (event.attributes or {})["exception.type"]) == (
            "exception", "dispatcher.core.errors.InvalidJob",
        )  # fmt: skip


async def test_a_retried_job_records_each_failure_on_its_attempt_s_span(
    db: TestDatabase, start_runtime: StartRuntime, spans: InMemorySpanExporter
) -> None:
    await start_runtime(traced_app())
    aclient = await AsyncClient.connect(db.dsn, schema=db.schema)
    try:
        with tracer().start_as_current_span("caller"):
            job = await aclient.enqueue("tr.flaky")
    finally:
        await aclient.close()
    first, second, third = (await attempts_traced(spans, [job.id], attempts=3))[job.id]
    (sent,) = by_name(spans.get_finished_spans(), "send tr.flaky")
    for attempt, span in enumerate((first, second, third), start=1):
        attributes = span.attributes or {}
        assert attributes[tracing.ATTEMPT] == attempt
        assert parent_of(span) == hex_ids(sent)[1]
    for attempt, span in ((1, first), (2, second)):
        attributes = span.attributes or {}
        assert attributes[tracing.OUTCOME] == "retry"
        assert 0 <= float(str(attributes[tracing.DELAY])) <= 0.1
        assert attributes["error.type"] == "builtins.ValueError"
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == f"ValueError: flaky failure {attempt}"
        (event,) = span.events
        assert event.name == "exception"
        assert (event.attributes or {})["exception.message"] == f"flaky failure {attempt}"
    assert (third.attributes or {})[tracing.OUTCOME] == "completed"
    assert third.status.status_code is StatusCode.UNSET and third.events == ()


HOSTILE_CONTEXTS = [
    None,
    {},
    {"traceparent": "garbage"},
    {"traceparent": 5, "tracestate": ["x"]},
    {"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"},
    {"traceparent": f"ff-{TRACE_ID}-{PARENT_ID}-01"},
    {"tracestate": "a=1", "baggage": "k=v"},
    {"nested": {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}},
]


async def test_a_job_without_a_readable_context_runs_in_a_root_span(
    db: TestDatabase, start_runtime: StartRuntime, spans: InMemorySpanExporter
) -> None:
    await start_runtime(traced_app())
    conn = await db.connect()
    try:
        ids = [
            await conn.fetchval(
                f"INSERT INTO {db.jobs} (type, trace_context) VALUES ('tr.work', $1) RETURNING id",
                None if context is None else json.dumps(context),
            )
            for context in HOSTILE_CONTEXTS
        ]
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            await conn.execute(
                f"INSERT INTO {db.jobs} (type, trace_context) VALUES ('tr.work', $1)",
                json.dumps(f"00-{TRACE_ID}-{PARENT_ID}-01"),
            )
    finally:
        await conn.close()
    assert "trace_context_must_be_an_object_of_at_most_4kb" in str(refused.value)
    traced = await attempts_traced(spans, ids)
    for job_id, context in zip(ids, HOSTILE_CONTEXTS, strict=True):
        (process,) = traced[job_id]
        assert process.parent is None, context
        assert (process.attributes or {})[tracing.OUTCOME] == "completed", context
    assert await statuses(db, ids) == ["completed"] * len(ids)


async def test_a_replica_with_otel_false_starts_no_span(
    db: TestDatabase, start_runtime: StartRuntime, spans: InMemorySpanExporter
) -> None:
    await start_runtime(traced_app(), otel="false")
    aclient = await AsyncClient.connect(db.dsn, schema=db.schema)
    try:
        with tracer().start_as_current_span("caller"):
            job = await aclient.enqueue("tr.work")

        async def completed() -> bool:
            return (await aclient.get(job.id)).status == "completed"

        await eventually(completed, timeout=20, what="the job to complete")
    finally:
        await aclient.close()
    names = {span.name for span in spans.get_finished_spans()}
    assert names == {"caller", "send tr.work", "work inner"}


# --- across processes ----------------------------------------------------------------------


async def test_a_real_replica_runs_the_job_in_its_producer_s_trace(
    db: TestDatabase, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    spans_file = tmp_path / "replica-spans.json"
    replica = ReplicaProcess(
        "tests.support.traced_app:app",
        name="traced",
        env={
            **fast_env(),
            "DISPATCHER_DSN": db.dsn,
            "DISPATCHER_SCHEMA": db.schema,
            "DISPATCHER_API_TOKEN": TOKEN,
            "DISPATCHER_TEST_SPANS": str(spans_file),
        },
        log_path=tmp_path / "replica.log",
    )
    try:
        await asyncio.to_thread(replica.wait_healthy)
        aclient = await AsyncClient.connect(db.dsn, schema=db.schema)
        try:
            with tracer().start_as_current_span("checkout") as checkout:
                by_client = (await aclient.enqueue("x.traced")).id
                # Over HTTP: this process's span travels in the traceparent header.
                headers = {"Authorization": f"Bearer {TOKEN}"}
                propagate.inject(headers)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{replica.port}") as http:
                    response = await http.post("/jobs", json={"type": "x.traced"}, headers=headers)
            assert response.status_code == 201, response.text
            by_http = response.json()["id"]

            async def completed() -> bool:
                jobs = [await aclient.get(job_id) for job_id in (by_client, by_http)]
                return all(job.status == "completed" for job in jobs)

            await eventually(completed, timeout=30, what="both jobs to complete")
        finally:
            await aclient.close()
        assert await asyncio.to_thread(replica.stop) == 0, replica.log_tail()
    finally:
        replica.stop()
    (sent,) = by_name(spans.get_finished_spans(), "send x.traced")
    trace_id, checkout_id = hex_ids(checkout)
    replica_spans: list[dict[str, Any]] = json.loads(spans_file.read_text(encoding="utf-8"))
    processes = {s["attributes"]["messaging.message.id"]: s for s in replica_spans
                 if s["name"] == "process x.traced"}  # fmt: skip
    by_client_span, by_http_span = processes[str(by_client)], processes[str(by_http)]
    # Enqueued here: the replica's span is a child of this process's producer span.
    assert by_client_span["trace_id"] == trace_id
    assert by_client_span["parent_id"] == hex_ids(sent)[1]
    assert by_client_span["kind"] == "CONSUMER"
    # Over HTTP: the replica's own producer span descends from this process's span.
    (http_sent,) = [s for s in replica_spans if s["name"] == "send x.traced"]
    assert http_sent["trace_id"] == trace_id
    assert checkout_id in ancestors(http_sent, replica_spans)
    assert by_http_span["trace_id"] == trace_id
    assert by_http_span["parent_id"] == http_sent["span_id"]
    inner = [s for s in replica_spans if s["name"] == "inner work"]
    assert sorted(s["parent_id"] for s in inner) == sorted(
        [by_client_span["span_id"], by_http_span["span_id"]]
    )


# --- the README's example ------------------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_blocks() -> list[tuple[str, str]]:
    """The fenced blocks (language, text) of the README's tracing section."""
    section = README.read_text(encoding="utf-8").split("\n## Tracing with OpenTelemetry\n", 1)[1]
    return FENCE.findall(section.split("\n## ", 1)[0])


async def test_the_readme_example_traces_a_job_from_its_enqueue_to_its_attempt(
    db: TestDatabase, start_runtime: StartRuntime, spans: InMemorySpanExporter
) -> None:
    languages = [language for language, _ in readme_blocks()]
    assert languages == ["sh", "python", "python", "python", "sql"]
    _, (_, telemetry), (_, jobs), (_, producer), (_, sql) = readme_blocks()
    # The SDK set up as the README does: this process has one already (the tests'),
    # which the API keeps, so the README's spans are recorded by it.
    exec(telemetry, {"__name__": "readme_telemetry"})
    namespace: dict[str, Any] = {"__name__": "readme_jobs"}
    exec(jobs, namespace)
    await start_runtime(namespace["app"])
    # The README's database and schema, swapped for this test's.
    producer = re.sub(r'^DSN = ".*"$', f"DSN = {db.dsn!r}", producer, flags=re.M)
    producer = producer.replace("Client(DSN)", f"Client(DSN, schema={db.schema!r})")
    web: dict[str, Any] = {"__name__": "readme_web"}
    await asyncio.to_thread(exec, producer, web)
    web["client"].close()
    conn = await db.connect()
    try:
        by_sql = await conn.fetchval(
            sql.replace("dispatcher.jobs", db.jobs).rstrip().rstrip(";") + " RETURNING id"
        )
    finally:
        await conn.close()
    job_id = web["job"].id
    traced = await attempts_traced(spans, [job_id, by_sql])
    finished = spans.get_finished_spans()
    (checkout,) = by_name(finished, "checkout")
    (sent,) = by_name(finished, "send invoice.render")
    (process,) = traced[job_id]
    render = [s for s in by_name(finished, "render pdf") if parent_of(s) == hex_ids(process)[1]]
    # One trace: checkout > send invoice.render > process invoice.render > render pdf
    assert parent_of(sent) == hex_ids(checkout)[1]
    assert parent_of(process) == hex_ids(sent)[1]
    assert len(render) == 1
    assert {hex_ids(s)[0] for s in (checkout, sent, process, *render)} == {hex_ids(checkout)[0]}
    (from_sql,) = traced[by_sql]
    assert (hex_ids(from_sql)[0], parent_of(from_sql)) == (TRACE_ID, PARENT_ID)
