#!/usr/bin/env bash
# bench/e2e: setup, the extension and the relay in release builds, then the benchmark.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
(cd saiki_pg && cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null)
cargo build --release -q -p saiki-relay
exec python3 bench/e2e/run.py "$@"
