-- 0005_refuse_rows_that_can_never_run: named CHECK constraints on what other services
-- may insert with plain SQL, so that one hostile row can no longer stop every claim.
--
-- Before: attempts = 2147483647 made every claim fail ("integer out of range" on
-- attempts + 1); run_at = '-infinity' made every claim fail ("cannot subtract infinite
-- timestamps"), 'infinity' every next_due_in and queue_depth; a processing row with
-- no heartbeat_at (or no owner) was never rescued and held a slot forever; a payload
-- of tens of MB was loaded into claim batches.
--
-- The constraints apply to active rows (pending, processing): a finished row can harm
-- no claim, and history (e.g. a job that ran out of its attempts) must not block this
-- upgrade. A finished row put back to pending by a retry must pass them again.
--
-- Added NOT VALID here and validated by 0006, each migration in its own transaction:
-- adding takes a brief exclusive lock, validating scans the table under a lock that
-- lets producers and replicas go on. Active rows that would fail them end failed first,
-- with an error naming the column, so that existing databases upgrade.

-- The largest payload (its JSON text, in bytes) an active job may carry. An operator
-- changes it with one statement, e.g. for 8 MiB:
--   CREATE OR REPLACE FUNCTION dispatcher.max_payload_bytes() RETURNS integer
--       LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 8388608';
-- (a larger limit costs memory: a claim batch loads its jobs' payloads at once).
CREATE FUNCTION {{schema}}.max_payload_bytes() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1048576';

WITH doomed AS (
    SELECT id, CASE
        WHEN NOT isfinite(run_at) THEN
            format('run_at is %s: a job due never (or before time) can never run', run_at)
        WHEN attempts >= 10000 AND status = 'pending' OR attempts > 10000 THEN
            format('attempts is %s: at most 10000 attempts can be made', attempts)
        WHEN max_attempts > 10000 THEN
            format('max_attempts is %s: at most 10000 attempts can be made', max_attempts)
        WHEN status = 'processing' AND (owner IS NULL OR heartbeat_at IS NULL) THEN
            'a processing job needs an owner and a heartbeat_at (it was inserted as processing)'
        WHEN octet_length(payload::text) > {{schema}}.max_payload_bytes() THEN
            format('payload is %s bytes: more than max_payload_bytes() (%s)',
                   octet_length(payload::text), {{schema}}.max_payload_bytes())
    END AS problem
    FROM {{schema}}.jobs
    WHERE status IN ('pending', 'processing')
)
UPDATE {{schema}}.jobs j SET
    status = 'failed',
    finished_at = now(),
    last_error = 'refused by migration 0005: ' || doomed.problem,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempts, 'at', now(), 'traceback', NULL,
        'error', 'refused by migration 0005: ' || doomed.problem))
FROM doomed
WHERE j.id = doomed.id AND doomed.problem IS NOT NULL;

ALTER TABLE {{schema}}.jobs
    ADD CONSTRAINT run_at_must_be_finite
        CHECK (status NOT IN ('pending', 'processing') OR isfinite(run_at)) NOT VALID,
    -- A claim adds one: a pending job must leave room for it, so the claim's
    -- arithmetic can never overflow and no row can make it fail.
    ADD CONSTRAINT attempts_must_stay_within_10000
        CHECK (CASE status WHEN 'pending' THEN attempts < 10000
                           WHEN 'processing' THEN attempts <= 10000
                           ELSE true END) NOT VALID,
    ADD CONSTRAINT max_attempts_must_be_at_most_10000
        CHECK (status NOT IN ('pending', 'processing') OR max_attempts <= 10000) NOT VALID,
    -- The reaper finds a stalled job by its heartbeat and its owner.
    ADD CONSTRAINT processing_jobs_must_have_an_owner_and_a_heartbeat
        CHECK (status <> 'processing' OR (owner IS NOT NULL AND heartbeat_at IS NOT NULL))
        NOT VALID,
    ADD CONSTRAINT payload_must_fit_max_payload_bytes
        CHECK (status NOT IN ('pending', 'processing')
               OR octet_length(payload::text) <= {{schema}}.max_payload_bytes()) NOT VALID;
