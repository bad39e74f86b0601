-- 0008_replica_sessions: the database session that says a replica process is alive.
--
-- Each replica holds one session of its own on which it takes the advisory lock
-- (hashtext('dispatcher:session:<schema>') & 2147483647, its backend pid). While the process
-- lives, so do that session and its lock; when the process dies (kill -9, OOM, node
-- loss noticed by TCP) Postgres ends the session and frees the lock at once. The
-- leader reads the lock's absence to rescue the replica's jobs within about a second
-- instead of after stale_after (see dispatcher/services/replica_session.py).
--
-- session_pid: the backend pid of that session (the lock's second key).
-- session_server_started: pg_postmaster_start_time() when the lock was taken. A free
--   lock is only news on the same server run: after a restart or a fail-over to
--   another server no replica holds anything yet, and absence proves nothing.
-- async_types: the types this replica runs with async executors, the attempts it
--   stops at once when it loses that session; only those are rescued early.

ALTER TABLE {{schema}}.replicas
    ADD COLUMN session_pid integer,
    ADD COLUMN session_server_started timestamptz,
    ADD COLUMN async_types text[] NOT NULL DEFAULT '{}';
