#!/usr/bin/env bash
# bench/relay: setup and release builds (bench/prepare.sh), then the benchmark.
set -euo pipefail
source "$(dirname "$0")/../prepare.sh"
exec python3 bench/relay/run.py "$@"
