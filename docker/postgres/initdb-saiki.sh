#!/bin/bash
# First start of a saiki/postgres container: the extension in the application database, and a
# least-privilege role for the source relay when SAIKI_RELAY_PASSWORD is set
# (docs/operations.md, "Security").
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE EXTENSION IF NOT EXISTS saiki;
SQL
if [ -n "${SAIKI_RELAY_PASSWORD:-}" ]; then
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
       -v pw="$SAIKI_RELAY_PASSWORD" -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE saiki_relay LOGIN REPLICATION PASSWORD :'pw';
GRANT CONNECT ON DATABASE :"db" TO saiki_relay;
GRANT USAGE ON SCHEMA saiki TO saiki_relay;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA saiki TO saiki_relay;
-- Snapshots (issue #6): progress in saiki.snapshots, and reading the captured tables.
GRANT SELECT, INSERT, UPDATE ON saiki.snapshots, saiki.slot_origins TO saiki_relay;
-- What `saiki-relay status` reads: snapshot progress and resyncs after a failover (issue #14).
GRANT SELECT ON saiki.snapshot_progress, saiki.resyncs TO saiki_relay;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO saiki_relay;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO saiki_relay;
-- A logical replication connection (replication=database) is matched by pg_hba.conf lines of
-- its database, not by "replication" lines; the image's "host all all all scram-sha-256"
-- admits it. Table privileges are not needed: decoding reads the WAL, not the tables.
SQL
fi
