-- 0004_attempt_liveness: what a replica tells the cluster about its attempts beyond
-- the heartbeat_at of each job row.
--
-- locked_job_ids / locked_job_ids_at: a replica heartbeats its running jobs with
-- SKIP LOCKED, so one row locked by another session (a forgotten SELECT ... FOR
-- UPDATE in psql, a cancel inside a long business transaction) no longer stalls the
-- heartbeat of every other job. The rows it had to skip are still its own, alive, and
-- their heartbeat_at ages: it lists them here (with when it last said so), and the
-- reaper spares a stale job that its live owner lists.
--
-- claims_revoked_before: a claim whose reply never came back (the connection died,
-- the statement timed out) may still commit, or may already have. Every claim carries
-- a number and share-locks its replica's row; before the replica hands back the rows
-- it holds only in the table, it locks that row (waiting out any claim still running)
-- and revokes every claim numbered below this, so one that has not run yet claims
-- nothing when it does.

ALTER TABLE {{schema}}.replicas
    ADD COLUMN locked_job_ids bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN locked_job_ids_at timestamptz,
    ADD COLUMN claims_revoked_before bigint NOT NULL DEFAULT 0;
