"""OpenTelemetry traces (the ``otel`` extra): a job's trace, from its enqueue to each
of its attempts. Metrics stay Prometheus (:mod:`dispatcher.core.metrics`).

Producers. Every enqueue (both clients, the HTTP API, the CLI, the ORM adapters) runs
a plan of :mod:`dispatcher.producers.plans`, which opens :func:`sending` around its
insert. Inside a valid span (and unless the process environment says
``DISPATCHER_OTEL=false``), that starts a PRODUCER span "send {type}", child of the
current one, and the job row stores its context as a propagation carrier (the
``trace_context`` column, migration 0014: ``{"traceparent": ..., "tracestate": ...}``,
written by the global propagator, W3C Trace Context by default). Outside a span
nothing is stored and nothing is started: an enqueue does not open traces of its own.

Executors. A replica whose setting ``otel`` (DISPATCHER_OTEL) is ``true``, or ``auto``
(the default) with an SDK tracer provider set by the time it starts claiming (at
import or in an ``on_startup`` hook), runs each attempt in a CONSUMER span "process
{type}" whose parent is the context its row stores (a root span when there is none,
or when it cannot be read: a carrier is only ever a hint, and a hostile one harms
nothing). The span is current while the executor runs, in a thread too for a plain
``def``, so the executor's own spans nest under it.

Attributes follow the messaging semantic conventions (:data:`SYSTEM`, operation,
destination = the job type, message id = the job id), with the attempt number and how
it ended (:data:`ATTEMPT`, :data:`OUTCOME`, :data:`DELAY`). A failed attempt records
its exception and sets the span's status to ERROR (``error.type``: the exception's
class, or ``timeout``).

Nothing here imports opentelemetry until it is needed: the package imports and runs
without it, and with tracing off an attempt costs a None check.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Literal

from dispatcher.core.errors import Snooze
from dispatcher.core.log import get_logger
from dispatcher.core.version import VERSION

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from dispatcher.core.app import ExecutorFunction

SETTING_ENV = "DISPATCHER_OTEL"
# The largest carrier a job row may hold (its jsonb text, in bytes): migration 0014's
# CHECK says so too.
MAX_CARRIER_BYTES = 4096

# messaging.system, and this system's own attributes (messaging.<system>.*).
SYSTEM = "dispatcher"
ATTEMPT = "messaging.dispatcher.attempt"  # 1 on a job's first run
OUTCOME = "messaging.dispatcher.outcome"  # completed, retry, failed, snooze, ...
DELAY = "messaging.dispatcher.delay"  # seconds until it runs again (retry, snooze)

_FALSE = ("false", "0", "no", "off")
# Outcomes that end a span in error: the attempt failed (again later, or for good).
_FAILED = ("failed", "retry")
_log = get_logger("tracing")

Setting = Literal["auto", "true", "false"]


@dataclass(frozen=True)
class _Otel:
    """The opentelemetry API, imported on first use."""

    context: ModuleType
    propagate: ModuleType
    trace: ModuleType
    tracer: Tracer


@functools.cache
def _otel() -> _Otel | None:
    """The opentelemetry API, or None when the ``otel`` extra is not installed."""
    try:
        from opentelemetry import context, propagate, trace
    except ImportError:
        return None
    return _Otel(context, propagate, trace, trace.get_tracer("dispatcher", VERSION))


def available() -> bool:
    """opentelemetry-api can be imported."""
    return _otel() is not None


# --- producers ----------------------------------------------------------------------


class Sending:
    """The producer span of one enqueue (a context manager around its insert), and
    ``carrier``: the trace context to store with its jobs (JSON text; None: none)."""

    __slots__ = ("_span", "carrier")

    def __init__(self, span: Span | None = None, carrier: str | None = None) -> None:
        self._span = span
        self.carrier = carrier

    def sent(self, job_id: int) -> None:
        """The job was inserted (or found: a duplicate) under ``job_id``."""
        if self._span is not None:
            self._span.set_attribute("messaging.message.id", str(job_id))

    def __enter__(self) -> Sending:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        if span is None:
            return
        otel = _otel()
        assert otel is not None
        if isinstance(exc, GeneratorExit):
            # The plan was dropped mid-way (its runner was cancelled, say).
            span.set_status(otel.trace.Status(otel.trace.StatusCode.ERROR, "not enqueued"))
        elif exc is not None:
            span.record_exception(exc)
            span.set_status(otel.trace.Status(otel.trace.StatusCode.ERROR, str(exc)))
        span.end()


_NOT_SENDING = Sending()


def sending(type: str | None, count: int = 1) -> Sending:
    """The producer span of an enqueue of ``count`` jobs of ``type`` (None: of several
    types), when a valid span is current; else a no-op that stores nothing."""
    otel = _otel()
    if otel is None or os.environ.get(SETTING_ENV, "").strip().lower() in _FALSE:
        return _NOT_SENDING
    if not otel.trace.get_current_span().get_span_context().is_valid:
        return _NOT_SENDING
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
    }
    if type is not None:
        attributes["messaging.destination.name"] = type
    if count != 1:
        attributes["messaging.batch.message_count"] = count
    span = otel.tracer.start_span(
        "send" if type is None else f"send {type}",
        kind=otel.trace.SpanKind.PRODUCER,
        attributes=attributes,
    )
    carrier: dict[str, str] = {}
    otel.propagate.inject(carrier, context=otel.trace.set_span_in_context(span))
    return Sending(span, carrier_json(carrier))


def carrier_json(carrier: Mapping[str, str]) -> str | None:
    """A carrier as the JSON text a job row takes: within MAX_CARRIER_BYTES (else only
    its traceparent: baggage can grow without bound), None if it holds nothing."""
    if not carrier:
        return None
    text = json.dumps(carrier, separators=(",", ":"))
    # jsonb prints ": " and ", ": a byte more per key and per value than this text.
    if len(text) + 2 * len(carrier) > MAX_CARRIER_BYTES:
        if "traceparent" not in carrier:
            return None
        text = json.dumps({"traceparent": carrier["traceparent"]}, separators=(",", ":"))
        if len(text) + 2 > MAX_CARRIER_BYTES:
            return None
    return text


class _Incoming:
    """Makes a request's trace context current (see :func:`incoming`)."""

    __slots__ = ("_headers", "_token")

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = headers
        self._token: object = None

    def __enter__(self) -> None:
        otel = _otel()
        if otel is None or otel.trace.get_current_span().get_span_context().is_valid:
            return  # no API, or a server instrumentation already made the request's span
        try:
            context = otel.propagate.extract(self._headers)
        except Exception as exc:  # a propagator that chokes on what a client sent
            _log.debug("trace_context_unreadable", error=repr(exc))
            return
        if otel.trace.get_current_span(context).get_span_context().is_valid:
            self._token = otel.context.attach(context)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            otel = _otel()
            assert otel is not None
            otel.context.detach(self._token)
            self._token = None


class _Nothing:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


NOTHING = _Nothing()


def incoming(headers: Mapping[str, str]) -> _Incoming | _Nothing:
    """A context manager that makes the trace context of an HTTP request's
    ``traceparent`` (and ``tracestate``) headers current, unless a span already is:
    an enqueue over HTTP then joins its caller's trace."""
    if "traceparent" not in headers:
        return NOTHING
    return _Incoming(headers)


# --- executors ----------------------------------------------------------------------


def attempt_tracer(setting: str) -> AttemptTracer | None:
    """The tracer of attempts for the ``otel`` setting, None when tracing is off:
    ``false``; the API not installed; ``auto`` and no SDK tracer provider set (yet)."""
    if setting == "false":
        return None
    otel = _otel()
    if otel is None:
        return None
    if setting == "auto":
        provider = otel.trace.get_tracer_provider()
        if isinstance(provider, otel.trace.ProxyTracerProvider | otel.trace.NoOpTracerProvider):
            return None
    return AttemptTracer(otel)


class AttemptTracer:
    """Starts the span of each attempt (tracing on)."""

    def __init__(self, otel: _Otel) -> None:
        self._otel = otel
        self._root: Context = otel.context.Context()

    def start(self, job_id: int, type: str, attempt: int, carrier: str | None) -> AttemptSpan:
        """The span of attempt ``attempt`` of job ``job_id``, started now; ``carrier``:
        its row's trace_context (JSON text, or None)."""
        otel = self._otel
        parent = self._parent(carrier, job_id)
        span = otel.tracer.start_span(
            f"process {type}",
            context=parent,
            kind=otel.trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": type,
                "messaging.message.id": str(job_id),
                ATTEMPT: attempt,
            },
        )
        return AttemptSpan(otel, span, parent)

    def _parent(self, carrier: str | None, job_id: int) -> Context:
        """The context a row's carrier holds; an empty one (a root span follows) when
        there is none or it cannot be read. Never raises: rows come from anyone."""
        if carrier is None:
            return self._root
        try:
            fields = json.loads(carrier)
            if not isinstance(fields, dict):
                raise ValueError(f"a carrier is a JSON object, not {type(fields).__name__}")
            headers = {k: v for k, v in fields.items() if isinstance(v, str)}
            context: Context = self._otel.propagate.extract(headers, context=self._root)
        except Exception as exc:
            _log.debug("trace_context_unreadable", job_id=job_id, error=repr(exc))
            return self._root
        if not self._otel.trace.get_current_span(context).get_span_context().is_valid:
            _log.debug("trace_context_unreadable", job_id=job_id, error="no valid traceparent")
            return self._root
        return context


class AttemptSpan:
    """One attempt's span: current while its executor runs (``with`` it in the
    attempt's task; :meth:`wrap` the executor), ended by :meth:`end` with the outcome."""

    __slots__ = ("_error_type", "_otel", "_token", "context", "span")

    def __init__(self, otel: _Otel, span: Span, parent: Context) -> None:
        self._otel = otel
        self.span = span
        # The parent's context (its baggage too), with this span current.
        self.context: Context = otel.trace.set_span_in_context(span, parent)
        self._token: object = None
        self._error_type: str | None = None

    def __enter__(self) -> AttemptSpan:
        self._token = self._otel.context.attach(self.context)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._otel.context.detach(self._token)
        if exc is not None:  # no outcome: the attempt's task was cancelled from outside
            self.span.set_attribute(OUTCOME, "interrupted")
            self.span.end()

    def wrap(self, function: ExecutorFunction, *, is_async: bool) -> ExecutorFunction:
        """``function`` recording what it raises on the span; a plain def one also
        makes the span current in the thread it runs in."""
        if is_async:

            async def traced_async(job: Any) -> Any:
                try:
                    return await function(job)
                except Exception as exc:
                    self._raised(exc)
                    raise

            return traced_async

        def traced(job: Any) -> Any:
            token = self._otel.context.attach(self.context)
            try:
                return function(job)
            except Exception as exc:
                self._raised(exc)
                raise
            finally:
                self._otel.context.detach(token)

        return traced

    def _raised(self, exc: Exception) -> None:
        if isinstance(exc, Snooze):
            return  # not an error: the job asked to run later
        self.span.record_exception(exc)
        self._error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"

    def end(self, outcome: str, error: str | None, delay: float) -> None:
        """End the span with how the attempt ended: ``outcome`` (an OutcomeKind),
        its ``error`` and ``delay`` (seconds until it runs again)."""
        span = self.span
        span.set_attribute(OUTCOME, str(outcome))  # a plain str, not the enum
        if outcome in ("retry", "snooze"):
            span.set_attribute(DELAY, delay)
        if outcome in _FAILED:
            timed_out = error is not None and error.startswith("timed out after ")
            error_type = "timeout" if timed_out else self._error_type or "_OTHER"
            span.set_attribute("error.type", error_type)
            trace = self._otel.trace
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()
