#!/usr/bin/env bash
# bench/lake: setup and release builds (bench/prepare.sh builds the relay), bench/sink's record
# generator, confluent-kafka for the reference writer in PyIceberg's venv, then the benchmark.
set -euo pipefail
source "$(dirname "$0")/../prepare.sh"
cargo build --release -q -p saiki-relay --example sink_bench
/opt/saiki-py/bin/pip install --quiet 'confluent-kafka==2.16.1'
exec /opt/saiki-py/bin/python bench/lake/run.py "$@"
