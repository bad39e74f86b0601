-- 0010_processing_index_by_id: index processing rows on id alone, not (type, owner).
--
-- A replica completes, heartbeats and writes the progress of its own rows by id
-- (WHERE id = ANY($ids) AND owner = $1 AND status = 'processing'). Keyed on (type,
-- owner), the index let the planner scan it for an owner; its statistics count the
-- few live rows, not the dead entries that pile up between vacuums and under any
-- snapshot held elsewhere, so it did: through a held snapshot, 809 buffers to complete
-- 8 jobs. Keyed on (owner, id), it still scanned by owner alone, the ids as a filter.
-- Keyed on id, only the ids can lead a scan: each row is probed, however many dead
-- entries the index holds. The reaper and the running counts read every processing
-- entry whatever the key.

DROP INDEX {{schema}}.jobs_processing_idx;

CREATE INDEX jobs_processing_idx
    ON {{schema}}.jobs (id)
    WHERE status = 'processing';
