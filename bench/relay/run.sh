#!/usr/bin/env bash
# bench/relay: setup, release builds, the Python client for the pipe, then the benchmark.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
(cd saiki_pg && cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null)
cargo build --release -q -p saiki-relay
python3 -m pip install --quiet 'confluent-kafka==2.16.1'
exec python3 bench/relay/run.py "$@"
