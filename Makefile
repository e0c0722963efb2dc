# Presence: the entry points. `make run` to try it, `make test` for everything.
# Faster loops: `make test-rust` (embedded backends only), `make services-up`
# then `make test-backends`, and `make services-down`.

SHELL := /bin/bash
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
SERVER := $(TARGET_DIR)/release/presence-server

.PHONY: run build test test-rust test-ts test-kotlin demo test-backends test-gateway-full services-up services-down bench bench-full soak lint fmt help

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

run: ## build and start the server on the embedded backends (no Redis, no Scylla)
	$(CARGO) build --release -p presence-server -p presence-sdk
	@e2e/scripts/run-banner.sh
	$(SERVER) --dev

build: ## build everything (debug)
	$(CARGO) build --workspace --all-targets

test: ## install what is missing, start Redis Cluster and Cassandra, run every test, stop them
	e2e/scripts/test-all.sh

test-rust: ## Rust tests on the embedded backends only (no services needed)
	$(CARGO) test --workspace

test-ts: ## TypeScript SDK suites (unit, Node, Chromium) against a real server; installs npm packages and Chromium if missing
	$(if $(PRESENCE_SERVER_BIN),,$(CARGO) build -p presence-server)
	PRESENCE_SERVER_BIN=$${PRESENCE_SERVER_BIN:-$(abspath $(TARGET_DIR))/debug/presence-server} sdk-ts/scripts/test.sh

demo: ## the web demo: a server on the embedded backends and a live board at http://localhost:8080/?user=alice
	$(if $(PRESENCE_SERVER_BIN),,$(CARGO) build -p presence-server)
	cd sdk-ts && npm ci --no-audit --no-fund && npm run build:test
	PRESENCE_SERVER_BIN=$${PRESENCE_SERVER_BIN:-$(abspath $(TARGET_DIR))/debug/presence-server} node sdk-ts/.build/demo/serve.js

test-kotlin: ## Kotlin SDK build and tests against a real server (builds it unless PRESENCE_SERVER_BIN is set)
	sdk-kotlin/scripts/test.sh

test-backends: ## Rust tests against already running services (see services-up)
	PRESENCE_TEST_REDIS_CLUSTER=$$(e2e/scripts/redis-cluster.sh urls) \
	PRESENCE_TEST_SCYLLA_NODES=$$(e2e/scripts/cassandra.sh nodes) \
	PRESENCE_REQUIRE_BACKENDS=1 $(CARGO) test --workspace

test-gateway-full: ## the gateway deploy test at full size: 2,000 sessions, 200 watchers, release build (~10 min cold, ~3 min warm); starts Redis Cluster, leaves it up
	e2e/scripts/redis-cluster.sh start >/dev/null
	e2e/scripts/gateway.sh install
	PRESENCE_TEST_REDIS_CLUSTER=$$(e2e/scripts/redis-cluster.sh urls) PRESENCE_REQUIRE_BACKENDS=1 \
	PRESENCE_GATEWAY_SESSIONS=2000 PRESENCE_GATEWAY_WATCHERS=200 \
	$(CARGO) test --release -p presence-e2e --test gateway a_rolling_restart -- --nocapture

services-up: ## start a local Redis Cluster and Cassandra for tests
	e2e/scripts/redis-cluster.sh start
	e2e/scripts/cassandra.sh start

services-down: ## stop them
	-e2e/scripts/redis-cluster.sh stop
	-e2e/scripts/cassandra.sh stop

bench: ## quick benchmark (one node, embedded backends, a few minutes); see BENCHMARKS.md
	e2e/bench/run.sh quick

bench-full: ## every benchmark profile, incl. 100k connections on Redis Cluster (about an hour)
	e2e/bench/run.sh full

soak: ## chaos soak: 20k sessions killed/replaced/logged out at random on 2 nodes + Redis Cluster, one node kill -9'd; 0 ghosts (30 min; SOAK_DURATION=10m to shorten)
	e2e/bench/run.sh soak

lint: ## formatting and clippy
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
