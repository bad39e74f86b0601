-- 0012_concurrency_keys: per-key concurrency ("at most N jobs of this type at once per
-- customer").
--
-- A job may carry a concurrency_key; an executor registered with key_concurrency=N
-- runs at most N jobs of its type per distinct key at once, across the cluster. The
-- claim of such a type (claim_keyed_jobs) visits each key that has pending jobs once
-- (a loose scan of the index below: one probe per key, however many jobs wait under
-- it), so one hot key with 100,000 pending jobs neither starves the others nor slows
-- the claim. Jobs without a key are not in the index: it costs nothing to producers
-- that do not use keys.

ALTER TABLE {{schema}}.jobs ADD COLUMN concurrency_key text;

-- A new column is NULL everywhere: NOT VALID skips a scan that could find nothing.
ALTER TABLE {{schema}}.jobs ADD CONSTRAINT concurrency_key_must_not_be_empty
    CHECK (concurrency_key <> '') NOT VALID;

CREATE INDEX jobs_pending_key_idx
    ON {{schema}}.jobs (type, concurrency_key, priority, run_at, id)
    WHERE status = 'pending' AND concurrency_key IS NOT NULL;
