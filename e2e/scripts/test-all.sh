#!/usr/bin/env bash
# `make test`: installs what is missing, starts the real services the tests
# need (a 6-node Redis Cluster and a Cassandra node standing in for Scylla),
# runs every test of every language against them, and stops what it started,
# whatever happens. Exits non-zero on any failure.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"
logs="$repo/.run/logs"
mkdir -p "$logs"

step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

stop_services() {
  step "stopping services"
  e2e/scripts/redis-cluster.sh stop || true
  e2e/scripts/cassandra.sh stop || true
}
trap stop_services EXIT

step "checking toolchains"
command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }
cargo --version

step "installing services (Redis, Cassandra, nginx) if missing"
e2e/scripts/redis-cluster.sh install
e2e/scripts/cassandra.sh install
# nginx for the gateway tests (e2e/tests/gateway.rs), each of which starts
# and stops its own gateway through e2e/scripts/gateway.sh.
e2e/scripts/gateway.sh install

step "deployment artefacts (Dockerfile, Kubernetes, systemd, nginx)"
deploy/check.sh

# Cassandra takes the longest to come up: start it in the background while
# the Redis Cluster starts and the tests compile.
step "starting Cassandra (background) and Redis Cluster"
e2e/scripts/cassandra.sh start >"$logs/cassandra-start.log" 2>&1 &
cassandra_pid=$!
redis_urls=$(e2e/scripts/redis-cluster.sh start | tail -1)

step "building tests"
cargo test --workspace --no-run

if ! wait "$cassandra_pid"; then
  cat "$logs/cassandra-start.log" >&2
  echo "Cassandra did not start" >&2
  exit 1
fi
scylla_nodes=$(tail -1 "$logs/cassandra-start.log")

step "Rust tests (embedded, Redis Cluster $redis_urls, CQL $scylla_nodes)"
PRESENCE_TEST_REDIS_CLUSTER="$redis_urls" \
PRESENCE_TEST_SCYLLA_NODES="$scylla_nodes" \
PRESENCE_REQUIRE_BACKENDS=1 \
  cargo test --workspace

# The server the SDK suites start, from wherever cargo builds.
server_bin="${CARGO_TARGET_DIR:-$repo/target}/debug/presence-server"

step "TypeScript SDK tests (unit, Node, Chromium; Redis Cluster $redis_urls)"
command -v npm >/dev/null || { echo "npm is missing: install Node.js 20 first" >&2; exit 1; }
cargo build -p presence-server
PRESENCE_SERVER_BIN="$server_bin" \
PRESENCE_TEST_REDIS_CLUSTER="$redis_urls" \
  sdk-ts/scripts/test.sh

# Downloads Maven and its artifacts on a cold run.
step "Kotlin SDK tests (Redis Cluster $redis_urls)"
PRESENCE_SERVER_BIN="$server_bin" \
PRESENCE_TEST_REDIS_CLUSTER="$redis_urls" \
  sdk-kotlin/scripts/test.sh

step "all tests passed"
