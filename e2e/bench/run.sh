#!/usr/bin/env bash
# Benchmark profiles of the presence server, driven by the load generator
# (e2e/src/loadgen; release/loadgen under $CARGO_TARGET_DIR or target/). Each
# profile runs RUNS times (fresh server processes every run) and prints the
# medians; the per-run reports, the medians (JSON and Markdown) and the
# machine's description land in $BENCH_DIR/<profile>/<timestamp>/.
#
#   e2e/bench/run.sh quick        `make bench`: one node, embedded backends, a few minutes
#   e2e/bench/run.sh mux-100k     one node: 100k sessions over 10k connections,
#                                 GetPresence at 5k req/s on top of their heartbeats
#   e2e/bench/run.sh beats-25k    one node: 100k sessions beating every 4 s (25k/s)
#   e2e/bench/run.sh churn        one node: 1k status changes/s, 20 watchers per changing user
#   e2e/bench/run.sh churn-redis  the churn on 2 nodes sharing a Redis Cluster
#   e2e/bench/run.sh feed         the change feed: 2 nodes on a Redis Cluster, status
#                                 churn at each of FEED_RATES changes/s while 4
#                                 consumers of one group (ChangeFeed.Consume) ack
#                                 every batch; lag, duplicates, missing changes,
#                                 Redis round trips and memory per logged change
#   e2e/bench/run.sh redis-100k   100k real TCP connections: 7 nodes on one Redis
#                                 Cluster, 6 generator processes from 127.0.0.2-7
#   e2e/bench/run.sh full         `make bench-full`: all of the above
#   e2e/bench/run.sh soak         `make soak`: the chaos soak (not part of `full`):
#                                 2 nodes on a Redis Cluster, SOAK_SESSIONS clients
#                                 killed, reconnected, replaced and logged out at
#                                 random for SOAK_DURATION, one node kill -9'd and
#                                 restarted; at the end 0 ghosts and 0 missing
#   e2e/bench/run.sh smoke        seconds: checks the pipeline end to end
#
# Environment:
#   RUNS           runs per profile (default 3; medians need at least 3)
#   BENCH_DIR      output root (default <repo>/.run/bench)
#   BENCH_PORT     first server port (default 50100)
#   SERVER_FLAGS   extra presence-server flags (e.g. to try a setting)
#   LOADGEN_FLAGS  extra `loadgen run` flags
#   NO_BUILD=1     use the release binaries as they are
#   SERVER_BIN     the server binary (default $CARGO_TARGET_DIR, or target,
#                  /release/presence-server; the generator is found there too)
#   COMPARE        "name=/path/to/presence-server ..." to compare builds: every
#                  run round runs each of them in turn (so machine load hits
#                  them alike), and each gets its own medians
#   FEED_RATES     change rates of the feed profile (default "1000 10000")
#
# The soak (one run; RUNS does not apply):
#   SOAK_DURATION    chaos duration (default 30m)
#   SOAK_SESSIONS    users, one device session each (default 20000)
#   SOAK_CHAOS_RATE  chaos actions per second (default 50)
#   SOAK_KILL_AT     seconds into the chaos when node 1 is kill -9'd (default 1/3;
#                    none: no kill, so each node keeps its sessions throughout)
#   SOAK_DOWN        how long it stays down before its restart (default 15s)
#   SOAK_PORT        first node port (default 55000; metrics on +100)
#   SOAK_REDIS_PORT  Redis Cluster base port (default 7500)
#   SOAK_TIMERS      the nodes' timers (default: lease 6s, beats every 2s,
#                    grace 1s, node lease 3s, sweep 500ms)
#
# This machine caps a process at 20,000 open files: one process holds at most
# ~19k sockets, so 100k connections take several server and generator
# processes, and each generator binds its own 127.0.0.x source address.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"

RUNS=${RUNS:-3}
BENCH_DIR=${BENCH_DIR:-$repo/.run/bench}
BENCH_PORT=${BENCH_PORT:-50100}
SERVER_FLAGS=${SERVER_FLAGS:-}
LOADGEN_FLAGS=${LOADGEN_FLAGS:-}
# Where cargo puts the release binaries.
target_dir=${CARGO_TARGET_DIR:-$repo/target}
SERVER=${SERVER_BIN:-$target_dir/release/presence-server}
LOADGEN=$target_dir/release/loadgen
# Our own Redis Cluster ports and run dir, apart from the one tests use.
export REDIS_CLUSTER_BASE_PORT=${BENCH_REDIS_PORT:-7200}
export REDIS_CLUSTER_DIR=$repo/.run/bench-redis-cluster

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

server_pids=()
loadgen_pids=()
started_cluster=

cleanup() {
  local pid
  for pid in "${loadgen_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${server_pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  if [ -n "$started_cluster" ]; then e2e/scripts/redis-cluster.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

build() {
  [ -n "${NO_BUILD:-}" ] && return 0
  log "building release binaries"
  cargo build --release -p presence-server -p presence-e2e >&2
}

describe_machine() {
  {
    echo "date: $(date -Is)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "kernel: $(uname -sr)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "open files: $(ulimit -n)"
    echo "rustc: $(rustc --version)"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "builds: $(variants)"
    echo "server flags: --dev ${SERVER_FLAGS}"
    echo "loadgen flags: ${LOADGEN_FLAGS}"
  } >"$1/machine.txt"
}

port_open() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start_server PORT LOGFILE [FLAGS...]: starts a node, waits until it accepts,
# prints its pid.
start_server() {
  local port=$1 logfile=$2 pid
  shift 2
  # shellcheck disable=SC2086  # SERVER_FLAGS is a word list on purpose
  RUST_LOG=${RUST_LOG:-info} "$SERVER" --dev --listen "127.0.0.1:$port" $SERVER_FLAGS "$@" \
    >"$logfile" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    port_open "$port" && { echo "$pid"; return 0; }
    kill -0 "$pid" 2>/dev/null || { tail -20 "$logfile" >&2; die "server on port $port exited"; }
    sleep 0.1
  done
  die "server on port $port did not listen within 10 s"
}

stop_servers() {
  local pid
  for pid in "${server_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${server_pids[@]}"; do
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  server_pids=()
}

joined() { local IFS=,; echo "$*"; }

# The builds to run: "name=path ..."; one unnamed build by default.
variants() { echo "${COMPARE:-=$SERVER}"; }

# The report name of a run of a build: run-N.json, or run-NAME-N.json.
run_file() { if [ -n "$2" ]; then echo "run-$2-$1"; else echo "run-$1"; fi; }

finish() {
  local dir=$1 name=$2 variant vname prefix runs
  echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$dir/machine.txt"
  for variant in $(variants); do
    vname=${variant%%=*}
    prefix=median${vname:+-$vname}
    runs=$(run_file '[0-9]*' "$vname")
    # shellcheck disable=SC2086  # $runs is a glob on purpose
    "$LOADGEN" median --json "$dir/$prefix.json" "$dir"/$runs.json >"$dir/$prefix.txt"
    # shellcheck disable=SC2086
    "$LOADGEN" median --markdown "$dir"/$runs.json >"$dir/$prefix.md"
    [ -n "$vname" ] && echo "--- build $vname (${variant#*=})"
    cat "$dir/$prefix.txt"
  done
  log "$name: reports in $dir"
}

new_dir() {
  local dir
  dir=$BENCH_DIR/$1/$(date +%Y%m%d-%H%M%S)
  mkdir -p "$dir"
  describe_machine "$dir"
  echo "$dir"
}

# single NAME LOADGEN-ARGS...: RUNS runs against one fresh embedded node each.
single() {
  local name=$1 dir run pid variant vname file
  shift
  dir=$(new_dir "$name")
  for run in $(seq "$RUNS"); do
    for variant in $(variants); do
      vname=${variant%%=*}
      SERVER=${variant#*=}
      file=$(run_file "$run" "$vname")
      log "$name${vname:+ ($vname)}: run $run/$RUNS (load $(cut -d' ' -f1 /proc/loadavg))"
      pid=$(start_server "$BENCH_PORT" "$dir/$file.server.log")
      server_pids=("$pid")
      # shellcheck disable=SC2086
      "$LOADGEN" run --label "$name${vname:+ ($vname)}" --target "127.0.0.1:$BENCH_PORT" --server-pid "$pid" \
        --json "$dir/$file.json" "$@" $LOADGEN_FLAGS >"$dir/$file.txt" 2>"$dir/$file.progress" ||
        { tail -5 "$dir/$file.progress" >&2; die "$name run $run failed"; }
      stop_servers
      grep -E 'sessions opened|change-to-watcher p99 ms|GetPresence batch .* p99 ms|per session|per 1k|errors|resets' \
        "$dir/$file.txt" | sed 's/^/    /' >&2 || true
    done
  done
  finish "$dir" "$name"
}

start_cluster() {
  [ -n "$started_cluster" ] && return 0
  log "starting a Redis Cluster on $REDIS_CLUSTER_BASE_PORT.."
  REDIS_URLS=$(e2e/scripts/redis-cluster.sh start | tail -1)
  started_cluster=1
}

# multi NAME NODES PROCS LOADGEN-ARGS...: RUNS runs of NODES server nodes on
# one Redis Cluster and PROCS generator processes (process i binds
# 127.0.0.(2+i), uses the user prefix p<i>-, and gets its share of sessions,
# watchers and rates, which the caller passes per process).
multi() {
  local name=$1 nodes=$2 procs=$3 dir run i pid targets=() pids=() variant vname file
  shift 3
  start_cluster
  dir=$(new_dir "$name")
  for run in $(seq "$RUNS"); do
    for variant in $(variants); do
      vname=${variant%%=*}
      SERVER=${variant#*=}
      file=$(run_file "$run" "$vname")
      log "$name${vname:+ ($vname)}: run $run/$RUNS (load $(cut -d' ' -f1 /proc/loadavg))"
      e2e/scripts/redis-cluster.sh flushall >/dev/null 2>&1
      targets=()
      for i in $(seq 0 $((nodes - 1))); do
        pid=$(start_server $((BENCH_PORT + i)) "$dir/$file.server-$i.log" \
          --redis-cluster "$REDIS_URLS" --node-id "bench-$i")
        server_pids+=("$pid")
        targets+=("127.0.0.1:$((BENCH_PORT + i))")
      done
      pids=("${server_pids[@]}")
      rm -rf "$dir/barrier-$file"
      mkdir -p "$dir/procs"
      loadgen_pids=()
      for i in $(seq 0 $((procs - 1))); do
        local leader=()
        [ "$i" = 0 ] && leader=(--server-pid "$(joined "${pids[@]}")" --redis "$REDIS_URLS")
        # shellcheck disable=SC2086
        "$LOADGEN" run --label "$name${vname:+ ($vname)}" --target "$(joined "${targets[@]}")" \
          --source-ip "127.0.0.$((2 + i))" --user-prefix "p$i-" \
          --barrier "$dir/barrier-$file" --procs "$procs" --proc-index "$i" \
          --threads 1 --progress "$([ "$i" = 0 ] && echo 2s || echo 0s)" \
          --json "$dir/procs/$file.proc-$i.json" "${leader[@]}" "$@" $LOADGEN_FLAGS \
          >"$dir/procs/$file.proc-$i.txt" 2>"$dir/procs/$file.proc-$i.progress" &
        loadgen_pids+=($!)
      done
      local failed=
      for pid in "${loadgen_pids[@]}"; do wait "$pid" || failed=1; done
      loadgen_pids=()
      stop_servers
      [ -z "$failed" ] || { tail -5 "$dir/procs/$file".proc-*.progress >&2; die "$name run $run failed"; }
      "$LOADGEN" merge --json "$dir/$file.json" "$dir/procs/$file".proc-*.json >"$dir/$file.txt"
      grep -E 'sessions opened|connections  |change-to-watcher p99 ms|change-to-consumer .* p99 ms|feed events consumed|feed: (dup|ack)|GetPresence batch .* p99 ms|per session|per 1k|Redis commands per|round trips|errors|resets' \
        "$dir/$file.txt" | sed 's/^/    /' >&2 || true
    done
  done
  finish "$dir" "$name"
}

profile_smoke() {
  RUNS=1 single smoke --sessions 200 --connections 20 --watchers 20 --contacts 10 --watched 100 \
    --change-rate 50 --get-rate 50 --beat-interval 1s --settle 500ms --beats-only 2s --duration 3s
}

# A few minutes: 3 x ~45 s.
profile_quick() {
  single quick --sessions 20000 --connections 2000 --beat-interval 4s \
    --watchers 500 --contacts 40 --watched 1000 --change-rate 500 --get-rate 1000 \
    --settle 3s --beats-only 8s --duration 15s
}

# Heartbeats at the server's interval (10 s: 10k/s) with 5k queries/s on top.
profile_mux_100k() {
  single mux-100k --sessions 100000 --connections 10000 \
    --get-rate 5000 --settle 5s --beats-only 15s --duration 20s
}

# Heartbeat cost alone: 25k/s, no load window.
profile_beats_25k() {
  single beats-25k --sessions 100000 --connections 10000 --beat-interval 4s \
    --settle 5s --beats-only 20s --duration 0s --drain 0s
}

# 1k changes/s over 5k users, each watched by 20 of 1000 watchers (100
# contacts each): 20k deliveries/s.
CHURN=(--sessions 10000 --connections 1000 --watchers 1000 --contacts 100 --watched 5000
  --change-rate 1000 --settle 3s --beats-only 5s --duration 30s)

profile_churn() { single churn "${CHURN[@]}"; }

profile_churn_redis() { RUNS=$RUNS multi churn-redis 2 1 "${CHURN[@]}" --threads 0; }

# The change feed: status churn over 5k users (no watchers: the fan-out is
# churn-redis's business) while 4 consumers of one group, 2 on each node,
# acknowledge every batch; after the load every acknowledged change must have
# been consumed. 30 s at 10k/s logs ~300k changes, enough to weigh the log.
profile_feed() {
  local rate
  for rate in ${FEED_RATES:-1000 10000}; do
    multi "feed-$(if ((rate % 1000)); then echo "$rate"; else echo "$((rate / 1000))k"; fi)" 2 1 --sessions 5000 --connections 100 --watched 5000 \
      --change-rate "$rate" --consumers 4 --settle 2s --beats-only 3s --duration 30s --threads 0
  done
}

# 100k connections, one session each: 7 nodes (~14.3k sockets each) and 6
# generator processes (~16.7k each), all below the 20k open files a process
# may have. A light churn (120 changes/s in all, ~20 watchers per changing
# user, across nodes) and 600 queries/s are shared out per process: the
# point is the connections' memory and the heartbeats' cost.
profile_redis_100k() {
  multi redis-100k 7 6 --sessions 16667 --connections 0 \
    --watchers 167 --contacts 100 --watched 834 --change-rate 20 --get-rate 100 \
    --ramp-concurrency 128 --settle 10s --beats-only 15s --duration 30s
}

# The chaos soak: 2 nodes on a Redis Cluster, one generator process whose
# clients are killed, reconnected, replaced and logged out at random; node 1
# is kill -9'd at SOAK_KILL_AT and restarted (same --node-id, port and
# timers) SOAK_DOWN later, while its clients reconnect to node 0. The
# generator samples VmRSS (through pid files this script rewrites on a
# restart), the nodes' presence_sessions gauge and the users shown online
# every 10 s, and compares the users shown online with its live clients once
# the staleness bound has passed.
profile_soak() {
  local duration=${SOAK_DURATION:-30m} sessions=${SOAK_SESSIONS:-20000} rate=${SOAK_CHAOS_RATE:-50}
  local port=${SOAK_PORT:-55000} down=${SOAK_DOWN:-15s}
  local timers=${SOAK_TIMERS:---lease 6s --heartbeat-interval 2s --grace 1s --node-lease 3s --sweep-interval 500ms}
  local dir secs kill_at i pid targets=() metrics=() pidfiles=() status=0
  export REDIS_CLUSTER_BASE_PORT=${SOAK_REDIS_PORT:-7500}
  export REDIS_CLUSTER_DIR=$repo/.run/soak-redis-cluster
  secs=$(python3 -c "import sys; print(int(float(sys.argv[1])))" "$(humantime_secs "$duration")")
  kill_at=${SOAK_KILL_AT:-$((secs / 3))}
  start_cluster
  e2e/scripts/redis-cluster.sh flushall >/dev/null 2>&1
  dir=$(new_dir soak)
  local killed="node 1 killed at +${kill_at}s of the chaos for $down"
  [ "$kill_at" != none ] || killed="no node killed"
  {
    echo "soak: duration $duration, sessions $sessions, chaos $rate/s, $killed"
    echo "node timers: $timers"
  } >>"$dir/machine.txt"
  # shellcheck disable=SC2086  # timers is a word list on purpose
  soak_node() {
    local i=$1 log=$2
    start_server $((port + i)) "$log" --redis-cluster "$REDIS_URLS" --node-id "soak-$i" \
      --metrics-listen "127.0.0.1:$((port + 100 + i))" $timers
  }
  for i in 0 1; do
    pid=$(soak_node "$i" "$dir/server-$i.log")
    server_pids+=("$pid")
    echo "$pid" >"$dir/node-$i.pid"
    targets+=("127.0.0.1:$((port + i))")
    metrics+=("127.0.0.1:$((port + 100 + i))")
    pidfiles+=("$dir/node-$i.pid")
  done
  log "soak: nodes ${server_pids[*]} on ${targets[*]}; chaos $duration over $sessions sessions (load $(cut -d' ' -f1 /proc/loadavg))"
  # shellcheck disable=SC2086
  "$LOADGEN" soak --label soak --target "$(joined "${targets[@]}")" --metrics "$(joined "${metrics[@]}")" \
    --server-pid-file "$(joined "${pidfiles[@]}")" --sessions "$sessions" --chaos-rate "$rate" \
    --duration "$duration" --json "$dir/soak.json" $LOADGEN_FLAGS \
    >"$dir/soak.txt" 2>"$dir/soak.progress" &
  loadgen_pids=($!)
  local lg=$!
  # Wait for the chaos to start, then for the kill point.
  until grep -q '^\[soak\] chaos for' "$dir/soak.progress" 2>/dev/null; do
    kill -0 "$lg" 2>/dev/null || break
    sleep 1
  done
  if [ "$kill_at" != none ] && kill -0 "$lg" 2>/dev/null; then
    sleep "$kill_at"
    pid=${server_pids[1]}
    echo "$(date -Is) kill -9 node 1 (pid $pid)" >>"$dir/events.log"
    log "soak: kill -9 node 1 (pid $pid)"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    cp "$dir/server-1.log" "$dir/server-1.killed.log"
    sleep "$(humantime_secs "$down")"
    pid=$(soak_node 1 "$dir/server-1.log")
    server_pids[1]=$pid
    echo "$pid" >"$dir/node-1.pid"
    echo "$(date -Is) node 1 restarted (pid $pid)" >>"$dir/events.log"
    log "soak: node 1 restarted (pid $pid)"
  fi
  wait "$lg" || status=$?
  loadgen_pids=()
  stop_servers
  echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$dir/machine.txt"
  cat "$dir/soak.txt"
  log "soak: server warnings and errors: $(cat "$dir"/server-*.log | grep -ciE ' (warn|error) ' || true) (grep -iE ' (warn|error) ' $dir/server-*.log)"
  log "soak: report in $dir"
  [ "$status" = 0 ] || die "soak: the users shown online differ from the live clients (exit $status)"
}

# Seconds of a duration like 30m, 90s, 1h, 1500ms.
humantime_secs() {
  python3 - "$1" <<'PY'
import re, sys
units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
total = 0.0
for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", sys.argv[1]):
    total += float(n) * units[u]
print(total)
PY
}

main() {
  local profile=${1:-}
  case $profile in
    smoke | quick | mux-100k | beats-25k | churn | churn-redis | feed | redis-100k | soak) ;;
    full) ;;
    -h | --help | help | '')
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
      [ -n "$profile" ]
      return
      ;;
    *) die "unknown profile '$profile' (see --help)" ;;
  esac
  [ "$RUNS" -ge 1 ] || die "RUNS must be at least 1"
  build
  [ -x "$LOADGEN" ] || die "$LOADGEN missing"
  local variant
  for variant in $(variants); do [ -x "${variant#*=}" ] || die "${variant#*=} missing"; done
  log "machine load: $(cut -d' ' -f1-3 /proc/loadavg) (shared machine: figures vary with it)"
  case $profile in
    full)
      profile_quick
      profile_churn
      profile_mux_100k
      profile_beats_25k
      profile_churn_redis
      profile_feed
      profile_redis_100k
      ;;
    *) "profile_${profile//-/_}" ;;
  esac
}

main "$@"
