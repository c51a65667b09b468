#!/usr/bin/env bash
# Load test of the federated server: 1,000 concurrent simulated clients upload to one round
# over loopback, on SQLite and (when EDGETUNE_POSTGRES_URL is set) on PostgreSQL; prints
# uploads per second and p50 / p99 acknowledgement latency. See BENCHMARKS.md.
# Usage: scripts/load_server.sh [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
cargo run --release -q -p edgetune-server --example load -- --clients "$n"
if [ -n "${EDGETUNE_POSTGRES_URL:-}" ]; then
    cargo run --release -q -p edgetune-server --example load -- --clients "$n" --postgres "$EDGETUNE_POSTGRES_URL"
fi
