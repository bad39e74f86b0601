"""OpenTelemetry without a database (dispatcher.core.tracing): the carrier an enqueue
stores, the span each attempt runs in, what is ignored, and the package without the
otel extra."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dispatcher import Snooze
from dispatcher.core import tracing
from dispatcher.core.app import App
from dispatcher.core.config import load_settings
from dispatcher.core.errors import ConfigError
from dispatcher.core.records import new_job_values
from dispatcher.core.retry import RetryPolicy
from dispatcher.producers.plans import CopyRows, Run, enqueue_many_plan, enqueue_plan, prepare_bulk
from dispatcher.services.executor import Attempt, OutcomeKind, run_traced_attempt, thread_pool
from dispatcher.services.job import Job
from tests.support.tracing import by_name, recorded_spans, tracer

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans() as exporter:
        yield exporter


def traceparent_of(carrier: str | None) -> tuple[str, str]:
    """(trace id, span id) of a stored carrier's traceparent."""
    assert carrier is not None
    _, trace_id, span_id, _ = json.loads(carrier)["traceparent"].split("-")
    return trace_id, span_id


# --- producers ------------------------------------------------------------------------


def test_an_enqueue_outside_a_span_stores_nothing_and_starts_nothing(
    spans: InMemorySpanExporter,
) -> None:
    plan = enqueue_plan(new_job_values("t.one"))
    insert = next(plan)
    assert isinstance(insert, Run) and insert.args[-1] is None
    assert tracing.sending("t.one") is tracing.sending("t.two")  # the shared no-op
    assert spans.get_finished_spans() == ()


def test_an_enqueue_in_a_span_stores_the_context_of_its_producer_span(
    spans: InMemorySpanExporter,
) -> None:
    with tracer().start_as_current_span("request") as request:
        plan = enqueue_plan(new_job_values("t.one", {"k": 1}))
        insert = next(plan)
        assert isinstance(insert, Run) and insert.query == "insert_job"
        with pytest.raises(StopIteration) as done:
            plan.send([row_of(41, "t.one")])
    assert done.value.value.id == 41
    (send,) = by_name(spans.get_finished_spans(), "send t.one")
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == request.get_span_context().span_id
    assert dict(send.attributes or {}) == {
        "messaging.system": "dispatcher",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "t.one",
        "messaging.message.id": "41",
    }
    trace_id, span_id = traceparent_of(insert.args[-1])
    assert trace_id == f"{send.context.trace_id:032x}"
    assert span_id == f"{send.context.span_id:016x}"


def test_a_failed_enqueue_ends_its_span_in_error(spans: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("request"):
        plan = enqueue_plan(new_job_values("t.one"))
        next(plan)
        plan.close()  # what becomes of a plan whose runner was cancelled
        plan = enqueue_plan(new_job_values("t.one", unique_key="k"))
        next(plan)
        with pytest.raises(ValueError, match="boom"):
            plan.throw(ValueError("boom"))
    first, second = by_name(spans.get_finished_spans(), "send t.one")
    assert first.status.status_code is StatusCode.ERROR
    assert second.status.status_code is StatusCode.ERROR
    assert [event.name for event in second.events] == ["exception"]


def test_enqueue_many_stores_one_context_for_all_its_jobs(spans: InMemorySpanExporter) -> None:
    plan = enqueue_many_plan(prepare_bulk("t.bulk", [{}, {}]))
    next(plan)
    copy = plan.send([{"ids": [1, 2], "max_pending": None, "run_at": None}])
    assert isinstance(copy, CopyRows) and copy.lean  # no span: the lean COPY, as before
    with tracer().start_as_current_span("batch"):
        plan = enqueue_many_plan(prepare_bulk("t.bulk", [{}, {}]))
        next(plan)
        copy = plan.send([{"ids": [1, 2], "max_pending": None, "run_at": None}])
        assert isinstance(copy, CopyRows) and not copy.lean
        rows = list(copy.rows)
        with pytest.raises(StopIteration):
            plan.send([])
    (send,) = by_name(spans.get_finished_spans(), "send t.bulk")
    assert (send.attributes or {})["messaging.batch.message_count"] == 2
    assert len({row[-1] for row in rows}) == 1
    assert traceparent_of(rows[0][-1])[1] == f"{send.context.span_id:016x}"


def test_otel_false_in_the_environment_stores_nothing(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHER_OTEL", "false")
    with tracer().start_as_current_span("request"):
        insert = next(enqueue_plan(new_job_values("t.one")))
    assert isinstance(insert, Run) and insert.args[-1] is None


def test_a_carrier_too_large_for_the_row_keeps_only_its_traceparent() -> None:
    assert tracing.carrier_json({}) is None
    small = {"traceparent": TRACEPARENT, "tracestate": "a=1"}
    assert json.loads(tracing.carrier_json(small) or "") == small
    huge = {"traceparent": TRACEPARENT, "baggage": "k=" + "v" * tracing.MAX_CARRIER_BYTES}
    assert json.loads(tracing.carrier_json(huge) or "") == {"traceparent": TRACEPARENT}
    assert tracing.carrier_json({"baggage": "v" * tracing.MAX_CARRIER_BYTES}) is None


def test_a_request_s_traceparent_is_current_unless_a_span_already_is() -> None:
    assert tracing.incoming({}) is tracing.NOTHING
    with tracing.incoming({"traceparent": TRACEPARENT, "tracestate": "a=1"}):
        context = trace.get_current_span().get_span_context()
        assert (f"{context.trace_id:032x}", f"{context.span_id:016x}") == (TRACE_ID, PARENT_ID)
    assert not trace.get_current_span().get_span_context().is_valid
    with tracing.incoming({"traceparent": "garbage"}):
        assert not trace.get_current_span().get_span_context().is_valid
    with (
        tracer().start_as_current_span("server") as server,
        tracing.incoming({"traceparent": TRACEPARENT}),
    ):
        assert trace.get_current_span() is server


# --- attempts -------------------------------------------------------------------------


def attempt_of(function: Any, *, attempt: int = 1, timeout: float | None = None) -> Attempt:
    app = App(retry=RetryPolicy(base=1, cap=8))
    app.executor("t.run")(function)
    spec = app.executors["t.run"]
    job = Job(7, "t.run", "{}", attempt, 3, timeout, threaded=not spec.is_async)
    return Attempt(job, spec)


async def run_traced(function: Any, carrier: str | None = None, **kwargs: Any) -> Any:
    attempt_tracer = tracing.attempt_tracer("true")
    assert attempt_tracer is not None
    with thread_pool(2) as threads:
        return await run_traced_attempt(
            attempt_of(function, **kwargs), attempt_tracer, carrier, threads
        )


async def test_an_attempt_runs_in_a_consumer_span_child_of_its_stored_context(
    spans: InMemorySpanExporter,
) -> None:
    seen: list[Any] = []

    async def work(job: Job) -> None:
        seen.extend([trace.get_current_span().get_span_context(), baggage.get_baggage("tenant")])
        with tracer().start_as_current_span("inner"):
            pass

    carrier = json.dumps({"traceparent": TRACEPARENT, "baggage": "tenant=acme"})
    outcome = await run_traced(work, carrier, attempt=2)
    assert outcome.kind is OutcomeKind.COMPLETED
    (process,) = by_name(spans.get_finished_spans(), "process t.run")
    (inner,) = by_name(spans.get_finished_spans(), "inner")
    assert process.kind is SpanKind.CONSUMER
    assert f"{process.context.trace_id:032x}" == TRACE_ID
    assert process.parent is not None and f"{process.parent.span_id:016x}" == PARENT_ID
    assert dict(process.attributes or {}) == {
        "messaging.system": "dispatcher",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "t.run",
        "messaging.message.id": "7",
        tracing.ATTEMPT: 2,
        tracing.OUTCOME: "completed",
    }
    assert process.status.status_code is StatusCode.UNSET
    assert seen == [process.context, "acme"]
    assert inner.parent is not None and inner.parent.span_id == process.context.span_id


async def test_a_plain_def_executor_runs_in_its_span_in_its_thread(
    spans: InMemorySpanExporter,
) -> None:
    seen: list[trace.SpanContext] = []

    def work(job: Job) -> None:
        seen.append(trace.get_current_span().get_span_context())
        raise ValueError("bad input")

    outcome = await run_traced(work)
    assert outcome.kind is OutcomeKind.RETRY
    (process,) = by_name(spans.get_finished_spans(), "process t.run")
    assert seen == [process.context] and process.parent is None  # no context stored: a root
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "ValueError: bad input"
    attributes = process.attributes or {}
    assert attributes[tracing.OUTCOME] == "retry" and attributes[tracing.DELAY] == outcome.delay
    assert attributes["error.type"] == "builtins.ValueError"
    (event,) = process.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.message"] == "bad input"


async def test_timeouts_snoozes_and_permanent_failures_end_their_spans_as_such(
    spans: InMemorySpanExporter,
) -> None:
    async def hang(job: Job) -> None:
        await asyncio.Event().wait()  # never set: only the timeout ends it

    async def later(job: Job) -> None:
        raise Snooze(30)

    async def broken(job: Job) -> None:
        from dispatcher import PermanentError

        raise PermanentError("corrupt")

    assert (await run_traced(hang, timeout=0.05)).kind is OutcomeKind.RETRY
    assert (await run_traced(later)).kind is OutcomeKind.SNOOZE
    assert (await run_traced(broken)).kind is OutcomeKind.FAILED
    timed_out, snoozed, failed = by_name(spans.get_finished_spans(), "process t.run")
    assert (timed_out.attributes or {})["error.type"] == "timeout"
    assert timed_out.events == () or all(e.name != "exception" for e in timed_out.events)
    assert snoozed.status.status_code is StatusCode.UNSET and snoozed.events == ()
    assert (snoozed.attributes or {})[tracing.DELAY] == 30
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "dispatcher.core.errors.PermanentError"


@pytest.mark.parametrize(
    "carrier",
    [
        "not json",
        "[1, 2]",
        '"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"',
        "{}",
        '{"traceparent": 5}',
        '{"traceparent": ["a", "b"]}',
        '{"traceparent": "garbage", "tracestate": 7}',
        '{"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"}',
        "[" * 5000 + "]" * 5000,
    ],
)
async def test_a_carrier_that_cannot_be_read_gives_a_root_span(
    spans: InMemorySpanExporter, carrier: str
) -> None:
    async def work(job: Job) -> str:
        return "done"

    assert (await run_traced(work, carrier)).kind is OutcomeKind.COMPLETED
    (process,) = by_name(spans.get_finished_spans(), "process t.run")
    assert process.parent is None


def test_the_replica_setting_decides_whether_attempts_are_traced() -> None:
    assert tracing.attempt_tracer("false") is None
    assert tracing.attempt_tracer("true") is not None
    with recorded_spans():  # an SDK tracer provider is set (the tests' own)
        assert tracing.attempt_tracer("auto") is not None
    assert load_settings(env={})[0].otel == "auto"
    for value, setting in (("true", "true"), ("off", "false"), (" AUTO ", "auto")):
        assert load_settings(env={"DISPATCHER_OTEL": value})[0].otel == setting
    with pytest.raises(ConfigError, match="DISPATCHER_OTEL: expected auto, true or false"):
        load_settings(env={"DISPATCHER_OTEL": "sometimes"})


def row_of(job_id: int, type_: str) -> dict[str, Any]:
    """A jobs row as insert_job returns it (what JobRecord.from_row reads)."""
    unset = ("max_attempts", "timeout", "unique_key", "started_at", "finished_at",
             "heartbeat_at", "owner", "term", "progress", "result", "last_error",
             "concurrency_key", "depends_on", "on_dependency_failure")  # fmt: skip
    return {
        **dict.fromkeys(unset),
        "id": job_id,
        "type": type_,
        "payload": "{}",
        "status": "pending",
        "priority": 0,
        "run_at": None,
        "attempts": 0,
        "created_at": None,
        "errors": "[]",
        "cancel_requested": False,
    }


# --- without the otel extra -----------------------------------------------------------

WITHOUT_OTEL = textwrap.dedent(
    """
    import asyncio, importlib.abc, sys

    class NoOtel(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoOtel())
    from dispatcher.core import tracing
    from dispatcher.core.app import App
    from dispatcher.core.config import load_settings
    from dispatcher.core.errors import ConfigError
    from dispatcher.core.records import new_job_values
    from dispatcher.producers.plans import enqueue_plan
    from dispatcher.services.executor import Attempt, run_attempt, thread_pool
    from dispatcher.services.job import Job

    assert not tracing.available()
    assert next(enqueue_plan(new_job_values("t"))).args[-1] is None
    assert tracing.attempt_tracer("auto") is None and tracing.attempt_tracer("true") is None
    with tracing.incoming({"traceparent": "garbage"}):
        pass
    assert load_settings(env={})[0].otel == "auto"
    try:
        load_settings(env={"DISPATCHER_OTEL": "true"})
    except ConfigError as exc:
        print(exc.problems[0])
    app = App()
    app.executor("t")(lambda job: "ran")
    spec = app.executors["t"]
    outcome = asyncio.run(run_attempt(Attempt(Job(1, "t", "{}", 1, 3, None), spec), thread_pool(1)))
    print(outcome.kind, outcome.result_json)
    """
)


def test_the_package_runs_without_opentelemetry_installed() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_OTEL], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "DISPATCHER_OTEL: true needs opentelemetry-api, which is not installed: "
        "pip install 'dispatcher[otel]'",
        'completed "ran"',
    ]


def test_the_package_does_not_import_opentelemetry_until_it_traces() -> None:
    code = (
        "import sys\n"
        "import dispatcher.core.tracing, dispatcher.producers.plans, dispatcher.services.dispatch\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
