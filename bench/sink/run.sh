#!/usr/bin/env bash
# bench/sink: setup, release builds of the relay and the bench helper, then the benchmark.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
cargo build --release -q -p saiki-relay --bin saiki-relay --example sink_bench
exec python3 bench/sink/run.py "$@"
