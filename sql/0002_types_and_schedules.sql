-- 0002_types_and_schedules: per-type controls (pause, backpressure), periodic
-- schedules, and the indexes behind the result cache and dead-letter listings.

-- One row per job type someone configured. No row: not paused, no limits.
CREATE TABLE {{schema}}.job_types (
    type            text        PRIMARY KEY,
    -- Cluster-wide pause: the leader stops claiming the type; running jobs finish.
    paused          boolean     NOT NULL DEFAULT false,
    -- Backpressure: producers are refused once about this many jobs are pending.
    max_pending     integer,
    -- Kept by the leader from its periodic pending count, so an enqueue checks one
    -- flag by primary key instead of counting (precision: one refresh interval).
    accepting       boolean     NOT NULL DEFAULT true,
    pending         integer,
    counted_at      timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT max_pending_must_not_be_negative CHECK (max_pending >= 0)
);

-- Periodic schedules as the leader last registered them (for `dispatcher status`).
CREATE TABLE {{schema}}.schedules (
    name            text        PRIMARY KEY,
    cron            text        NOT NULL,
    timezone        text        NOT NULL,
    type            text        NOT NULL,
    next_run_at     timestamptz,
    last_run_for    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Each scheduled instant, enqueued once: the primary key makes a second leader's
-- attempt at the same instant a no-op, across failovers and restarts.
CREATE TABLE {{schema}}.schedule_runs (
    schedule        text        NOT NULL,
    scheduled_for   timestamptz NOT NULL,
    job_id          bigint,
    enqueued_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, scheduled_for)
);

-- Result cache: the latest completed job of a type with a unique_key.
CREATE INDEX jobs_completed_unique_key_idx
    ON {{schema}}.jobs (type, unique_key, finished_at DESC)
    WHERE unique_key IS NOT NULL AND status = 'completed';

-- Dead letters: failed jobs by type, newest first, however many finished rows pile up.
CREATE INDEX jobs_failed_idx
    ON {{schema}}.jobs (type, id)
    WHERE status = 'failed';

-- Pause, resume and limit changes wake the leader at once.
CREATE FUNCTION {{schema}}.notify_job_types_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.control', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER job_types_notify_changed
    AFTER INSERT OR UPDATE OF paused, max_pending OR DELETE ON {{schema}}.job_types
    FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.notify_job_types_changed();
