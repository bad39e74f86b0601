"""The OpenTelemetry SDK, recording into memory for the tests that ask for it.

A process has one global tracer provider, set once. The first test that records spans
sets an SDK provider whose sampler records only while such a test runs (it drops every
span otherwise, so other tests cost nothing and leave nothing behind); if another
test module set an SDK provider first, the exporter is added to that one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes


class WhileRecording(Sampler):
    """The SDK's default sampler (parent-based, always on), only while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self._default = ParentBased(ALWAYS_ON)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if not self.on:
            return SamplingResult(Decision.DROP)
        return self._default.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "WhileRecording"


@functools.cache
def _sdk() -> tuple[InMemorySpanExporter, WhileRecording]:
    exporter = InMemorySpanExporter()
    sampler = WhileRecording()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(sampler=sampler)
        trace.set_tracer_provider(provider)
    else:
        sampler.on = True  # someone else's provider: it samples as it likes
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, sampler


@contextmanager
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """An exporter holding the spans ended while in the block (the SDK's, global)."""
    exporter, sampler = _sdk()
    exporter.clear()
    was_on, sampler.on = sampler.on, True
    try:
        yield exporter
    finally:
        sampler.on = was_on
        exporter.clear()


def tracer() -> trace.Tracer:
    """A tracer for the tests' own spans (a producer's, a request's)."""
    return trace.get_tracer("tests")


def by_name(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def described(span: ReadableSpan) -> dict[str, Any]:
    """What the tests assert on a span, as JSON-able values (also written by the
    cross-process test's replica)."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
    }
