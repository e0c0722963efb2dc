#!/usr/bin/env bash
# Runs the Kotlin SDK's build and test suite against a real presence-server.
#
#   PRESENCE_SERVER_BIN          the server binary; unset: `cargo build -p presence-server` and
#                                <repo>/target/debug/presence-server
#   PRESENCE_TEST_REDIS_CLUSTER  Redis Cluster seed URLs for the server-restart test; unset: a
#                                cluster is started on ports 7200-7205 and stopped afterwards
#
# The first run downloads Maven (through the wrapper) and the build's artifacts.
set -euo pipefail

sdk=$(cd "$(dirname "$0")/.." && pwd)
repo=$(cd "$sdk/.." && pwd)

command -v java >/dev/null || { echo "java is missing: install a JDK (17 or newer)" >&2; exit 1; }

if [ -z "${PRESENCE_SERVER_BIN:-}" ]; then
  (cd "$repo" && cargo build -p presence-server)
  PRESENCE_SERVER_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/presence-server"
fi

if [ -z "${PRESENCE_TEST_REDIS_CLUSTER:-}" ]; then
  export REDIS_CLUSTER_BASE_PORT=7200
  trap '"$repo/e2e/scripts/redis-cluster.sh" stop' EXIT
  PRESENCE_TEST_REDIS_CLUSTER=$("$repo/e2e/scripts/redis-cluster.sh" start | tail -1)
  export PRESENCE_TEST_REDIS_CLUSTER
fi

cd "$sdk"
PRESENCE_SERVER_BIN="$PRESENCE_SERVER_BIN" ./mvnw -B --no-transfer-progress verify
