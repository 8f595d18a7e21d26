#!/bin/bash
# First start of the ODS container: least-privilege roles for the sink and the event API. Each
# needs CREATE on the database (the sink creates the schemas ods and saiki_sink, the event API
# the schema saiki_ingest, and each owns what is in them) and nothing else
# (docs/operations.md, "Security"). The sink and the lake read the event API's event types
# through saiki_registry_reader. The lake relay keeps the Iceberg SQL catalog's two tables
# (iceberg_tables, iceberg_namespace_properties) in the public schema. Analysts get read access
# to schema ods.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v pw="$SAIKI_SINK_PASSWORD" -v ipw="$SAIKI_INGEST_PASSWORD" -v lpw="$SAIKI_LAKE_PASSWORD" \
     -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE saiki_sink LOGIN PASSWORD :'pw';
GRANT CONNECT, CREATE ON DATABASE :"db" TO saiki_sink;
CREATE ROLE saiki_ingest LOGIN PASSWORD :'ipw';
GRANT CONNECT, CREATE ON DATABASE :"db" TO saiki_ingest;
CREATE ROLE saiki_lake LOGIN PASSWORD :'lpw';
GRANT CONNECT ON DATABASE :"db" TO saiki_lake;
GRANT CREATE ON SCHEMA public TO saiki_lake;
-- The event API grants this role read access to its event types and schemas (not its
-- tokens) when it creates them; the sink and the lake need it to keep events.
CREATE ROLE saiki_registry_reader NOLOGIN;
GRANT saiki_registry_reader TO saiki_sink;
GRANT saiki_registry_reader TO saiki_lake;
CREATE ROLE ods_reader NOLOGIN;
GRANT CONNECT ON DATABASE :"db" TO ods_reader;
SQL
