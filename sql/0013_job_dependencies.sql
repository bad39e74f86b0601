-- 0013_job_dependencies: a job may wait for others (depends_on bigint[]): it becomes
-- claimable once all of them completed; a dependency that fails or is cancelled ends
-- every job that waits on it, directly or not.
--
-- A job with dependencies is settled by a trigger as it is inserted: its dependencies
-- must exist (else the insert is refused, naming the missing ids); if one of them
-- already ended failed or cancelled, the job ends at once; if some have not completed,
-- it is 'waiting', with a row in waiting_jobs counting them; else it is pending. A
-- waiting job is not in the claim index (partial on status = 'pending'): claims never
-- see it. Producers insert it pending (plain SQL) or waiting (the clients, which then
-- spare the trigger an update in the common case).
--
-- The end of a dependency wakes its dependents without a poll: a job that some job
-- depends on carries has_dependents, and the trigger on its end (WHEN has_dependents:
-- the jobs nobody waits for pay only the test of a flag) counts each waiting dependent
-- down; one that reaches 0 becomes pending (run_at moved up to now at the earliest: it
-- became due then), with a NOTIFY on the jobs channel like an insert's, so the leader
-- claims it at once. The counts live in a table of their own: counting down a row of
-- waiting_jobs costs a tenth of an UPDATE of jobs (its indexes and checks), and a
-- fan-in counts down once per branch. A failed or cancelled end instead ends every job
-- waiting on it, directly or through others, in one statement, with an error that
-- names the dependency, its status and the first cause: failed, or cancelled when the
-- dependent asked for that (on_dependency_failure = 'cancel').
--
-- Why this is race-free (READ COMMITTED, as every dispatcher transaction is): settling
-- a job locks each of its dependencies (FOR NO KEY UPDATE, in id order) before reading
-- its status. The end of a dependency is an UPDATE of its row, which conflicts with
-- that lock: either the end waits until the new job committed, and its trigger (each
-- statement of a trigger function takes a new snapshot) finds it waiting and counts
-- it down; or the settling waits until the end committed, and reads the status the
-- dependency ended with. Two dependencies ending at once, each transaction seeing the
-- other's still running, count the same waiting_jobs row down one after the other
-- (its row lock), and the second sees 0.
--
-- job_dependencies holds one row per (dependency, dependent) for as long as both
-- exist: how the end of a job finds its dependents, and the dashboard lists them. A
-- job that a waiting, pending or processing job depends on is never deleted: the
-- delete trigger keeps it (retention skips it; a DELETE of it deletes nothing), since
-- its dependents read its result when they run.
--
-- No cycle can form: a job may depend only on existing jobs with lower ids (checked by
-- the insert trigger), and depends_on never changes afterwards.
--
-- The functions that write are SECURITY DEFINER (with a fixed search_path): a producer
-- role that may only INSERT and SELECT jobs (sql/roles.sql) inserts jobs with
-- dependencies, and their settling writes other rows on its behalf. Only triggers can
-- call them (the one that takes a row is revoked from PUBLIC). New tables: run
-- `dispatcher roles` again after this migration (sql/roles.sql).

ALTER TABLE {{schema}}.jobs
    -- The ids of the jobs this one waits for; NULL or '{}': none.
    ADD COLUMN depends_on bigint[],
    -- What this job becomes when a dependency fails or is cancelled: 'fail' (NULL, the
    -- default) or 'cancel'.
    ADD COLUMN on_dependency_failure text,
    -- Some job depends on this one: its end settles those jobs.
    ADD COLUMN has_dependents boolean NOT NULL DEFAULT false;

-- The status CHECK, with 'waiting': NOT VALID, as no existing row can fail it (the new
-- list holds the old one), so a validating scan of a large table under this
-- migration's lock would find nothing; it holds for every row written from now on.
-- What is wrong with a job's dependencies is refused by the insert trigger below, not
-- by CHECK constraints: every UPDATE of jobs (each heartbeat, claim and completion)
-- evaluates every CHECK of the table, these concern only rows with dependencies,
-- which that trigger sees, and depends_on never changes afterwards.
ALTER TABLE {{schema}}.jobs
    DROP CONSTRAINT status_must_be_pending_processing_completed_failed_cancelled,
    ADD CONSTRAINT status_must_be_a_known_job_status
        CHECK (status IN ('waiting', 'pending', 'processing', 'completed', 'failed',
                          'cancelled')) NOT VALID;

CREATE TABLE {{schema}}.job_dependencies (
    dependency_id   bigint NOT NULL,
    dependent_id    bigint NOT NULL,
    PRIMARY KEY (dependency_id, dependent_id)
);

-- One row per waiting job: how many of its dependencies have not completed yet.
CREATE TABLE {{schema}}.waiting_jobs (
    job_id          bigint  PRIMARY KEY,
    waiting_for     integer NOT NULL
);

-- The error a dependent ends with when dependency (id, type) ends with status and
-- last_error: e.g. "dependency 11 (fetch) failed: ValueError: no such image".
CREATE FUNCTION {{schema}}.dependency_ended_message(
    id bigint, type text, status text, last_error text
) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT format('dependency %s (%s) %s', id, type,
                  CASE status WHEN 'cancelled' THEN 'was cancelled' ELSE status END)
           || coalesce(': ' || left(last_error, 1000), '')
$$;

-- Settle the dependencies of job (inserted, or retried: made pending again from an
-- end): lock them, refuse missing ones, record the edges, and decide whether the job
-- waits, runs, or ends at once.
CREATE FUNCTION {{schema}}.settle_dependencies(job {{schema}}.jobs, retried boolean)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    wanted bigint[];
    found bigint[] := '{}';
    still_open integer := 0;
    ended record;
    ended_id bigint;
    dependency record;
    message text;
BEGIN
    wanted := ARRAY(SELECT DISTINCT d FROM unnest(job.depends_on) AS d ORDER BY d);
    -- In id order, so two settlings never wait on each other in a cycle. The lock
    -- holds each dependency's end back until we commit, or waits for that end and
    -- then reads it (the latest row version).
    FOR dependency IN
        SELECT j.id, j.type, j.status, j.last_error
        FROM {{schema}}.jobs j
        WHERE j.id = ANY (wanted)
        ORDER BY j.id
        FOR NO KEY UPDATE
    LOOP
        found := found || dependency.id;
        IF dependency.status IN ('failed', 'cancelled') THEN
            IF ended_id IS NULL THEN
                ended_id := dependency.id;
                ended := dependency;
            END IF;
        ELSIF dependency.status <> 'completed' THEN
            still_open := still_open + 1;
        END IF;
    END LOOP;
    IF cardinality(found) < cardinality(wanted) THEN
        RAISE EXCEPTION 'depends_on names jobs that do not exist: %',
                        array_to_string(ARRAY(SELECT unnest(wanted) EXCEPT SELECT unnest(found)
                                              ORDER BY 1 LIMIT 20), ', ')
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'depends_on_must_name_existing_jobs';
    END IF;
    -- Dependencies come first, so no cycle can form (with ids drawn from the sequence,
    -- an existing job's id is lower; only explicit ids can say otherwise).
    IF wanted[cardinality(wanted)] >= job.id THEN
        RAISE EXCEPTION 'job % may depend only on jobs with lower ids, not %', job.id,
                        array_to_string(ARRAY(SELECT d FROM unnest(wanted) AS d
                                              WHERE d >= job.id LIMIT 20), ', ')
            USING ERRCODE = 'check_violation', CONSTRAINT = 'depends_on_must_name_earlier_jobs';
    END IF;
    UPDATE {{schema}}.jobs SET has_dependents = true
    WHERE id = ANY (wanted) AND NOT has_dependents;
    INSERT INTO {{schema}}.job_dependencies (dependency_id, dependent_id)
    SELECT d, job.id FROM unnest(wanted) AS d
    ON CONFLICT DO NOTHING;
    IF ended_id IS NOT NULL THEN
        message := {{schema}}.dependency_ended_message(ended.id, ended.type, ended.status,
                                                       ended.last_error);
        UPDATE {{schema}}.jobs SET
            status = CASE WHEN on_dependency_failure = 'cancel' THEN 'cancelled' ELSE 'failed' END,
            finished_at = now(),
            last_error = message,
            errors = errors || jsonb_build_array(jsonb_build_object(
                'attempt', attempts, 'at', now(), 'error', message, 'traceback', NULL))
        WHERE id = job.id;
    ELSIF still_open > 0 THEN
        IF job.status <> 'waiting' THEN
            UPDATE {{schema}}.jobs SET status = 'waiting' WHERE id = job.id;
        END IF;
        INSERT INTO {{schema}}.waiting_jobs (job_id, waiting_for) VALUES (job.id, still_open)
        ON CONFLICT (job_id) DO UPDATE SET waiting_for = EXCLUDED.waiting_for;
        RETURN;
    ELSIF job.status = 'waiting' THEN
        UPDATE {{schema}}.jobs SET status = 'pending' WHERE id = job.id;
    END IF;
    IF retried THEN
        -- A count left by an earlier wait (it was cancelled while waiting).
        DELETE FROM {{schema}}.waiting_jobs WHERE job_id = job.id;
    END IF;
END
$$;

-- Called by the triggers only (trigger functions cannot be called otherwise): with the
-- owner's rights, a row of someone's making would change any job.
REVOKE ALL ON FUNCTION {{schema}}.settle_dependencies({{schema}}.jobs, boolean) FROM PUBLIC;

-- A new job with dependencies (or inserted waiting): refused if they can never be
-- settled, each reason under a name of its own (as CHECK constraints name theirs),
-- else settled.
CREATE FUNCTION {{schema}}.settle_inserted_dependencies() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.status NOT IN ('pending', 'waiting') THEN
        RAISE EXCEPTION 'a job with depends_on is inserted pending or waiting, not %', NEW.status
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'jobs_with_dependencies_start_pending_or_waiting';
    END IF;
    IF coalesce(cardinality(NEW.depends_on), 0) = 0 THEN
        RAISE EXCEPTION 'a waiting job must have dependencies (depends_on): it would never run'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'waiting_jobs_must_have_dependencies';
    END IF;
    IF array_ndims(NEW.depends_on) > 1 OR cardinality(NEW.depends_on) > 10000
       OR array_position(NEW.depends_on, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'depends_on must be a list of at most 10000 job ids, without NULLs'
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'depends_on_must_be_a_list_of_at_most_10000_job_ids';
    END IF;
    -- A waiting job is not active for its unique key (jobs_unique_active_idx covers
    -- pending and processing): made pending, it could collide with another, inside the
    -- statement that ended its last dependency.
    IF NEW.unique_key IS NOT NULL THEN
        RAISE EXCEPTION 'a job with depends_on cannot have a unique_key'
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'jobs_with_dependencies_cannot_have_a_unique_key';
    END IF;
    IF NEW.on_dependency_failure NOT IN ('fail', 'cancel') THEN
        RAISE EXCEPTION 'on_dependency_failure must be fail or cancel, not %',
                        NEW.on_dependency_failure
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'on_dependency_failure_must_be_fail_or_cancel';
    END IF;
    -- What 0005's constraints refuse of a pending row, refused of a waiting one: the end
    -- of its last dependency makes it pending, and must not fail on it.
    IF NEW.status = 'waiting' AND NOT (
        isfinite(NEW.run_at) AND NEW.attempts < 10000 AND coalesce(NEW.max_attempts, 1) <= 10000
        AND octet_length(NEW.payload::text) <= {{schema}}.max_payload_bytes()
    ) THEN
        RAISE EXCEPTION 'a waiting job must be able to run once due (run_at finite, attempts '
                        'below 10000, max_attempts at most 10000, payload within '
                        'max_payload_bytes())'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'waiting_jobs_must_be_able_to_run';
    END IF;
    PERFORM {{schema}}.settle_dependencies(NEW, false);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_settle_inserted_dependencies
    AFTER INSERT ON {{schema}}.jobs
    FOR EACH ROW
    WHEN (cardinality(NEW.depends_on) > 0 OR NEW.status = 'waiting')
    EXECUTE FUNCTION {{schema}}.settle_inserted_dependencies();

-- A status change that concerns dependencies (one trigger, so that every other update
-- of a status, each claim and completion, tests one condition):
-- * the end of a job that others depend on: completed, count each waiting dependent
--   down and make the ones at 0 pending (with a NOTIFY); failed or cancelled, end
--   every job waiting on it, directly or not, in one statement (a trigger per level
--   would nest as deep as the graph);
-- * a retry (failed or cancelled, back to pending) of a job with dependencies: settle
--   it again; it waits for those that have not completed, or ends again at once if one
--   of them is still failed or cancelled.
CREATE FUNCTION {{schema}}.dependencies_on_status_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ready bigint[];
    payload text;
    message text;
BEGIN
    IF OLD.status IN ('completed', 'failed', 'cancelled') THEN
        PERFORM {{schema}}.settle_dependencies(NEW, true);
        RETURN NULL;
    END IF;
    IF NEW.status = 'completed' THEN
        WITH counted AS (
            UPDATE {{schema}}.waiting_jobs w SET waiting_for = w.waiting_for - 1
            FROM {{schema}}.job_dependencies e
            WHERE e.dependency_id = NEW.id AND w.job_id = e.dependent_id
            RETURNING w.job_id, w.waiting_for
        )
        SELECT array_agg(job_id) INTO ready FROM counted WHERE waiting_for <= 0;
        IF ready IS NULL THEN
            RETURN NULL;
        END IF;
        DELETE FROM {{schema}}.waiting_jobs WHERE job_id = ANY (ready);
        WITH released AS (
            UPDATE {{schema}}.jobs SET status = 'pending', run_at = greatest(run_at, now())
            WHERE id = ANY (ready) AND status = 'waiting'
            RETURNING type, run_at
        )
        -- The insert NOTIFY's payload (0009): per type, the earliest run_at made pending.
        SELECT jsonb_object_agg(type, first_run_at)::text INTO payload
        FROM (
            SELECT type, extract(epoch FROM min(run_at)) AS first_run_at
            FROM released
            GROUP BY type
        ) AS t;
        IF payload IS NOT NULL THEN
            IF octet_length(payload) > 7000 THEN
                payload := '*';
            END IF;
            PERFORM pg_notify(TG_TABLE_SCHEMA || '.jobs', payload);
        END IF;
        RETURN NULL;
    END IF;
    message := {{schema}}.dependency_ended_message(NEW.id, NEW.type, NEW.status,
                                                   NEW.last_error);
    WITH RECURSIVE doomed(id) AS (
        SELECT e.dependent_id
        FROM {{schema}}.job_dependencies e
        JOIN {{schema}}.jobs d ON d.id = e.dependent_id AND d.status = 'waiting'
        WHERE e.dependency_id = NEW.id
        UNION
        SELECT e.dependent_id
        FROM doomed
        JOIN {{schema}}.job_dependencies e ON e.dependency_id = doomed.id
        JOIN {{schema}}.jobs d ON d.id = e.dependent_id AND d.status = 'waiting'
    ),
    -- Each names the dependency it ends for: this job, or the first doomed one it
    -- waits on (with this job's end as the cause).
    causes AS (
        SELECT j.id,
               CASE WHEN c.cause = NEW.id THEN message
                    ELSE format('dependency %s (%s) %s: ', c.cause, cj.type,
                                CASE WHEN cj.on_dependency_failure = 'cancel'
                                     THEN 'was cancelled' ELSE 'failed' END) || message
               END AS error
        FROM doomed
        JOIN {{schema}}.jobs j ON j.id = doomed.id
        CROSS JOIN LATERAL (
            SELECT CASE WHEN NEW.id = ANY (j.depends_on) THEN NEW.id
                        ELSE (SELECT min(x) FROM unnest(j.depends_on) AS x
                              WHERE x IN (SELECT id FROM doomed))
                   END AS cause
        ) AS c
        LEFT JOIN {{schema}}.jobs cj ON cj.id = c.cause
    ),
    ended AS (
        UPDATE {{schema}}.jobs d SET
            status = CASE WHEN d.on_dependency_failure = 'cancel' THEN 'cancelled'
                          ELSE 'failed' END,
            finished_at = now(),
            last_error = causes.error,
            errors = d.errors || jsonb_build_array(jsonb_build_object(
                'attempt', d.attempts, 'at', now(), 'error', causes.error, 'traceback', NULL))
        FROM causes
        WHERE d.id = causes.id AND d.status = 'waiting'
        RETURNING d.id
    )
    DELETE FROM {{schema}}.waiting_jobs WHERE job_id IN (SELECT id FROM ended);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_dependencies_on_status_change
    AFTER UPDATE OF status ON {{schema}}.jobs
    FOR EACH ROW
    WHEN ((NEW.has_dependents
           AND NEW.status IN ('completed', 'failed', 'cancelled')
           AND OLD.status NOT IN ('completed', 'failed', 'cancelled'))
          OR (OLD.status IN ('completed', 'failed', 'cancelled')
              AND NEW.status IN ('pending', 'waiting')
              AND cardinality(NEW.depends_on) > 0))
    EXECUTE FUNCTION {{schema}}.dependencies_on_status_change();

-- depends_on is fixed at insert: the edges, the counts and the absence of cycles
-- rest on it. (AFTER: a BEFORE UPDATE row trigger would lock every updated row first,
-- heartbeats included, whatever its column list.)
CREATE FUNCTION {{schema}}.refuse_depends_on_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'depends_on of job % cannot change after it is inserted', NEW.id
        USING ERRCODE = 'check_violation', CONSTRAINT = 'depends_on_is_fixed_at_insert';
END
$$;

CREATE TRIGGER jobs_refuse_depends_on_change
    AFTER UPDATE OF depends_on ON {{schema}}.jobs
    FOR EACH ROW
    WHEN (OLD.depends_on IS DISTINCT FROM NEW.depends_on)
    EXECUTE FUNCTION {{schema}}.refuse_depends_on_change();

-- A job that a waiting, pending or processing job depends on is kept (its dependents
-- read its result when they run): its delete is skipped. The row is locked by the
-- delete before this runs, and this query takes its own snapshot, so a dependent
-- committed before is seen, and one settling now waits for the delete, then finds
-- its dependency gone and is refused. Otherwise the job's edges (and a count left by
-- a wait that was cancelled) go with it.
CREATE FUNCTION {{schema}}.keep_needed_dependencies() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF OLD.has_dependents THEN
        IF EXISTS (
            SELECT 1
            FROM {{schema}}.job_dependencies e
            JOIN {{schema}}.jobs d ON d.id = e.dependent_id
            WHERE e.dependency_id = OLD.id AND d.status IN ('waiting', 'pending', 'processing')
        ) THEN
            RETURN NULL;
        END IF;
        DELETE FROM {{schema}}.job_dependencies WHERE dependency_id = OLD.id;
    END IF;
    IF cardinality(OLD.depends_on) > 0 THEN
        DELETE FROM {{schema}}.job_dependencies
        WHERE dependency_id = ANY (OLD.depends_on) AND dependent_id = OLD.id;
        DELETE FROM {{schema}}.waiting_jobs WHERE job_id = OLD.id;
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER jobs_keep_needed_dependencies
    BEFORE DELETE ON {{schema}}.jobs
    FOR EACH ROW
    WHEN (OLD.has_dependents OR cardinality(OLD.depends_on) > 0)
    EXECUTE FUNCTION {{schema}}.keep_needed_dependencies();
