#!/usr/bin/env bash
# bench/snapshot: setup and release builds (bench/prepare.sh), then the benchmark.
set -euo pipefail
source "$(dirname "$0")/../prepare.sh"
exec python3 bench/snapshot/run.py "$@"
