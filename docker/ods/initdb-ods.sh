#!/bin/bash
# First start of the ODS container: a least-privilege role for the sink. It needs CREATE on
# the database (it creates the schemas ods and saiki_sink and owns what is in them) and
# nothing else (docs/operations.md, "Security"). Analysts get read access to schema ods.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v pw="$SAIKI_SINK_PASSWORD" -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE saiki_sink LOGIN PASSWORD :'pw';
GRANT CONNECT, CREATE ON DATABASE :"db" TO saiki_sink;
CREATE ROLE ods_reader NOLOGIN;
GRANT CONNECT ON DATABASE :"db" TO ods_reader;
SQL
