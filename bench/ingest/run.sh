#!/usr/bin/env bash
# bench/ingest: setup and release builds (bench/prepare.sh), the load generator and the bare
# producer, then the benchmark.
set -euo pipefail
source "$(dirname "$0")/../prepare.sh"
cargo build --release -q -p saiki-relay --example ingest_load --example bare_producer
exec python3 bench/ingest/run.py "$@"
