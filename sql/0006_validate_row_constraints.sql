-- 0006_validate_row_constraints: validate the constraints 0005 added NOT VALID.
--
-- Its own migration, so its own transaction: VALIDATE CONSTRAINT scans the table under
-- a SHARE UPDATE EXCLUSIVE lock, which lets inserts, claims and completions go on,
-- while 0005's brief ACCESS EXCLUSIVE lock was released at its commit.

ALTER TABLE {{schema}}.jobs VALIDATE CONSTRAINT run_at_must_be_finite;
ALTER TABLE {{schema}}.jobs VALIDATE CONSTRAINT attempts_must_stay_within_10000;
ALTER TABLE {{schema}}.jobs VALIDATE CONSTRAINT max_attempts_must_be_at_most_10000;
ALTER TABLE {{schema}}.jobs VALIDATE CONSTRAINT processing_jobs_must_have_an_owner_and_a_heartbeat;
ALTER TABLE {{schema}}.jobs VALIDATE CONSTRAINT payload_must_fit_max_payload_bytes;
