-- 0003_drop_pending_run_at_index: one index fewer on pending rows.
--
-- jobs_pending_run_at_idx (run_at, pending rows) tempted the planner into a wrong claim
-- plan: with a thousand-odd pending jobs and many finished rows it read every pending
-- row by run_at and sorted them, for each claim (4.6 ms instead of 0.07 ms per claim
-- of 250 at 18,500 pending), because the claim's per-type LIMIT is not a constant it
-- can cost. Every query that used it reads jobs_pending_claim_idx (type, priority,
-- run_at, id) instead, and each insert and claim maintains one index fewer.

DROP INDEX {{schema}}.jobs_pending_run_at_idx;
