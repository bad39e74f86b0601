-- Named queries used at run time. Each starts with "-- name: <name>" and a one-line
-- description. {{schema}} is the quoted schema name; {{<fragment>}} is the text under
-- "-- fragment: <fragment>" (SQL two statements share); every value is a bind parameter.

-- ---------------------------------------------------------------------------------
-- Migrations
-- ---------------------------------------------------------------------------------

-- name: lock_migrations
-- Serialize migration runs on this schema across processes (blocks until free).
SELECT pg_advisory_lock(hashtextextended($1, 0));

-- name: unlock_migrations
-- Release the migration lock taken by lock_migrations.
SELECT pg_advisory_unlock(hashtextextended($1, 0));

-- name: create_schema
-- The schema every table lives in.
CREATE SCHEMA IF NOT EXISTS {{schema}};

-- name: create_migrations_table
-- Which migrations are applied, with the checksum of the file that was applied.
CREATE TABLE IF NOT EXISTS {{schema}}.migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_table_exists
-- Whether the schema has a migrations table at all ($1: schema name).
SELECT to_regclass(quote_ident($1) || '.migrations') IS NOT NULL;

-- name: applied_migrations
-- Versions and checksums recorded as applied.
SELECT version, checksum FROM {{schema}}.migrations ORDER BY version;

-- name: record_migration
-- Record one applied migration.
INSERT INTO {{schema}}.migrations (version, name, checksum) VALUES ($1, $2, $3);

-- ---------------------------------------------------------------------------------
-- Producers (Client, AsyncClient, API, CLI)
-- ---------------------------------------------------------------------------------

-- name: insert_job
-- Enqueue one job. run_at: $5 absolute, else now() + $6, else now() (database clock).
-- No row back: the type's queue is full (job_types.accepting, kept by the leader).
-- With dependencies $10 it is inserted waiting, and a trigger (0013) then settles it
-- (waiting, pending, or ended at once): the caller reads it again (get_job). $12: the
-- trace context (JSON text of a carrier; NULL: none).
INSERT INTO {{schema}}.jobs (type, payload, priority, max_attempts, run_at, timeout, unique_key,
                             concurrency_key, depends_on, on_dependency_failure, status,
                             trace_context)
SELECT $1, $2::text::jsonb, $3, $4,
       COALESCE($5::timestamptz, now() + $6::interval, now()),
       $7, $8, $9, $10, $11,
       CASE WHEN cardinality($10::bigint[]) > 0 THEN 'waiting' ELSE 'pending' END,
       $12::text::jsonb
WHERE NOT EXISTS (
    SELECT 1 FROM {{schema}}.job_types t WHERE t.type = $1 AND NOT t.accepting
)
RETURNING *, false AS duplicate, false AS cached;

-- name: insert_job_unique
-- Enqueue one job unless an active job (pending or processing) has the same type and
-- unique_key; then return that one, flagged duplicate. No row back: the other job
-- finished between our conflict and our look (the caller tries again), or the type's
-- queue is full (queue_full tells which). Parameters: insert_job's.
WITH inserted AS (
    INSERT INTO {{schema}}.jobs (type, payload, priority, max_attempts, run_at, timeout,
                                 unique_key, concurrency_key, depends_on, on_dependency_failure,
                                 trace_context)
    SELECT $1, $2::text::jsonb, $3, $4,
           COALESCE($5::timestamptz, now() + $6::interval, now()),
           $7, $8, $9, $10, $11, $12::text::jsonb
    WHERE NOT EXISTS (
        SELECT 1 FROM {{schema}}.job_types t WHERE t.type = $1 AND NOT t.accepting
    )
    ON CONFLICT (type, unique_key) WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing')
    DO NOTHING
    RETURNING *
)
SELECT inserted.*, false AS duplicate, false AS cached FROM inserted
UNION ALL
SELECT existing.*, true AS duplicate, false AS cached
FROM {{schema}}.jobs existing
WHERE NOT EXISTS (SELECT 1 FROM inserted)
  AND existing.type = $1
  AND existing.unique_key = $8
  AND existing.status IN ('pending', 'processing');

-- name: insert_jobs_unique_many
-- Bulk enqueue of jobs that carry unique keys: one statement, duplicates skipped.
-- Returns the ids inserted with their unique_key, so the caller can map the rest. $8:
-- the trace context of them all (NULL: none).
INSERT INTO {{schema}}.jobs (type, payload, priority, max_attempts, run_at, timeout, unique_key,
                             trace_context)
SELECT t.type, t.payload::jsonb, t.priority, t.max_attempts,
       COALESCE(t.run_at, now()), t.timeout, t.unique_key, $8::text::jsonb
FROM unnest($1::text[], $2::text[], $3::smallint[], $4::integer[], $5::timestamptz[],
            $6::double precision[], $7::text[])
     AS t(type, payload, priority, max_attempts, run_at, timeout, unique_key)
ON CONFLICT (type, unique_key) WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing')
DO NOTHING
RETURNING id, type, unique_key;

-- name: active_ids_by_unique_key
-- Ids of the active jobs holding the given (type, unique_key) pairs.
SELECT j.id, j.type, j.unique_key
FROM {{schema}}.jobs j
JOIN unnest($1::text[], $2::text[]) AS k(type, unique_key)
  ON j.type = k.type AND j.unique_key = k.unique_key
WHERE j.status IN ('pending', 'processing');

-- name: reserve_job_ids
-- Draw $1 ids from the jobs identity sequence, so COPY can write them and return them,
-- and resolve run_at on the database clock: $2 absolute, else now() + $3, else now().
-- max_pending and pending are set when type $4's queue is full (backpressure).
WITH sequence AS MATERIALIZED (
    -- Looked up once: per row it was seven times slower than the nextval itself.
    SELECT pg_get_serial_sequence('{{schema}}.jobs', 'id')::regclass AS id
)
SELECT array_agg(nextval(sequence.id)) AS ids,
       COALESCE($2::timestamptz, now() + $3::interval, now()) AS run_at,
       closed.max_pending, closed.pending
FROM sequence, generate_series(1, $1)
LEFT JOIN (
    SELECT max_pending, pending FROM {{schema}}.job_types WHERE type = $4 AND NOT accepting
) AS closed ON true
GROUP BY closed.max_pending, closed.pending;

-- name: copy_jobs
-- Bulk load of jobs whose ids came from reserve_job_ids (psycopg COPY; asyncpg uses
-- copy_records_to_table with the same columns).
COPY {{schema}}.jobs (id, type, payload, priority, max_attempts, run_at, timeout, trace_context)
FROM STDIN;

-- name: copy_jobs_lean
-- Bulk load of jobs that take every default but type and payload.
COPY {{schema}}.jobs (id, type, payload) FROM STDIN;

-- name: get_job
-- One job by id, with open_dependencies: those of its dependencies that have not
-- completed (NULL: it has none).
SELECT j.*,
       CASE WHEN j.depends_on IS NOT NULL THEN ARRAY(
           SELECT d.id FROM {{schema}}.jobs d
           WHERE d.id = ANY (j.depends_on) AND d.status <> 'completed'
           ORDER BY d.id
       ) END AS open_dependencies
FROM {{schema}}.jobs j
WHERE j.id = $1;

-- name: cancel_job
-- Cancel a pending or waiting job at once; flag a processing one (a trigger NOTIFYs its
-- owner, which stops it and ends it cancelled). No row back: not found or already
-- finished. Jobs waiting on it end too (0013's trigger).
UPDATE {{schema}}.jobs SET
    status = CASE WHEN status IN ('pending', 'waiting') THEN 'cancelled' ELSE status END,
    finished_at = CASE WHEN status IN ('pending', 'waiting') THEN now() ELSE finished_at END,
    cancel_requested = (status = 'processing')
WHERE id = $1 AND status IN ('waiting', 'pending', 'processing')
RETURNING *;

-- ---------------------------------------------------------------------------------
-- Job dependencies (0013): graphs, results, links
-- ---------------------------------------------------------------------------------

-- name: closed_queues
-- Which of types $1 refuse jobs now (backpressure): type, max_pending, pending.
SELECT type, max_pending, pending
FROM {{schema}}.job_types
WHERE type = ANY ($1::text[]) AND NOT accepting
ORDER BY type;

-- name: reserve_ids
-- Draw $1 ids from the jobs identity sequence (a graph's: each job's dependencies get
-- lower ids than it).
WITH sequence AS MATERIALIZED (
    SELECT pg_get_serial_sequence('{{schema}}.jobs', 'id')::regclass AS id
)
SELECT array_agg(nextval(sequence.id)) AS ids
FROM sequence, generate_series(1, $1);

-- name: insert_job_graph
-- Enqueue a graph of jobs in one statement, under reserved ids $1 (every job's
-- dependencies with lower ids): per job, type $2[i], payload $3[i], priority $4[i],
-- max_attempts $5[i], run_at $6[i] (absolute) else now() + $7[i] else now(), timeout
-- $8[i], concurrency_key $9[i], depends_on $10[i] (an array literal such as '{3,4}';
-- NULL: none), on_dependency_failure $11[i]; trace context $12 for them all (NULL:
-- none). 0013's trigger settles each row as the statement ends (all of its rows are
-- visible to it then). Returns the ids.
INSERT INTO {{schema}}.jobs (id, type, payload, priority, max_attempts, run_at, timeout,
                             concurrency_key, depends_on, on_dependency_failure, status,
                             trace_context)
SELECT g.id, g.type, g.payload::jsonb, g.priority, g.max_attempts,
       COALESCE(g.run_at, now() + g.run_in, now()), g.timeout, g.concurrency_key,
       g.depends_on::bigint[], g.on_dependency_failure,
       CASE WHEN g.depends_on IS NULL THEN 'pending' ELSE 'waiting' END,
       $12::text::jsonb
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::smallint[], $5::integer[],
            $6::timestamptz[], $7::interval[], $8::double precision[], $9::text[],
            $10::text[], $11::text[])
    AS g(id, type, payload, priority, max_attempts, run_at, run_in, timeout,
         concurrency_key, depends_on, on_dependency_failure)
ORDER BY g.id
RETURNING id;

-- name: dependency_results
-- The results of job $1's dependencies that completed (all of them, once it runs).
SELECT d.id, d.result::text AS result
FROM {{schema}}.jobs j
JOIN {{schema}}.jobs d ON d.id = ANY (j.depends_on)
WHERE j.id = $1 AND d.status = 'completed'
ORDER BY d.id;

-- name: job_links
-- Job $1's dependencies (link 'dependency') and its first $2 dependents (link
-- 'dependent'), each with its type and status.
SELECT 'dependency' AS link, d.id, d.type, d.status
FROM {{schema}}.jobs j
JOIN {{schema}}.jobs d ON d.id = ANY (j.depends_on)
WHERE j.id = $1
UNION ALL
(
    SELECT 'dependent', d.id, d.type, d.status
    FROM {{schema}}.job_dependencies e
    JOIN {{schema}}.jobs d ON d.id = e.dependent_id
    WHERE e.dependency_id = $1
    ORDER BY e.dependent_id
    LIMIT $2
);

-- ---------------------------------------------------------------------------------
-- Leader election (on the replica's dedicated connection; see elector.py)
-- ---------------------------------------------------------------------------------

-- name: leader_try_elect
-- Take the leader lock ($1: lock name) if it is free and, in the same statement, start
-- a new term for holder $2 with a lease of $3 seconds. No row: someone else leads.
WITH lock AS MATERIALIZED (
    SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS acquired
)
UPDATE {{schema}}.leader SET
    term = term + 1,
    holder = $2,
    backend_pid = pg_backend_pid(),
    acquired_at = now(),
    renewed_at = now(),
    lease_until = now() + make_interval(secs => $3)
FROM lock
WHERE lock.acquired
RETURNING term, lease_until;

-- name: leader_renew
-- Extend the lease by $3 seconds; scoped to our term $1, holder $2 and session, so a
-- deposed leader can never renew a lease that is no longer its own. No row: deposed.
UPDATE {{schema}}.leader SET
    renewed_at = now(),
    lease_until = now() + make_interval(secs => $3)
WHERE term = $1 AND holder = $2 AND backend_pid = pg_backend_pid()
RETURNING lease_until;

-- name: leader_release
-- Graceful hand-over: end our lease (term $1, holder $2), unlock ($3: lock name), then
-- NOTIFY the leader channel $4; the notification is delivered at commit, after the
-- unlock, so a standby woken by it finds the lock free.
WITH expire AS (
    UPDATE {{schema}}.leader SET lease_until = now()
    WHERE term = $1 AND holder = $2
    RETURNING 1
)
SELECT pg_advisory_unlock(hashtextextended($3, 0)) AS unlocked,
       pg_notify($4, $2) IS NULL AS notified,
       (SELECT count(*) FROM expire) AS expired;

-- name: leader_terminate_expired
-- Hung-leader takeover: if the lease lapsed on the database clock while the recorded
-- backend still holds the leader lock ($1: lock name), terminate that backend, waiting
-- up to $2 ms for it to exit. The pg_locks check makes sure a recycled pid is never
-- killed by mistake. No row: nothing to take over.
SELECT l.holder, l.backend_pid, l.term, pg_terminate_backend(l.backend_pid, $2) AS terminated
FROM {{schema}}.leader l
WHERE l.lease_until < now()
  AND l.backend_pid <> pg_backend_pid()
  AND EXISTS (
      SELECT 1 FROM pg_locks k
      WHERE k.locktype = 'advisory'
        AND k.granted
        AND k.pid = l.backend_pid
        AND k.classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::oid
        AND k.objid = (hashtextextended($1, 0) & 4294967295)::oid
        AND k.objsubid = 1
  );

-- name: leader_current
-- The leader row, with whether its lease is current on the database clock.
SELECT holder, backend_pid, term, acquired_at, renewed_at, lease_until,
       coalesce(lease_until > now(), false) AS lease_current
FROM {{schema}}.leader;

-- ---------------------------------------------------------------------------------
-- Replica registry
-- ---------------------------------------------------------------------------------

-- name: replica_heartbeat
-- Upsert this replica's row (id $1) with its current role $6 and job types $7.
INSERT INTO {{schema}}.replicas (id, name, host, pid, version, role, job_types)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role, job_types = EXCLUDED.job_types,
                               last_seen = now();

-- name: replica_remove
-- Remove this replica's row at shutdown.
DELETE FROM {{schema}}.replicas WHERE id = $1;

-- name: replicas_prune
-- Remove rows of replicas unseen for $1 seconds (leader only).
DELETE FROM {{schema}}.replicas
WHERE last_seen < now() - make_interval(secs => $1)
RETURNING id;

-- name: replicas_list
-- Every registered replica, with whether it was seen within $1 seconds.
SELECT id, name, host, pid, version, role, job_types, started_at, last_seen,
       last_seen > now() - make_interval(secs => $1) AS alive
FROM {{schema}}.replicas
ORDER BY started_at, id;

-- ---------------------------------------------------------------------------------
-- Dispatch hot path (leader's claim loop, completer, heartbeats)
-- ---------------------------------------------------------------------------------

-- fragment: first_priority
-- Where a loose scan of type h.type's priorities starts: the best priority with pending
-- jobs, probed from priority hint h.hint (NULL: from the start). Any hint is correct (a
-- better priority with pending jobs is still found); a right one spares the probe the
-- walk over the index entries of the jobs claimed at the hint's priority, which a
-- snapshot held elsewhere (a long transaction) keeps from being cleaned up. Each probe
-- is ORDER BY priority LIMIT 1, not min(priority): the same index probe, planned once
-- (min() is planned as an aggregate and as its index path), a fifth less of the
-- claim's planning, which every claim pays.
CASE
    WHEN h.hint IS NULL THEN (
        SELECT priority FROM {{schema}}.jobs
        WHERE status = 'pending' AND type = h.type
        ORDER BY priority LIMIT 1
    )
    ELSE coalesce((
        SELECT priority FROM {{schema}}.jobs
        WHERE status = 'pending' AND type = h.type AND priority < h.hint
        ORDER BY priority LIMIT 1
    ), h.hint)
END

-- fragment: pick_due_jobs
-- What every claim shares, after its fence (one row if the claim may go on, with
-- "at", the claim's time) and capacity (type, free, max_attempts, timeout, hint, since,
-- since_id) CTEs:
-- pick due pending jobs within capacity, at most $5 in all, in priority, run_at, id
-- order (start_picked_jobs starts them for owner $2, and gives max_attempts and timeout
-- left NULL on the row capacity's). Due jobs are found priority by priority, so jobs
-- scheduled later at a better priority are never walked.
-- Per type, each priority its pending jobs have: a loose scan of the claim index (one
-- probe per priority, however many jobs wait at it). It starts at hint, the best
-- priority the type's last claim took (NULL: none known), unless a better one has
-- pending jobs: any hint is correct, and a right one spares the first probe the walk
-- over the index entries of the jobs claimed at that priority, which a snapshot held
-- elsewhere (a long transaction) keeps from being cleaned up. At the hint's priority
-- the range scan starts after (since, since_id) (NULL: at the first due job), the last
-- job the type's last claim took, for the same reason (see claim_cursors.py for why no
-- due job hides behind it for longer than a poll interval).
priorities AS (
    SELECT h.type, {{first_priority}} AS priority
    FROM capacity h
    WHERE h.free > 0
    UNION ALL
    SELECT p.type, (
        SELECT priority FROM {{schema}}.jobs
        WHERE status = 'pending' AND type = p.type AND priority > p.priority
        ORDER BY priority LIMIT 1
    )
    FROM priorities p
    WHERE p.priority IS NOT NULL
),
picked AS MATERIALIZED (
    SELECT j.id
    FROM fence
    CROSS JOIN capacity
    CROSS JOIN LATERAL (
        SELECT due.id, due.priority, due.run_at
        FROM priorities p
        CROSS JOIN LATERAL (
            -- A range scan of the claim index that starts at the first due job.
            SELECT id, priority, run_at
            FROM {{schema}}.jobs
            WHERE status = 'pending' AND type = p.type AND priority = p.priority
              AND run_at <= fence.at
              AND (run_at, id) > (
                  coalesce(CASE WHEN p.priority = capacity.hint THEN capacity.since END,
                           '-infinity'::timestamptz),
                  coalesce(CASE WHEN p.priority = capacity.hint THEN capacity.since_id END, 0))
            ORDER BY run_at, id
            -- Never more than the claim may take in all: every row this scan returns
            -- is locked (a write: the row's xmax, a WAL record), and a row locked but
            -- not taken is met again by the next claim. With $5 at a quarter of the
            -- limit, capacity.free alone locked up to four rows per job started.
            LIMIT least(capacity.free, $5)
            FOR UPDATE SKIP LOCKED
        ) due
        WHERE p.type = capacity.type AND p.priority IS NOT NULL
        ORDER BY due.priority, due.run_at, due.id
        LIMIT greatest(least(capacity.free, $5), 0)
    ) j
    -- A pause takes effect at the next claim, whoever has heard of it yet.
    WHERE NOT EXISTS (
        SELECT 1 FROM {{schema}}.job_types t WHERE t.type = capacity.type AND t.paused
    )
    ORDER BY j.priority, j.run_at, j.id
    LIMIT $5
)

-- fragment: claim_due_jobs
-- pick_due_jobs, then start_in_claim_order: the tail both claims share.
{{pick_due_jobs}},
{{start_in_claim_order}}

-- fragment: start_in_claim_order
-- start_picked_jobs (as the CTE started_jobs), and its rows in claim order (the UPDATE
-- returns them in the order it finds them by id).
started_jobs AS (
    {{start_picked_jobs}}
)
SELECT * FROM started_jobs ORDER BY priority, run_at, id

-- fragment: start_picked_jobs
-- Start pick_due_jobs' picked jobs for owner $2 under term $1 (NULL: none). The rows
-- are probed by id (= ANY), not joined to picked, and take their type's defaults from
-- capacity: a statement planned once (database/pool.py, cycle_pool) may be planned on
-- statistics that make jobs look empty, and then a join walked the whole table once
-- per claim (84,078 rows removed by its join filter to start 9 jobs).
UPDATE {{schema}}.jobs j SET
    status = 'processing',
    attempts = j.attempts + 1,
    started_at = (SELECT at FROM fence),
    heartbeat_at = (SELECT at FROM fence),
    owner = $2,
    term = $1,
    progress = NULL,
    max_attempts = coalesce(
        j.max_attempts, (SELECT c.max_attempts FROM capacity c WHERE c.type = j.type)
    ),
    timeout = coalesce(j.timeout, (SELECT c.timeout FROM capacity c WHERE c.type = j.type))
WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING j.id, j.type, j.payload::text AS payload, j.attempts, j.max_attempts, j.timeout,
          greatest(extract(epoch FROM j.started_at - j.run_at), 0)::double precision AS waited,
          j.cancel_requested, j.priority, j.run_at, j.trace_context::text AS trace_context;

-- name: claim_jobs
-- Leader claim for owner $2 under term $1: per type $3[i] at most $4[i] jobs, at most $5
-- in all (the leader counts cluster and rate limits itself); executor defaults $6[i],
-- $7[i]; priority hint $9[i] and scan start ($10[i], $11[i]) (see pick_due_jobs).
-- Fenced: nothing is claimed unless term $1 and holder $2 still lead; the leader row
-- is share-locked, so a new election waits for this claim to commit, then
-- counts its jobs as running. Also fenced by claim number $8 (see revoke_claims): the
-- owner's replica row is key-share-locked, so a revocation waits for this claim, or
-- this claim for it.
WITH RECURSIVE {{leader_fence}},
{{claim_due_jobs}};

-- fragment: leader_fence
-- claim_jobs' fence (one row while term $1 and holder $2 lead and claim $8 is not
-- revoked) and capacity (its $3, $4, $6, $7, $9, $10, $11 by type) CTEs.
fence AS MATERIALIZED (
    -- now(): when this lone statement (no transaction) arrived. statement_timestamp()
    -- is reset at Execute, after the custom plan is made; started_at would be later by it.
    SELECT l.term, now() AS at
    FROM {{schema}}.leader l
    JOIN {{schema}}.replicas r ON r.id = $2 AND r.claims_revoked_before <= $8
    WHERE l.term = $1 AND l.holder = $2
    FOR SHARE OF l FOR KEY SHARE OF r
),
capacity AS (
    SELECT * FROM unnest($3::text[], $4::integer[], $6::integer[], $7::double precision[],
                         $9::smallint[], $10::timestamptz[], $11::bigint[])
        AS c(type, free, max_attempts, timeout, hint, since, since_id)
)

-- name: claim_jobs_worker
-- Worker claim for owner $2 ($1 NULL: no term), with claim_jobs' $3 to $11, never beyond
-- cluster limit $12[i] counting jobs processing anywhere, nor beyond $13[i] starts per
-- $14[i] seconds counting starts anywhere (NULL arrays or elements: no such limit).
-- Run after lock_types, in the same transaction, so the counts see every claim
-- committed before. Times are the statement's: a worker's lock wait comes before it.
-- A statement of its own, not claim_jobs with these CTEs idle: planned on every run,
-- they made the leader's claim a third slower (0.93 -> 1.27 ms round trip, 4 types).
WITH RECURSIVE {{worker_fence}},
{{claim_due_jobs}};

-- fragment: worker_fence
-- claim_jobs_worker's fence (one row while claim $8 of replica $2 is not revoked) and
-- capacity (its $3 to $14 by type, within the cluster and rate limits) CTEs.
fence AS MATERIALIZED (
    -- After lock_types' wait, not at the transaction's start.
    SELECT r.id, statement_timestamp() AS at FROM {{schema}}.replicas r
    WHERE r.id = $2 AND r.claims_revoked_before <= $8
    FOR KEY SHARE
),
limits AS (
    SELECT * FROM unnest($3::text[], $4::integer[], $6::integer[], $7::double precision[],
                         $9::smallint[], $10::timestamptz[], $11::bigint[], $12::integer[],
                         $13::integer[], $14::double precision[])
        AS c(type, free, max_attempts, timeout, hint, since, since_id, cluster_limit,
             rate_starts, rate_per)
),
running AS (
    SELECT type, count(*)::integer AS n
    FROM {{schema}}.jobs
    WHERE status = 'processing'
      AND type = ANY(ARRAY(SELECT type FROM limits WHERE cluster_limit IS NOT NULL))
    GROUP BY type
),
started AS (
    SELECT l.type, (
        SELECT count(*)::integer FROM (
            SELECT 1 FROM {{schema}}.jobs
            WHERE status = 'processing' AND type = l.type
              AND started_at > statement_timestamp() - make_interval(secs => l.rate_per)
            UNION ALL
            SELECT 1 FROM {{schema}}.jobs
            WHERE status IN ('completed', 'failed', 'cancelled') AND type = l.type
              AND finished_at > statement_timestamp() - make_interval(secs => l.rate_per)
              AND started_at > statement_timestamp() - make_interval(secs => l.rate_per)
            UNION ALL
            SELECT 1 FROM {{schema}}.jobs
            WHERE status = 'pending' AND type = l.type
              AND started_at > statement_timestamp() - make_interval(secs => l.rate_per)
        ) AS recent
    ) AS n
    FROM limits l
    WHERE l.rate_starts IS NOT NULL
),
capacity AS (
    SELECT l.type,
           least(l.free,
                 coalesce(l.cluster_limit - coalesce(r.n, 0), l.free),
                 coalesce(l.rate_starts - s.n, l.free)) AS free,
           l.max_attempts, l.timeout, l.hint, l.since, l.since_id
    FROM limits l
    LEFT JOIN running r ON r.type = l.type
    LEFT JOIN started s ON s.type = l.type
)

-- name: claim_keyed_jobs
-- claim_jobs for types whose executor has a key limit: claim_jobs' $1 to $11 (the
-- priority hints and scan starts are not used) and key limit $12[i] of type $3[i]
-- (see pick_keyed_jobs). Fenced as claim_jobs.
WITH RECURSIVE {{leader_fence}},
key_limits AS (
    SELECT * FROM unnest($3::text[], $12::integer[]) AS k(type, key_limit)
),
{{pick_keyed_jobs}},
{{start_in_claim_order}};

-- name: claim_keyed_jobs_worker
-- claim_keyed_jobs in worker mode: claim_jobs_worker's $1 to $14 and key limit $15[i]
-- of type $3[i]. Run after lock_types (every keyed type is locked), in the same
-- transaction, so the per-key counts see every claim committed before.
WITH RECURSIVE {{worker_fence}},
key_limits AS (
    SELECT * FROM unnest($3::text[], $15::integer[]) AS k(type, key_limit)
),
{{pick_keyed_jobs}},
{{start_in_claim_order}};

-- fragment: pick_keyed_jobs
-- pick_due_jobs for keyed types, after fence, capacity and key_limits (type, key_limit)
-- CTEs: per type at most capacity.free jobs, $5 in all, and per concurrency_key at
-- most key_limit processing at once, counting the jobs processing under any owner (a
-- previous leader's, another worker's). Within a key, due jobs go in priority, run_at,
-- id order (a retried job's run_at is its retry time); across keys, by the same order
-- of their first due jobs. Each key with pending jobs costs one probe of
-- jobs_pending_key_idx (a loose scan), however many jobs wait under it: a hot key
-- neither starves the others nor slows the claim. Jobs of the type without a key are
-- limited by capacity only, and found among the type's first 1,000 due jobs.
keyed AS (
    SELECT c.type, c.free, c.max_attempts, c.timeout, k.key_limit
    FROM capacity c
    JOIN key_limits k ON k.type = c.type
    WHERE c.free > 0
      -- A pause takes effect at the next claim, whoever has heard of it yet.
      AND NOT EXISTS (
          SELECT 1 FROM {{schema}}.job_types t WHERE t.type = c.type AND t.paused
      )
),
running_keys AS (
    SELECT j.type, j.concurrency_key, count(*)::integer AS n
    FROM {{schema}}.jobs j
    WHERE j.status = 'processing' AND j.concurrency_key IS NOT NULL
      AND j.type = ANY(ARRAY(SELECT type FROM keyed))
    GROUP BY j.type, j.concurrency_key
),
pending_keys AS (
    SELECT c.type, (
        SELECT min(concurrency_key) FROM {{schema}}.jobs
        WHERE status = 'pending' AND concurrency_key IS NOT NULL AND type = c.type
    ) AS key
    FROM keyed c
    UNION ALL
    SELECT p.type, (
        SELECT min(concurrency_key) FROM {{schema}}.jobs
        WHERE status = 'pending' AND concurrency_key IS NOT NULL AND type = p.type
          AND concurrency_key > p.key
    )
    FROM pending_keys p
    WHERE p.key IS NOT NULL
),
candidates AS (
    SELECT c.type, due.id, due.priority, due.run_at
    FROM pending_keys p
    JOIN keyed c ON c.type = p.type
    CROSS JOIN fence
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at
        FROM {{schema}}.jobs
        WHERE status = 'pending' AND concurrency_key IS NOT NULL
          AND type = p.type AND concurrency_key = p.key AND run_at <= fence.at
        ORDER BY priority, run_at, id
        LIMIT greatest(c.key_limit - coalesce((
            SELECT r.n FROM running_keys r
            WHERE r.type = p.type AND r.concurrency_key = p.key
        ), 0), 0)
    ) due
    WHERE p.key IS NOT NULL
    UNION ALL
    SELECT c.type, due.id, due.priority, due.run_at
    FROM keyed c
    CROSS JOIN fence
    CROSS JOIN LATERAL (
        -- Jobs without a key: among the type's first 1,000 due jobs in claim order (the
        -- claim index has no key to skip the keyed ones by; a bounded look-ahead keeps
        -- a backlog of keyed jobs from making every claim walk it).
        SELECT ahead.id, ahead.priority, ahead.run_at
        FROM (
            SELECT id, priority, run_at, concurrency_key
            FROM {{schema}}.jobs
            WHERE status = 'pending' AND type = c.type AND run_at <= fence.at
            ORDER BY priority, run_at, id
            LIMIT 1000
        ) ahead
        WHERE ahead.concurrency_key IS NULL
        LIMIT c.free
    ) due
),
chosen AS (
    SELECT x.id
    FROM keyed c
    CROSS JOIN LATERAL (
        SELECT cand.id, cand.priority, cand.run_at
        FROM candidates cand
        WHERE cand.type = c.type
        ORDER BY cand.priority, cand.run_at, cand.id
        LIMIT c.free
    ) x
    ORDER BY x.priority, x.run_at, x.id
    LIMIT $5
),
-- Locked last, and only the chosen rows: a row someone holds (a cancel, a retry) is
-- skipped, never waited for, and then no other job of its key is taken in its place.
picked AS MATERIALIZED (
    SELECT j.id
    FROM fence
    CROSS JOIN chosen
    JOIN {{schema}}.jobs j ON j.id = chosen.id
    WHERE j.status = 'pending'
    FOR UPDATE OF j SKIP LOCKED
)

-- name: complete_jobs
-- Write a batch of attempt outcomes for owner $1 (group commit). Per job: id $2[i],
-- attempt $3[i], outcome $4[i] (completed, failed, cancelled; retry: a failed attempt
-- to run again after $8[i] seconds; snooze: again after $8[i] seconds without spending
-- the attempt; requeue: again after $8[i] seconds, attempt refunded), result JSON
-- $5[i], error $6[i], traceback tail $7[i]. A job whose cancel was requested ends
-- cancelled instead of going back to pending. Fenced: only jobs still processing
-- under this owner and attempt change; the rows returned are the ones written, the
-- rest were taken from us. Waits at most $9 (e.g. '500ms') for a row another session
-- holds locked, then fails with lock_not_available (55P03): the completer then writes
-- the batch's outcomes one by one, so one locked row holds back only itself.
{{write_outcomes}};

-- fragment: write_outcomes
-- complete_jobs' UPDATE (see there).
UPDATE {{schema}}.jobs j SET
    status = CASE
        WHEN o.outcome NOT IN ('retry', 'snooze', 'requeue') THEN o.outcome
        WHEN j.cancel_requested THEN 'cancelled'
        ELSE 'pending'
    END,
    finished_at = CASE
        WHEN o.outcome IN ('retry', 'snooze', 'requeue') AND NOT j.cancel_requested THEN NULL
        ELSE now()
    END,
    run_at = CASE
        WHEN o.outcome IN ('retry', 'snooze', 'requeue') AND NOT j.cancel_requested
        THEN now() + make_interval(secs => o.delay)
        ELSE j.run_at
    END,
    attempts = CASE WHEN o.outcome IN ('snooze', 'requeue') THEN j.attempts - 1 ELSE j.attempts END,
    result = CASE WHEN o.outcome = 'completed' THEN o.result::jsonb ELSE j.result END,
    last_error = coalesce(o.error, j.last_error),
    errors = CASE
        WHEN o.error IS NULL THEN j.errors
        ELSE j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'started_at', j.started_at, 'at', now(), 'error', o.error,
            'traceback', o.traceback))
    END
FROM (
    SELECT o.*, $1::text AS owner, 'processing'::text AS running
    FROM unnest($2::bigint[], $3::integer[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::double precision[])
        AS o(id, attempt, outcome, result, error, traceback, delay)
    -- A subquery the planner keeps (OFFSET 0), so owner and status are not folded into
    -- constants: they stay join clauses, and the job rows are found by id alone (= ANY
    -- below: as many rows as outcomes, each id probed), then joined to the outcomes.
    -- With owner and status as plain filters, statistics taken while nothing ran (a
    -- new replica's owner id is never in them) made the running rows look like one:
    -- the planner joined each row it found to a rescan of the whole unnest (a 250-job
    -- batch: 62,250 comparisons, 47 ms instead of 4), or walked the processing index's
    -- dead entries.
    OFFSET 0
) o
WHERE j.id = o.id
  AND j.id = ANY($2::bigint[])
  AND j.owner = o.owner
  AND j.attempts = o.attempt
  AND j.status = o.running
  -- The lock wait limit for this statement only (is_local: its own transaction). An
  -- uncorrelated condition: evaluated once, before any row is touched.
  AND (SELECT set_config('lock_timeout', $9, true)) IS NOT NULL
RETURNING j.id, o.attempt, j.status;

-- name: complete_and_claim_jobs
-- complete_jobs and claim_jobs in one statement: one round trip and one commit for a
-- slot's whole cycle (its outcome written, its next job started), and the table never
-- shows the slot taken twice (the outcome's finished_at is the claim's started_at).
-- $1 to $11: claim_jobs' (term, owner, ...; its frees count the slots this batch of
-- outcomes gives back); $12 to $20: complete_jobs' $1 to $9. The CTEs share one
-- snapshot and touch different rows (processing ones written, pending ones claimed).
-- One row per job claimed (claimed true, claim_jobs' columns) and per outcome written
-- (claimed false: id, attempts = the attempt, status).
WITH RECURSIVE {{leader_fence}},
{{pick_due_jobs}},
started AS (
    {{start_picked_jobs}}
),
written AS (
    {{write_outcomes+11}}
)
(
    SELECT true AS claimed, id, type, payload, attempts, max_attempts, timeout, waited,
           cancel_requested, priority, run_at, trace_context, NULL::text AS status
    FROM started
    ORDER BY priority, run_at, id  -- claim order (see start_in_claim_order)
)
UNION ALL
SELECT false, id, NULL, NULL, attempt, NULL, NULL, NULL, NULL, NULL, NULL, NULL, status
FROM written;

-- name: heartbeat_jobs
-- Mark owner $1's running attempts ($2[i] id, $3[i] attempt) alive. One row back per
-- attempt: beaten (heartbeat_at written), ours (still processing under this owner and
-- attempt: an attempt that is not was taken from us), cancel_requested. A row another
-- session holds locked is skipped, not waited for (SKIP LOCKED): it comes back ours
-- and not beaten, read from its last committed version (record_locked_jobs tells the
-- reaper it is alive).
WITH h AS MATERIALIZED (
    -- Owner and status as columns, not constants: join clauses, as in write_outcomes
    -- (see there), so the rows are found by id alone and no stale estimate of the
    -- running rows makes the join rescan the attempts once per row.
    SELECT h.*, $1::text AS owner, 'processing'::text AS running
    FROM unnest($2::bigint[], $3::integer[]) AS h(id, attempt)
),
locked AS (
    SELECT j.id
    FROM {{schema}}.jobs j
    JOIN h ON h.id = j.id AND h.attempt = j.attempts AND h.owner = j.owner
          AND h.running = j.status
    -- Redundant for the result, decisive for the plan: the rows are probed by id one
    -- by one, whatever number of dead entries the indexes hold between vacuums or
    -- under a snapshot held elsewhere. The same in every statement that finds our
    -- running rows by id.
    WHERE j.id = ANY($2::bigint[])
    FOR UPDATE OF j SKIP LOCKED
),
beat AS (
    UPDATE {{schema}}.jobs j SET heartbeat_at = now()
    FROM locked
    WHERE j.id = locked.id
    RETURNING j.id, j.attempts, j.cancel_requested
)
SELECT h.id, h.attempt,
       b.id IS NOT NULL AS beaten,
       b.id IS NOT NULL OR still.id IS NOT NULL AS ours,
       coalesce(b.cancel_requested, still.cancel_requested, false) AS cancel_requested
FROM h
LEFT JOIN beat b ON b.id = h.id AND b.attempts = h.attempt
LEFT JOIN LATERAL (
    SELECT c.id, c.cancel_requested FROM {{schema}}.jobs c
    WHERE b.id IS NULL AND c.id = h.id AND c.attempts = h.attempt
      AND c.owner = $1 AND c.status = 'processing'
    -- Run per attempt not beaten, a probe by its id: flattened into a join, it read
    -- every row of the batch once per attempt.
    OFFSET 0
) AS still ON true;

-- name: record_locked_jobs
-- Owner $1's running jobs $2 that its heartbeat had to skip (another session holds
-- their row lock): alive, though their heartbeat_at ages. The reaper spares them
-- while this list is fresh.
UPDATE {{schema}}.replicas SET locked_job_ids = $2, locked_job_ids_at = now()
WHERE id = $1;

-- name: next_due_in
-- Seconds until the earliest future run_at among pending jobs of types $1; NULL:
-- nothing scheduled (the claim loop then just polls). Reads the claim index (type,
-- priority, run_at): a loose scan over the priorities present per type, then the
-- first future run_at of each, a few index probes whatever the queue's size. The scan
-- starts at each type's priority hint $2[i], as the claim's does (see pick_due_jobs):
-- from the start of the type it would walk the entries a held snapshot keeps.
WITH RECURSIVE priorities AS (
    SELECT h.type, {{first_priority}} AS priority
    FROM unnest($1::text[], $2::smallint[]) AS h(type, hint)
    UNION ALL
    SELECT p.type, (
        SELECT min(priority) FROM {{schema}}.jobs
        WHERE status = 'pending' AND type = p.type AND priority > p.priority
    )
    FROM priorities p
    WHERE p.priority IS NOT NULL
)
SELECT extract(epoch FROM min(next.run_at) - now())::double precision
FROM priorities p
CROSS JOIN LATERAL (
    SELECT run_at FROM {{schema}}.jobs
    WHERE status = 'pending' AND type = p.type AND priority = p.priority AND run_at > now()
    ORDER BY run_at
    LIMIT 1
) AS next
WHERE p.priority IS NOT NULL;

-- name: running_by_others
-- Jobs processing under owners other than $1, per type: a new leader counts them
-- against the limits until they end.
SELECT type, count(*)::integer AS running
FROM {{schema}}.jobs
WHERE status = 'processing' AND owner IS DISTINCT FROM $1
GROUP BY type;

-- name: update_progress
-- Write the latest progress of owner $1's running attempts ($2[i] id, $3[i] attempt,
-- $4[i] progress JSON). Rows another session holds locked are skipped; returns the
-- (id, attempt) pairs written.
WITH p AS MATERIALIZED (
    SELECT p.*, $1::text AS owner, 'processing'::text AS running  -- see heartbeat_jobs
    FROM unnest($2::bigint[], $3::integer[], $4::text[]) AS p(id, attempt, progress)
),
locked AS (
    -- Carries the progress: the rows it locks cannot change before the UPDATE, so
    -- that joins them alone, not the batch a second time.
    SELECT j.id, p.progress
    FROM {{schema}}.jobs j
    JOIN p ON p.id = j.id AND p.attempt = j.attempts AND p.owner = j.owner
          AND p.running = j.status
    WHERE j.id = ANY($2::bigint[])  -- probed by id (see heartbeat_jobs)
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE {{schema}}.jobs j SET progress = locked.progress::jsonb
FROM locked
WHERE j.id = locked.id
RETURNING j.id, j.attempts AS attempt;

-- name: revoke_claims
-- Owner $1 revokes its claims numbered below $2: waits (FOR UPDATE against the claims'
-- KEY SHARE) for any of them still running, and makes any not yet run claim nothing.
-- First statement of the transaction that runs hand_back_unheld.
WITH gate AS (
    SELECT id FROM {{schema}}.replicas WHERE id = $1 FOR UPDATE
)
UPDATE {{schema}}.replicas r
SET claims_revoked_before = greatest(r.claims_revoked_before, $2)
FROM gate
WHERE r.id = gate.id;

-- name: hand_back_unheld
-- Owner $1's processing rows that it does not hold (not among attempts $2[i] id,
-- $3[i] attempt): rows a claim committed whose reply never came back. Back to pending
-- at once, attempt refunded (it never started). After revoke_claims, in its
-- transaction, so no claim of ours can still add to them. Rows another session holds
-- locked are left (the reaper rescues them if they stay). Returns the rows handed back.
WITH unheld AS (
    SELECT j.id
    FROM {{schema}}.jobs j
    WHERE j.status = 'processing' AND j.owner = $1
      AND NOT EXISTS (
          SELECT 1 FROM unnest($2::bigint[], $3::integer[]) AS h(id, attempt)
          WHERE h.id = j.id AND h.attempt = j.attempts
      )
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE {{schema}}.jobs j SET
    status = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'pending' END,
    finished_at = CASE WHEN j.cancel_requested THEN now() END,
    attempts = j.attempts - 1,
    started_at = NULL,
    heartbeat_at = NULL,
    owner = NULL,
    term = NULL
FROM unheld
WHERE j.id = unheld.id
RETURNING j.id, j.type, j.status;

-- name: owned_processing_count
-- How many rows are processing under owner $1 (zero: a shutdown left nothing behind).
SELECT count(*)::integer FROM {{schema}}.jobs WHERE status = 'processing' AND owner = $1;

-- ---------------------------------------------------------------------------------
-- Replica sessions: a replica's own session and lock say its process is alive
-- (see replica_session.py; the lock's first key is hashtext($lock_name) & 2147483647)
-- ---------------------------------------------------------------------------------

-- name: session_lock
-- On the replica's session: take the lock (key of lock name $1, this backend's pid).
-- Nobody else can hold it: no other live session has our pid. pid: to compare with
-- the connection's own (a pooler in between shows a pid of its own).
SELECT pg_try_advisory_lock(hashtext($1) & 2147483647, pg_backend_pid()) AS locked,
       pg_backend_pid() AS pid;

-- name: session_record
-- On the replica's session: record it on replica $1's row with its async types $2,
-- unless the row already says so. registered false: the row is missing (pruned while
-- we were cut off); the registry's next heartbeat writes it again.
WITH recorded AS (
    UPDATE {{schema}}.replicas SET
        session_pid = pg_backend_pid(),
        session_server_started = pg_postmaster_start_time(),
        async_types = $2
    WHERE id = $1
      AND (session_pid IS DISTINCT FROM pg_backend_pid()
           OR session_server_started IS DISTINCT FROM pg_postmaster_start_time()
           OR async_types IS DISTINCT FROM $2::text[])
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM {{schema}}.replicas WHERE id = $1) AS registered,
       (SELECT count(*) FROM recorded) > 0 AS written;

-- name: session_forget
-- Through the pool: strike session $2 (lost) from replica $1's row, unless a newer one
-- is recorded already. The leader then rescues nothing of ours early.
UPDATE {{schema}}.replicas SET session_pid = NULL, session_server_started = NULL
WHERE id = $1 AND session_pid = $2;

-- fragment: session_gone
-- Replica row r's recorded session, on this server run, no longer holds its lock
-- ($1: lock name). On another server run (a restart, a fail-over) a free lock proves
-- nothing: nobody holds anything there yet.
r.session_server_started = pg_postmaster_start_time()
AND NOT EXISTS (
    SELECT 1 FROM pg_locks k
    WHERE k.locktype = 'advisory'
      AND k.granted
      AND k.pid = r.session_pid
      AND k.classid = (hashtext($1) & 2147483647)::oid
      AND k.objid = r.session_pid::oid
      AND k.objsubid = 2
)

-- name: orphaned_owners
-- Replicas whose recorded session no longer holds its lock ($1: lock name), on this
-- server run: their process died, or their session was ended under them.
SELECT r.id, r.session_pid
FROM {{schema}}.replicas r
WHERE r.session_pid IS NOT NULL
  AND {{session_gone}};

-- name: orphaned_jobs
-- Lock up to $4 processing jobs of owners $2[i] whose session $3[i] is still recorded
-- and still gone ($1: lock name), of the types those owners stop at once on losing
-- it (async_types). Same shape as stale_jobs, for rescue_jobs in the same transaction.
SELECT j.id, j.type, j.attempts, j.max_attempts,
       format('orphaned: owner %s lost its database session (its process died or was cut off)',
              j.owner) AS error
FROM unnest($2::text[], $3::integer[]) AS o(owner, pid)
JOIN {{schema}}.replicas r ON r.id = o.owner AND r.session_pid = o.pid
JOIN {{schema}}.jobs j ON j.owner = o.owner
WHERE j.status = 'processing'
  AND j.type = ANY(r.async_types)
  AND {{session_gone}}
LIMIT $4
FOR UPDATE OF j SKIP LOCKED;

-- ---------------------------------------------------------------------------------
-- Reaper (leader only)
-- ---------------------------------------------------------------------------------

-- name: stale_jobs
-- Lock up to $2 processing jobs whose owner has not heartbeated them for $1 seconds
-- (in the reaper's transaction; rows being heartbeated right now are skipped), unless
-- the owner said within $1 seconds that it holds the job but finds its row locked by
-- another session (record_locked_jobs): that attempt is alive. A heartbeat from the
-- future (no replica writes one: heartbeats take the database clock) is a row someone
-- inserted as processing: stale too, or it would hold its type's slot forever.
SELECT j.id, j.type, j.attempts, j.max_attempts,
       CASE WHEN j.heartbeat_at > now()
       THEN format('stale: its heartbeat_at (%s) is in the future, owner %s',
                   j.heartbeat_at, j.owner)
       ELSE format('stale: owner stopped heartbeating (owner %s, last heartbeat %ss ago)',
                   j.owner, round(extract(epoch FROM now() - j.heartbeat_at)))
       END AS error
FROM {{schema}}.jobs j
WHERE j.status = 'processing'
  AND (j.heartbeat_at < now() - make_interval(secs => $1)
       OR j.heartbeat_at > now() + make_interval(secs => $1))
  AND NOT EXISTS (
      SELECT 1 FROM {{schema}}.replicas r
      WHERE r.id = j.owner AND j.id = ANY(r.locked_job_ids)
        AND r.locked_job_ids_at > now() - make_interval(secs => $1)
  )
ORDER BY j.heartbeat_at
LIMIT $2
FOR UPDATE OF j SKIP LOCKED;

-- name: rescue_jobs
-- Record the lost attempt of each stale job $1[i] as failed with error $4[i], then
-- retry it after $2[i] seconds ($3[i] true) or fail it for good; a job with a cancel
-- request ends cancelled. Same transaction as stale_jobs.
UPDATE {{schema}}.jobs j SET
    status = CASE
        WHEN j.cancel_requested THEN 'cancelled'
        WHEN r.retry THEN 'pending'
        ELSE 'failed'
    END,
    run_at = CASE
        WHEN r.retry AND NOT j.cancel_requested THEN now() + make_interval(secs => r.delay)
        ELSE j.run_at
    END,
    finished_at = CASE WHEN r.retry AND NOT j.cancel_requested THEN NULL ELSE now() END,
    last_error = r.error,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempts, 'started_at', j.started_at, 'at', now(), 'error', r.error,
        'traceback', NULL))
FROM unnest($1::bigint[], $2::double precision[], $3::boolean[], $4::text[])
    AS r(id, delay, retry, error)
WHERE j.id = r.id AND j.id = ANY($1::bigint[]) AND j.status = 'processing'
RETURNING j.id, j.type, j.status;

-- name: fail_jobs_without_executor
-- Fail up to $1 pending jobs due for over $2 seconds whose type no replica seen in
-- the last $3 seconds has an executor for ($4: this replica's own types). Pending
-- types are listed with a loose index scan of the claim index (one probe per type).
WITH RECURSIVE pending_types AS (
    (SELECT type FROM {{schema}}.jobs WHERE status = 'pending' ORDER BY type LIMIT 1)
    UNION ALL
    SELECT (
        SELECT j.type FROM {{schema}}.jobs j
        WHERE j.status = 'pending' AND j.type > t.type
        ORDER BY j.type LIMIT 1
    )
    FROM pending_types t
    WHERE t.type IS NOT NULL
),
known AS (
    SELECT unnest(job_types) AS type FROM {{schema}}.replicas
    WHERE last_seen > now() - make_interval(secs => $3)
    UNION
    SELECT unnest($4::text[])
),
unknown AS (
    SELECT type FROM pending_types
    WHERE type IS NOT NULL AND type NOT IN (SELECT type FROM known)
),
doomed AS (
    SELECT j.id
    FROM unknown u
    CROSS JOIN LATERAL (
        SELECT id FROM {{schema}}.jobs
        WHERE status = 'pending' AND type = u.type
          AND run_at < now() - make_interval(secs => $2)
        ORDER BY priority, run_at, id
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ) j
    LIMIT $1
),
message AS (
    SELECT coalesce(string_agg(type, ', ' ORDER BY type), '(none)') AS registered FROM known
)
UPDATE {{schema}}.jobs j SET
    status = 'failed',
    finished_at = now(),
    last_error = format('no executor registered for type %L; registered: %s',
                        j.type, message.registered),
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempts, 'at', now(), 'traceback', NULL,
        'error', format('no executor registered for type %L; registered: %s',
                        j.type, message.registered)))
FROM doomed, message
WHERE j.id = doomed.id
RETURNING j.id, j.type;

-- ---------------------------------------------------------------------------------
-- Operators (API, CLI): listing and cluster status
-- ---------------------------------------------------------------------------------

-- name: list_jobs
-- Jobs newest first, optionally only status $1 and type $2, with ids below $3 (keyset
-- pagination: pass the last id of the previous page); at most $4.
SELECT * FROM {{schema}}.jobs
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::text IS NULL OR type = $2)
  AND ($3::bigint IS NULL OR id < $3)
ORDER BY id DESC
LIMIT $4;

-- name: queue_depth
-- Per type: pending jobs due now (ready) and later (scheduled), processing jobs, and
-- the age in seconds of the oldest ready one. Each half reads only its partial index
-- (index-only when the visibility map allows), however many finished rows pile up.
WITH pending AS (
    SELECT type,
           count(*) FILTER (WHERE run_at <= now()) AS ready,
           count(*) FILTER (WHERE run_at > now()) AS scheduled,
           min(run_at) FILTER (WHERE run_at <= now()) AS oldest_ready
    FROM {{schema}}.jobs
    WHERE status = 'pending'
    GROUP BY type
), processing AS (
    SELECT type, count(*) AS n
    FROM {{schema}}.jobs
    WHERE status = 'processing'
    GROUP BY type
)
SELECT coalesce(p.type, r.type) AS type,
       coalesce(p.ready, 0) AS ready,
       coalesce(p.scheduled, 0) AS scheduled,
       coalesce(r.n, 0) AS processing,
       coalesce(extract(epoch FROM now() - p.oldest_ready), 0)::double precision
           AS oldest_ready_age
FROM pending p
FULL JOIN processing r ON r.type = p.type
ORDER BY 1;

-- name: prune_finished_jobs
-- Delete up to $3 jobs of statuses $1 that finished more than $2 seconds ago, oldest
-- first, skipping rows someone holds, and jobs that a waiting, pending or processing
-- job depends on (0013's delete trigger keeps those anyway, race-free; this spares it
-- the work). Returns how many were deleted.
WITH doomed AS (
    SELECT j.id FROM {{schema}}.jobs j
    WHERE j.status = ANY($1::text[]) AND j.finished_at < now() - make_interval(secs => $2)
      AND NOT (j.has_dependents AND EXISTS (
          SELECT 1
          FROM {{schema}}.job_dependencies e
          JOIN {{schema}}.jobs d ON d.id = e.dependent_id
          WHERE e.dependency_id = j.id AND d.status IN ('waiting', 'pending', 'processing')
      ))
    ORDER BY j.finished_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM {{schema}}.jobs j USING doomed WHERE j.id = doomed.id RETURNING 1
)
SELECT count(*)::integer FROM deleted;

-- ---------------------------------------------------------------------------------
-- Dashboard (/ui/): queue samples (0011) and searches
-- ---------------------------------------------------------------------------------

-- name: record_queue_sample
-- Record a queue sample (see 0011): per type $1[i], its ready $2[i], scheduled $3[i]
-- and processing $4[i] jobs (queue_depth's count), and how many of its jobs completed
-- and failed since the previous sample (the first one: in the last $5 seconds; never
-- more than an hour back). Samples end a second ago: a completion's finished_at is
-- its transaction's start, so one committing now may carry an instant already past,
-- and counted later it would fall between samples.
WITH since AS (
    SELECT greatest(coalesce(max(at), now() - interval '1 second'
                                        - make_interval(secs => $5)),
                    now() - interval '1 hour') AS at
    FROM {{schema}}.queue_samples
), finished AS (
    SELECT j.type,
           count(*) FILTER (WHERE j.status = 'completed') AS completed,
           count(*) FILTER (WHERE j.status = 'failed') AS failed
    FROM {{schema}}.jobs j, since
    WHERE j.status IN ('completed', 'failed', 'cancelled')
      AND j.finished_at > since.at AND j.finished_at <= now() - interval '1 second'
    GROUP BY j.type
), depth AS (
    SELECT * FROM unnest($1::text[], $2::integer[], $3::integer[], $4::integer[])
        AS d(type, ready, scheduled, processing)
)
INSERT INTO {{schema}}.queue_samples (at, type, ready, scheduled, processing, completed, failed)
SELECT now() - interval '1 second', coalesce(d.type, f.type), coalesce(d.ready, 0),
       coalesce(d.scheduled, 0), coalesce(d.processing, 0), coalesce(f.completed, 0),
       coalesce(f.failed, 0)
FROM depth d
FULL JOIN finished f ON f.type = d.type
ON CONFLICT DO NOTHING;

-- name: prune_queue_samples
-- Forget queue samples older than two hours (the dashboard shows the last one).
DELETE FROM {{schema}}.queue_samples WHERE at < now() - interval '2 hours';

-- name: queue_history
-- The last hour, minute by minute, from the queue samples: jobs completed and failed
-- in the minute, and the queue (ready, scheduled, processing, all types) at its last
-- sample. Minutes without a sample are missing.
WITH instants AS (
    SELECT at, sum(ready)::bigint AS ready, sum(scheduled)::bigint AS scheduled,
           sum(processing)::bigint AS processing, sum(completed)::bigint AS completed,
           sum(failed)::bigint AS failed
    FROM {{schema}}.queue_samples
    WHERE at > now() - interval '1 hour'
    GROUP BY at
)
SELECT date_trunc('minute', at) AS minute,
       sum(completed)::bigint AS completed,
       sum(failed)::bigint AS failed,
       (array_agg(ready ORDER BY at DESC))[1] AS ready,
       (array_agg(scheduled ORDER BY at DESC))[1] AS scheduled,
       (array_agg(processing ORDER BY at DESC))[1] AS processing
FROM instants
GROUP BY 1
ORDER BY 1;

-- name: finished_by_type
-- Per type, its jobs completed and failed in the last hour (queue samples).
SELECT type, sum(completed)::bigint AS completed, sum(failed)::bigint AS failed
FROM {{schema}}.queue_samples
WHERE at > now() - interval '1 hour'
GROUP BY type;

-- name: list_jobs_by_unique_key
-- list_jobs for the jobs with unique_key $1: optionally only status $2 and type $3,
-- ids below $4, at most $5, newest first.
SELECT * FROM {{schema}}.jobs
WHERE unique_key = $1
  AND ($2::text IS NULL OR status = $2)
  AND ($3::text IS NULL OR type = $3)
  AND ($4::bigint IS NULL OR id < $4)
ORDER BY id DESC
LIMIT $5;

-- ---------------------------------------------------------------------------------
-- Per-type controls, result cache, dead letters, periodic schedules (0002)
-- ---------------------------------------------------------------------------------

-- name: queue_full
-- Why an enqueue of type $1 was refused: its max_pending and last pending count
-- (no row: it was not refused for backpressure).
SELECT max_pending, pending, counted_at
FROM {{schema}}.job_types
WHERE type = $1 AND NOT accepting;

-- name: cached_job
-- The newest job of type $1 with unique_key $2 that completed within $3 seconds.
SELECT *, false AS duplicate, true AS cached
FROM {{schema}}.jobs
WHERE type = $1 AND unique_key = $2 AND status = 'completed'
  AND finished_at > now() - make_interval(secs => $3)
ORDER BY finished_at DESC
LIMIT 1;

-- name: retry_jobs
-- Put jobs back to pending, due now: up to $3 jobs of statuses $1 (failed,
-- cancelled), optionally only of type $2. They keep their error history; an
-- exhausted job gets one more attempt (as retry_job). A job with dependencies waits
-- again for those not completed (0013's trigger settles it: waiting, pending, or ended
-- again at once while one of them is failed or cancelled). Returns the ids.
UPDATE {{schema}}.jobs SET
    status = 'pending',
    run_at = now(),
    finished_at = NULL,
    started_at = NULL,
    heartbeat_at = NULL,
    owner = NULL,
    term = NULL,
    cancel_requested = false,
    max_attempts = CASE WHEN max_attempts IS NOT NULL AND attempts >= max_attempts
                        THEN attempts + 1 ELSE max_attempts END
WHERE id IN (
    SELECT id FROM {{schema}}.jobs
    WHERE status = ANY($1::text[])
      AND ($2::text IS NULL OR type = $2)
    ORDER BY id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING id;

-- name: retry_job
-- retry_jobs for job $1 alone, returning its row as written (a leader may claim it
-- the next moment, so a later read could already show it processing). No row: not
-- found, or not failed or cancelled. A job with dependencies comes back as written
-- before 0013's trigger settled it (waiting, pending, or ended again): read it again.
UPDATE {{schema}}.jobs SET
    status = 'pending',
    run_at = now(),
    finished_at = NULL,
    started_at = NULL,
    heartbeat_at = NULL,
    owner = NULL,
    term = NULL,
    cancel_requested = false,
    max_attempts = CASE WHEN max_attempts IS NOT NULL AND attempts >= max_attempts
                        THEN attempts + 1 ELSE max_attempts END
WHERE id = $1 AND status IN ('failed', 'cancelled')
RETURNING *;

-- name: set_paused
-- Pause ($2 true) or resume ($2 false) type $1 across the cluster.
INSERT INTO {{schema}}.job_types (type, paused) VALUES ($1, $2)
ON CONFLICT (type) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now()
RETURNING type, paused, max_pending, accepting, pending, counted_at, updated_at;

-- name: list_job_types
-- Every configured type with its controls.
SELECT type, paused, max_pending, accepting, pending, counted_at, updated_at
FROM {{schema}}.job_types
ORDER BY type;

-- name: paused_types
-- Types the leader must not claim.
SELECT type FROM {{schema}}.job_types WHERE paused;

-- name: declare_max_pending
-- The leader records the app's max_pending per type ($1[i], $2[i]; NULL: no limit).
INSERT INTO {{schema}}.job_types (type, max_pending)
SELECT * FROM unnest($1::text[], $2::integer[])
ON CONFLICT (type) DO UPDATE SET max_pending = EXCLUDED.max_pending, updated_at = now()
WHERE job_types.max_pending IS DISTINCT FROM EXCLUDED.max_pending;

-- name: lock_queue_count
-- Serialize queue counts of schema $1 until the end of the transaction. Two counts can
-- overlap (across a leader change, or a call beside the leader's loop); taken after
-- this lock, a count sees every count committed before it, so the last one written is
-- always the newest and a stale count never reopens a queue a newer one closed.
SELECT pg_advisory_xact_lock(hashtextextended('dispatcher:queue_count:' || $1, 0));

-- name: refresh_accepting
-- From pending counts per type ($1[i], $2[i]), reopen or close each limited queue, and
-- reopen any queue left closed by a limit since removed (max_pending NULL).
-- Run after lock_queue_count and the count, in their transaction.
UPDATE {{schema}}.job_types t SET
    pending = coalesce(c.pending, 0),
    counted_at = now(),
    accepting = t.max_pending IS NULL OR coalesce(c.pending, 0) < t.max_pending
FROM (
    SELECT k.type, p.pending
    FROM {{schema}}.job_types k
    LEFT JOIN unnest($1::text[], $2::integer[]) AS p(type, pending) ON p.type = k.type
    WHERE k.max_pending IS NOT NULL OR NOT k.accepting
) AS c
WHERE t.type = c.type;

-- name: recent_starts
-- Seconds ago of each start within the last $2 seconds of types $1 (to seed a new
-- leader's rate-limit windows); each branch reads a partial index.
SELECT type, extract(epoch FROM now() - started_at)::double precision AS ago
FROM {{schema}}.jobs
WHERE status = 'processing' AND type = ANY($1::text[])
  AND started_at > now() - make_interval(secs => $2)
UNION ALL
SELECT type, extract(epoch FROM now() - started_at)::double precision
FROM {{schema}}.jobs
WHERE status IN ('completed', 'failed', 'cancelled') AND type = ANY($1::text[])
  AND finished_at > now() - make_interval(secs => $2)
  AND started_at > now() - make_interval(secs => $2)
UNION ALL
SELECT type, extract(epoch FROM now() - started_at)::double precision
FROM {{schema}}.jobs
WHERE status = 'pending' AND type = ANY($1::text[])
  AND started_at > now() - make_interval(secs => $2);

-- name: enqueue_scheduled
-- Enqueue schedule $1's instant $2 as a job of type $3 (payload $4, priority $5,
-- max_attempts $6), unless that instant already ran: the schedule_runs primary key
-- makes this exactly once across leaders. Returns the job id, or nothing.
WITH new_id AS (
    SELECT nextval(pg_get_serial_sequence('{{schema}}.jobs', 'id')) AS id
), run AS (
    INSERT INTO {{schema}}.schedule_runs (schedule, scheduled_for, job_id)
    SELECT $1, $2, new_id.id FROM new_id
    ON CONFLICT DO NOTHING
    RETURNING schedule, scheduled_for, job_id
)
INSERT INTO {{schema}}.jobs (id, type, payload, priority, max_attempts, run_at, unique_key)
SELECT run.job_id, $3, $4::text::jsonb, $5, $6, run.scheduled_for,
       'periodic:' || run.schedule || ':' || to_char(run.scheduled_for AT TIME ZONE 'UTC',
                                                      'YYYY-MM-DD"T"HH24:MI:SS"Z"')
FROM run
-- An active job already holds this instant's key (its run was forgotten, or someone
-- enqueued it by hand): that job is the instant's run.
ON CONFLICT (type, unique_key) WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing')
DO NOTHING
RETURNING id;

-- name: last_scheduled
-- The latest instant each schedule ($1) was enqueued for.
SELECT schedule, max(scheduled_for) AS last
FROM {{schema}}.schedule_runs
WHERE schedule = ANY($1::text[])
GROUP BY schedule;

-- name: record_schedule
-- Show a schedule and its next run (for `dispatcher status` and /status).
INSERT INTO {{schema}}.schedules (name, cron, timezone, type, next_run_at, last_run_for)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (name) DO UPDATE SET
    cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, type = EXCLUDED.type,
    next_run_at = EXCLUDED.next_run_at,
    last_run_for = greatest(schedules.last_run_for, EXCLUDED.last_run_for),
    updated_at = now();

-- name: list_schedules
-- Every registered schedule with its next run.
SELECT name, cron, timezone, type, next_run_at, last_run_for, updated_at
FROM {{schema}}.schedules
ORDER BY name;

-- name: prune_schedule_runs
-- Forget instants older than $1 seconds, but never a schedule's latest: a new leader
-- reads it to know where the schedule stands, whatever its backfill (a weekly job
-- with a month of backfill was enqueued again at each leader change once its latest
-- instant was pruned).
DELETE FROM {{schema}}.schedule_runs r
WHERE r.scheduled_for < now() - make_interval(secs => $1)
  AND r.scheduled_for < (
      SELECT max(m.scheduled_for) FROM {{schema}}.schedule_runs m WHERE m.schedule = r.schedule
  );

-- name: missing_runtime_privileges
-- What the connected role lacks of what a replica needs on schema $1 (readiness),
-- one row each, e.g. "SELECT on job_types"; none when it has everything
-- (sql/roles.sql grants it). Tables are looked up only with USAGE on the schema.
WITH needed(object, privilege) AS (
    VALUES ('jobs', 'SELECT'), ('jobs', 'INSERT'), ('jobs', 'UPDATE'), ('jobs', 'DELETE'),
           ('leader', 'SELECT'), ('leader', 'UPDATE'),
           ('replicas', 'SELECT'), ('replicas', 'INSERT'), ('replicas', 'UPDATE'),
           ('replicas', 'DELETE'),
           ('job_types', 'SELECT'), ('job_types', 'INSERT'), ('job_types', 'UPDATE'),
           ('schedules', 'SELECT'), ('schedules', 'INSERT'), ('schedules', 'UPDATE'),
           ('schedule_runs', 'SELECT'), ('schedule_runs', 'INSERT'),
           ('schedule_runs', 'DELETE'),
           ('queue_samples', 'SELECT'), ('queue_samples', 'INSERT'),
           ('queue_samples', 'DELETE'),
           ('job_dependencies', 'SELECT'),
           ('migrations', 'SELECT')
), usage AS (
    SELECT has_schema_privilege($1::text, 'USAGE') AS granted
)
SELECT format('USAGE on schema %s', $1::text) AS missing FROM usage WHERE NOT granted
UNION ALL
SELECT format('%s on %s', n.privilege, n.object)
FROM needed n, usage
WHERE CASE WHEN usage.granted
           THEN NOT has_table_privilege(format('%I.%I', $1::text, n.object), n.privilege)
           ELSE false END
UNION ALL
SELECT 'USAGE on jobs_id_seq'
FROM usage
WHERE CASE WHEN usage.granted
           THEN NOT has_sequence_privilege(format('%I.jobs_id_seq', $1::text), 'USAGE')
           ELSE false END;

-- name: database_now
-- The database clock.
SELECT now();

-- ---------------------------------------------------------------------------------
-- Worker mode (--mode all): every replica claims
-- ---------------------------------------------------------------------------------

-- name: lock_types
-- Serialize claimers of each limited type $1 (in a fixed order: no deadlocks) until
-- the end of the transaction; the lock key is "dispatcher:type:<schema>:<type>"
-- with $2 the schema name.
SELECT count(pg_advisory_xact_lock(hashtextextended('dispatcher:type:' || $2 || ':' || t, 0)))
FROM (SELECT t FROM unnest($1::text[]) AS t ORDER BY t) AS ordered;


-- name: testing_due_job_ids
-- dispatcher.testing's drain(recursive=False): the ids of the jobs of types $1 due now,
-- the only ones it runs.
SELECT id FROM {{schema}}.jobs
WHERE status = 'pending' AND run_at <= now() AND type = ANY($1::text[]);

-- name: testing_make_scheduled_due
-- dispatcher.testing's drain(with_scheduled=True): pending jobs of types $1 due later (a
-- future run_at, a retry's backoff, a snooze) become due now.
UPDATE {{schema}}.jobs SET run_at = now()
WHERE status = 'pending' AND run_at > now() AND type = ANY($1::text[]);

-- name: testing_reset
-- dispatcher.testing's pytest fixtures, before each test: no jobs (ids start at 1
-- again), dependencies, queue samples, type controls or schedules left from before.
TRUNCATE {{schema}}.jobs, {{schema}}.job_dependencies, {{schema}}.waiting_jobs,
         {{schema}}.queue_samples, {{schema}}.job_types, {{schema}}.schedules,
         {{schema}}.schedule_runs
RESTART IDENTITY;
