-- 0007_heartbeats_without_index_writes: index processing rows on columns a heartbeat
-- never changes, so a heartbeat can be a HOT update.
--
-- jobs_processing_heartbeat_idx had heartbeat_at as its key: every heartbeat of every
-- running job (one a second each) changed an indexed column, so none could be a
-- heap-only-tuple update, and each wrote new entries into every index of the table.
-- Without an index on heartbeat_at (nor on progress), heartbeats and progress writes
-- touch the heap page alone when it has room (fillfactor 90 leaves some).
--
-- Processing rows are few (at most the running jobs), so the reaper's look for stale
-- heartbeats reads them all through this index and filters on heartbeat_at; the
-- running counts per type and per owner read it alone.

CREATE INDEX jobs_processing_idx
    ON {{schema}}.jobs (type, owner)
    WHERE status = 'processing';

DROP INDEX {{schema}}.jobs_processing_heartbeat_idx;
