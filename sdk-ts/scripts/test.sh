#!/usr/bin/env bash
# `make test-ts`: every TypeScript suite (unit, Node integration, browser)
# against a real presence-server. Installs what is missing (npm packages,
# Debian's Chromium), starts a Redis Cluster for the restart test unless
# PRESENCE_TEST_REDIS_CLUSTER names one, and stops what it started.
#
# Environment:
#   PRESENCE_SERVER_BIN          server binary (default <repo>/target/debug/presence-server)
#   PRESENCE_TEST_REDIS_CLUSTER  Redis Cluster seed URLs (default: start one on ports 7100-7105)
#   PRESENCE_CHROMIUM            browser binary (default chromium-headless-shell, else chromium)
set -euo pipefail

sdk=$(cd "$(dirname "$0")/.." && pwd)
repo=$(cd "$sdk/.." && pwd)
export PRESENCE_SERVER_BIN=${PRESENCE_SERVER_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/presence-server}
[ -x "$PRESENCE_SERVER_BIN" ] || { echo "no server binary at $PRESENCE_SERVER_BIN (cargo build -p presence-server)" >&2; exit 1; }

if ! command -v chromium >/dev/null && ! command -v chromium-headless-shell >/dev/null && [ -z "${PRESENCE_CHROMIUM:-}" ]; then
  echo "installing chromium (apt)" >&2
  apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }
fi

if [ -z "${PRESENCE_TEST_REDIS_CLUSTER:-}" ]; then
  export REDIS_CLUSTER_BASE_PORT=7100
  trap '"$repo/e2e/scripts/redis-cluster.sh" stop || true' EXIT
  PRESENCE_TEST_REDIS_CLUSTER=$("$repo/e2e/scripts/redis-cluster.sh" start | tail -1)
  export PRESENCE_TEST_REDIS_CLUSTER
fi

cd "$sdk"
npm ci --no-audit --no-fund
npm test
npm run --silent size
