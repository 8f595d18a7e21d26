#!/usr/bin/env bash
# Idempotent machine setup for Saiki on Debian 12, run as root.
# Installs the Debian packages, cargo-pgrx 0.18.0 (initialised against Debian's PostgreSQL 15)
# the tansu Kafka-protocol broker, and PyIceberg, moto's S3 server and DuckDB (in /opt/saiki-py). Safe to run again: each step checks before it acts.
#   SAIKI_SKIP_TANSU=1  skip the broker (only the plugin tests run without it)
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh must run as root (it installs Debian packages)" >&2
  exit 1
fi

export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

PKGS=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 libclang-dev clang sudo
      postgresql-15-wal2json postgresql-15-decoderbufs pkg-config libssl-dev cmake
      python3 python3-venv procps curl docker-compose stunnel4)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian's postgresql-common would create and start a default cluster on 5432; we never use it.
  mkdir -p /etc/postgresql-common
  if ! grep -qs '^create_main_cluster *= *false' /etc/postgresql-common/createcluster.conf; then
    echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
  fi
  apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold "${missing[@]}"
fi

if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.0'; then
  log "installing cargo-pgrx 0.18.0"
  cargo install cargo-pgrx --version 0.18.0 --locked
fi
if ! grep -qs "pg15 *= *\"$PG_CONFIG\"" "$HOME/.pgrx/config.toml"; then
  log "cargo pgrx init --pg15 $PG_CONFIG"
  cargo pgrx init --pg15 "$PG_CONFIG"
fi

if [ "${SAIKI_SKIP_TANSU:-0}" != 1 ]; then
  if ! tansu --version 2>/dev/null | grep -q '0\.6\.0'; then
    log "installing tansu 0.6.0 (Kafka-protocol broker; a long build)"
    cargo install tansu --version 0.6.0 --locked --features libsql,dynostore
  fi
fi
# PyIceberg (PyPI), the reader that is not ours for the lake's Iceberg tables (tests, demo),
# in a venv of Debian's Python with the SQL catalog's PostgreSQL driver and pyarrow.
PYICEBERG="pyiceberg[sql-postgres,pyarrow]==0.10.0"
if ! /opt/saiki-py/bin/python -c 'import pyiceberg, pyarrow, psycopg2' 2>/dev/null; then
  log "installing PyIceberg 0.10.0 into /opt/saiki-py"
  /usr/bin/python3 -m venv /opt/saiki-py
  /opt/saiki-py/bin/pip install --quiet "$PYICEBERG"
fi
# moto's S3 server (PyPI, maintained by getmoto): the S3-compatible store of the lake's s3://
# warehouse test (PyIceberg reads the tables back through pyarrow's S3); DuckDB for the
# documented queries over the change log. Both in the same venv.
if ! /opt/saiki-py/bin/python -c 'import moto.server, boto3, duckdb' 2>/dev/null; then
  log "installing moto's S3 server 5.2.6 and DuckDB 2.0.1 into /opt/saiki-py"
  /opt/saiki-py/bin/pip install --quiet "moto[server]==5.2.6" "duckdb==2.0.1"
fi
log "setup complete"
