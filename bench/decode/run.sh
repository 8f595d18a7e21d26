#!/usr/bin/env bash
# bench/decode: set up, install the release build of the extension, run the benchmark.
# Not a test: it prints figures and ratios; pass --runs/--wide/--txns/--scale through.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
SAIKI_SKIP_TANSU=1 bash scripts/setup.sh
(cd saiki_pg && cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null)
exec python3 bench/decode/run.py "$@"
