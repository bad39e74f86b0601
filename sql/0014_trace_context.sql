-- 0014_trace_context: the trace a job was enqueued in (OpenTelemetry, issue 18), so
-- that each of its attempts runs in a span of that trace.
--
-- trace_context holds a propagation carrier, as an HTTP request carries it in its
-- headers: {"traceparent": "00-<trace id>-<span id>-01"}, and "tracestate" or
-- "baggage" beside it. The clients and the HTTP API fill it in when the enqueue runs
-- inside a span (dispatcher.core.tracing); other services may insert one with plain
-- SQL. NULL: no trace; the attempts' spans are roots.
--
-- Whatever it holds, it is only ever a hint: an executor that cannot read it (not W3C,
-- a bad trace id, values that are not strings) starts a root span and runs the job
-- all the same. The CHECK only refuses what could never be a carrier: a JSON value
-- that is not an object, or one larger than any set of trace headers (4 KB: each
-- claim loads it with its job).

ALTER TABLE {{schema}}.jobs ADD COLUMN trace_context jsonb;

-- A new column is NULL everywhere: NOT VALID skips a scan that could find nothing.
ALTER TABLE {{schema}}.jobs ADD CONSTRAINT trace_context_must_be_an_object_of_at_most_4kb
    CHECK (jsonb_typeof(trace_context) = 'object' AND octet_length(trace_context::text) <= 4096)
    NOT VALID;
