-- 0011_dashboard: what the web dashboard (/ui/) reads that the jobs table cannot
-- answer cheaply.
--
-- Queue samples: the leader's queue count (queue_stats.py) records, at most every
-- 10 seconds, each type's depth and how many of its jobs finished since the previous
-- sample. The overview's charts (throughput per minute, queue depth over the last
-- hour) and its "failed in the last hour" read these few rows, the same on every
-- replica, instead of counting a million finished rows per page view. Kept 2 hours.
-- A new table: run `dispatcher roles` again after this migration (sql/roles.sql).
CREATE TABLE {{schema}}.queue_samples (
    at          timestamptz NOT NULL,
    type        text        NOT NULL,
    ready       integer     NOT NULL,
    scheduled   integer     NOT NULL,
    processing  integer     NOT NULL,
    completed   integer     NOT NULL,
    failed      integer     NOT NULL,
    PRIMARY KEY (at, type)
);

-- Jobs by unique key, whatever their type and status: the dashboard's search box.
-- The other unique-key indexes lead with type and cover only some statuses.
CREATE INDEX jobs_unique_key_idx
    ON {{schema}}.jobs (unique_key)
    WHERE unique_key IS NOT NULL;
