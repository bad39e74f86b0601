"""An app for a real replica process that records its spans with the OpenTelemetry
SDK (test_tracing.py): the tracer provider is set in a startup hook (so
DISPATCHER_OTEL=auto must see it when claiming starts), and the spans ended are
written as JSON, as the replica shuts down, to the file DISPATCHER_TEST_SPANS names."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dispatcher import App, Job
from tests.support.tracing import described

exporter = InMemorySpanExporter()
app = App(concurrency=10)


@app.on_startup
async def start_tracing() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


@app.executor("x.traced")
def traced(job: Job) -> str:  # a plain def: its span is current in its thread too
    with trace.get_tracer("traced_app").start_as_current_span("inner work"):
        return "done"


@app.on_shutdown
async def write_spans() -> None:
    spans = [described(span) for span in exporter.get_finished_spans()]
    path = Path(os.environ["DISPATCHER_TEST_SPANS"])
    await asyncio.to_thread(path.write_text, json.dumps(spans), encoding="utf-8")
