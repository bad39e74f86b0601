-- Least-privilege roles for one dispatcher schema. Print it for your schema and role
-- names with `dispatcher roles` (see `dispatcher roles --help`), and run it after
-- `dispatcher migrate`, as the role that migrated (it owns the tables) if it may
-- create roles, else as a superuser:
--
--     dispatcher roles | psql "$ADMIN_DSN" -v ON_ERROR_STOP=1
--
-- It creates the roles that do not exist yet (LOGIN, no password: set one with
-- ALTER ROLE ... PASSWORD, or use your platform's authentication), and grants each
-- exactly what it needs. Running it again is harmless. A later migration that adds a
-- table says so in its notes; run the script again after it.
--
-- {{schema}}, {{runtime}}, {{producer}} and {{readonly}} are replaced by quoted
-- identifiers, {{*_text}} by the same names as string literals; nothing else.

DO $roles$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY[{{runtime_text}}, {{producer_text}}, {{readonly_text}}]
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
            EXECUTE format('CREATE ROLE %I LOGIN', role_name);
        END IF;
    END LOOP;
END
$roles$;

GRANT USAGE ON SCHEMA {{schema}} TO {{runtime}}, {{producer}}, {{readonly}};

-- The runtime (replicas, and the HTTP API and CLI that run as them): claim, complete,
-- heartbeat, enqueue, cancel and retry jobs; delete finished ones past their retention
-- (the reaper); lead; register replicas; per-type controls (pause, max_pending, the
-- backpressure counts); periodic schedules; check the schema.
GRANT SELECT, INSERT, UPDATE, DELETE ON {{schema}}.jobs TO {{runtime}};
GRANT SELECT, UPDATE ON {{schema}}.leader TO {{runtime}};
GRANT SELECT, INSERT, UPDATE, DELETE ON {{schema}}.replicas TO {{runtime}};
GRANT SELECT, INSERT, UPDATE ON {{schema}}.job_types TO {{runtime}};
GRANT SELECT, INSERT, UPDATE ON {{schema}}.schedules TO {{runtime}};
GRANT SELECT, INSERT, DELETE ON {{schema}}.schedule_runs TO {{runtime}};
GRANT SELECT, INSERT, DELETE ON {{schema}}.queue_samples TO {{runtime}};
-- Dependency edges (0013): written by SECURITY DEFINER triggers; the reaper and the
-- dashboard read them.
GRANT SELECT ON {{schema}}.job_dependencies TO {{runtime}};
GRANT SELECT ON {{schema}}.migrations TO {{runtime}};
GRANT USAGE ON SEQUENCE {{schema}}.jobs_id_seq TO {{runtime}};

-- Producers (your services): enqueue and read jobs back (RETURNING *, get, status
-- polls). An enqueue reads job_types (is the type's queue open, max_pending?);
-- enqueue_many and enqueue_graph reserve ids with nextval() first. Jobs with
-- dependencies need nothing more: the triggers that settle them run as the owner of
-- the schema's tables (0013). Cancel and retry need
-- GRANT UPDATE ON {{schema}}.jobs as well, if your services should do them.
GRANT SELECT, INSERT ON {{schema}}.jobs TO {{producer}};
GRANT SELECT ON {{schema}}.job_types TO {{producer}};
GRANT USAGE ON SEQUENCE {{schema}}.jobs_id_seq TO {{producer}};

-- Read-only (dashboards, `dispatcher status`, `dispatcher jobs list` for people who
-- must not change anything).
GRANT SELECT ON ALL TABLES IN SCHEMA {{schema}} TO {{readonly}};
