#!/usr/bin/env bash
# What the relay, e2e and snapshot benchmarks need before they run, sourced by their run.sh:
# the machine setup, the extension and the relay in release builds, and confluent-kafka for
# the peers' Python producer.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
(cd saiki_pg && cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null)
cargo build --release -q -p saiki-relay
python3 -m pip install --quiet 'confluent-kafka==2.16.1'
