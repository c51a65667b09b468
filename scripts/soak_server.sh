#!/usr/bin/env bash
# Kills the federated server with SIGKILL many times during uploads and round closes and
# checks that nothing acknowledged is lost (server/tests/kill.rs with more kills).
# Usage: scripts/soak_server.sh [KILLS]   (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
EDGETUNE_KILLS="${1:-200}" cargo test --release -p edgetune-server --test kill -- --nocapture
