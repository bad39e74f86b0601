-- 0009_notify_inserted_run_at: the insert NOTIFY says, per type, the earliest run_at
-- among the statement's rows: {"email.send": 1764489600.123456, ...} (epoch seconds).
--
-- A claim starts its scan of a type's pending jobs where that type's last claim
-- stopped, so that it does not walk the index entries of the jobs claimed before,
-- which a snapshot held elsewhere (a long transaction) keeps from being cleaned up
-- (claim_due_jobs in queries.sql, dispatcher/services/claim_cursors.py). A row can land
-- behind that point: one inserted by a transaction that committed after the claim
-- (run_at defaults to the transaction's now()), or given a past run_at. Its NOTIFY,
-- delivered at commit, names its type with a run_at earlier than where the leader would
-- start, and the leader scans that type from the start again. The payload is a hint,
-- like the notification: a payload too long to send is "*" (every type), and every
-- poll tick scans every type from the start regardless.

CREATE OR REPLACE FUNCTION {{schema}}.notify_jobs_inserted() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    SELECT jsonb_object_agg(type, extract(epoch FROM first_run_at))::text
    INTO payload
    FROM (SELECT type, min(run_at) AS first_run_at FROM inserted GROUP BY type) AS t;
    IF octet_length(payload) > 7000 THEN
        payload := '*';
    END IF;
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.jobs', coalesce(payload, ''));
    RETURN NULL;
END
$$;

DROP TRIGGER jobs_notify_inserted ON {{schema}}.jobs;

CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON {{schema}}.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.notify_jobs_inserted();
