-- The database roles of esms-callback-poller: an OWNER that the migrations run as, and the
-- daemon's APP role, which can only read and write rows. docs/deploy.md says where each is used.
--
-- Run it with psql, as a superuser (or a managed Postgres's admin role), connected to the
-- daemon's database, before or after the first migration. Running it again changes nothing
-- that is already right, so it also upgrades a database whose tables the superuser created:
--
--   psql -v ON_ERROR_STOP=1 -d esms -f deploy/postgres-roles.sql
--   psql -d esms -c '\password esms_owner'      # then the same for esms_app
--
-- psql variables (-v name=value), all optional:
--   owner_role       owns the schema; `alembic upgrade head` connects as it (default esms_owner)
--   app_role         celery worker, beat, the receiver and esms-poller connect as it
--                    (default esms_app)
--   owner_password, app_password
--                    set the roles' passwords here instead of with psql's \password (which sends
--                    only a hash; a password in a statement reaches the server's log when
--                    log_statement is ddl or all)
--
-- What the app role may do, in schema public: SELECT, INSERT, UPDATE and DELETE on every table and
-- view, use their sequences, and read alembic_version (the start-up schema check, worker/schema.py).
-- It cannot create, alter, drop or truncate anything, nor write alembic_version. Tables and
-- sequences that later migrations create are granted the same by default privileges: nothing to
-- re-run after an upgrade.
--
-- The database is the daemon's: every table, view and sequence of its schema public becomes the
-- owner's. A sending system inserting messages gets its own role with
-- `GRANT SELECT, INSERT ON messages TO sender;` (tests/integration/test_db_roles.py runs all this).

\set ON_ERROR_STOP on
\if :{?owner_role}
\else
  \set owner_role esms_owner
\endif
\if :{?app_role}
\else
  \set app_role esms_app
\endif

-- The roles, if they do not exist yet. LOGIN, no other attribute: neither may create roles or
-- databases, and neither bypasses row security.
SELECT format('CREATE ROLE %I LOGIN', name)
FROM (VALUES (:'owner_role'), (:'app_role')) AS wanted(name)
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name)
\gexec

\if :{?owner_password}
  SELECT format('ALTER ROLE %I PASSWORD %L', :'owner_role', :'owner_password') \gexec
\endif
\if :{?app_password}
  SELECT format('ALTER ROLE %I PASSWORD %L', :'app_role', :'app_password') \gexec
\endif

-- A managed Postgres's admin role is no superuser: it needs to be a member of the owner to hand
-- it the tables and set its default privileges below.
SELECT format('GRANT %I TO %I', :'owner_role', current_user)
WHERE NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
  AND NOT pg_has_role(current_user, :'owner_role', 'MEMBER')
\gexec

SELECT format('GRANT CONNECT ON DATABASE %I TO %I, %I',
              current_database(), :'owner_role', :'app_role')
\gexec

-- Only the owner creates objects (Postgres 15 already revokes CREATE from PUBLIC; older
-- servers do not).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner_role";
GRANT USAGE ON SCHEMA public TO :"app_role";

-- Objects an earlier migration made as another role (the superuser) become the owner's, or the
-- next migration could not alter them. Sequences of identity and serial columns follow their
-- table.
SELECT format('ALTER %s %I.%I OWNER TO %I',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
              n.nspname, c.relname, :'owner_role')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = 'public'
  AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
  AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'owner_role')
  AND NOT EXISTS (
      SELECT FROM pg_depend AS d
      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
ORDER BY c.relkind <> 'r', c.relname
\gexec

-- Alembic's version table, made by the owner now if no migration made it yet, so that it is
-- the one table the app role only reads (it is granted like every table below, then not).
SET ROLE :"owner_role";
CREATE TABLE IF NOT EXISTS public.alembic_version (
    version_num varchar(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
RESET ROLE;

-- Rows only, on what exists now...
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app_role";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"app_role";
-- ...and on what the owner creates later (the migrations of the next releases).
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"app_role";

REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.alembic_version FROM :"app_role";
