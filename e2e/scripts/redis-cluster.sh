#!/usr/bin/env bash
# A throw-away 6-node Redis Cluster (3 masters + 3 replicas) on 127.0.0.1 for
# the e2e tests and benchmarks. Installs Redis from Debian's apt if missing.
#
#   redis-cluster.sh install          apt-get install redis-server redis-tools if missing
#   redis-cluster.sh start            install, start/create (or reuse) the cluster, print seed URLs
#   redis-cluster.sh urls             print the seed URLs only (starts nothing)
#   redis-cluster.sh status           CLUSTER INFO + CLUSTER NODES of the first reachable node
#   redis-cluster.sh wait [SECS]      wait until every slot is served by a live master
#   redis-cluster.sh kill-master PORT kill -9 the node on PORT (any role; alias: kill-node)
#   redis-cluster.sh restart-node PORT  start the node on PORT again with its config; it rejoins
#   redis-cluster.sh flushall         FLUSHALL on every master
#   redis-cluster.sh restart-empty    restart all nodes with no data, same topology; print URLs
#   redis-cluster.sh stop             shut every node down and remove the run dir
#
# Environment:
#   REDIS_CLUSTER_BASE_PORT        first port (default 7000; uses BASE..BASE+5 and +10000 for the bus)
#   REDIS_CLUSTER_DIR              run dir (default <repo>/.run/redis-cluster-<first port>, so that
#                                  clusters on other ports never share, or clear, each other's)
#   REDIS_CLUSTER_NODE_TIMEOUT_MS  cluster-node-timeout (default 2000: fast failover in tests)
#   REDIS_CLUSTER_READY_TIMEOUT    seconds to wait for the cluster to become healthy (default 30)
#
# All log output goes to stderr; `start`, `urls` and `restart-empty` print the
# seed URL list as the last (only) stdout line, so callers can do
#   export PRESENCE_REDIS_CLUSTER=$(e2e/scripts/redis-cluster.sh start | tail -1)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd -P)

HOST=127.0.0.1
NODES=6
BASE_PORT=${REDIS_CLUSTER_BASE_PORT:-7000}
NODE_TIMEOUT_MS=${REDIS_CLUSTER_NODE_TIMEOUT_MS:-2000}
READY_TIMEOUT_S=${REDIS_CLUSTER_READY_TIMEOUT:-30}
# Canonical (-m: may not exist yet) because it is compared with /proc/PID/cwd,
# which the kernel reports canonicalised, and because redis chdirs into it.
RUN_DIR=$(readlink -m "${REDIS_CLUSTER_DIR:-$REPO_ROOT/.run/redis-cluster-$BASE_PORT}")
# The ports are the shared resource (several worktrees may run this script), so
# the lock is keyed by port, not by run dir, and lives outside the run dir that
# `stop` deletes.
LOCK_FILE=${TMPDIR:-/tmp}/redis-cluster-$BASE_PORT.lock

log() { printf 'redis-cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

validate_env() {
  case $BASE_PORT in '' | *[!0-9]*) die "REDIS_CLUSTER_BASE_PORT must be a number, got '$BASE_PORT'" ;; esac
  # +10000 is the cluster bus port, which must still be a valid port.
  if [ "$BASE_PORT" -lt 1024 ] || [ "$BASE_PORT" -gt $((65535 - 10000 - NODES + 1)) ]; then
    die "REDIS_CLUSTER_BASE_PORT=$BASE_PORT out of range (1024..$((65535 - 10000 - NODES + 1)))"
  fi
  case $NODE_TIMEOUT_MS in '' | *[!0-9]*) die "REDIS_CLUSTER_NODE_TIMEOUT_MS must be a number" ;; esac
  case $READY_TIMEOUT_S in '' | *[!0-9]*) die "REDIS_CLUSTER_READY_TIMEOUT must be a number" ;; esac
}

ports() { seq "$BASE_PORT" $((BASE_PORT + NODES - 1)); }

urls() {
  local p out=
  for p in $(ports); do out="${out:+$out,}redis://$HOST:$p"; done
  printf '%s\n' "$out"
}

check_port_arg() {
  case ${1:-} in '' | *[!0-9]*) die "expected a port number, got '${1:-}'" ;; esac
  if [ "$1" -lt "$BASE_PORT" ] || [ "$1" -ge $((BASE_PORT + NODES)) ]; then
    die "port $1 is not a cluster node (nodes are $BASE_PORT..$((BASE_PORT + NODES - 1)))"
  fi
}

# Serialise mutating commands so two concurrent `start`s don't both create a
# cluster on the same ports. fd 9 must NOT leak into redis-server (see start_node),
# or the daemons would hold the lock forever.
take_lock() {
  exec 9>"$LOCK_FILE"
  flock -w 180 9 || die "timed out waiting for lock $LOCK_FILE (another redis-cluster.sh running?)"
}

# ---------------------------------------------------------------- node helpers

node_dir() { printf '%s/%s' "$RUN_DIR" "$1"; }

# Bounded: a stopped (SIGSTOP) or wedged server must not hang CI forever.
rcli() {
  local port=$1
  shift
  timeout 5 redis-cli -h "$HOST" -p "$port" "$@" </dev/null
}

is_up() { [ "$(rcli "$1" ping 2>/dev/null)" = PONG ]; }

# Something (anything) accepts TCP connections on the port.
port_busy() { (: <"/dev/tcp/$HOST/$1") 2>/dev/null; }

# The config file a redis on the port was started with (INFO keeps reporting
# it even after the run dir is deleted, unlike CONFIG GET dir).
config_file_of() {
  rcli "$1" info server 2>/dev/null | tr -d '\r' | sed -n 's/^config_file://p' || true
}

# Our node = a redis started with the config file we wrote for that port.
# Works when pidfiles are gone (run dir deleted under running nodes).
is_ours() { [ "$(config_file_of "$1")" = "$(node_dir "$1")/redis.conf" ]; }

# pid of our redis-server on the port, or nothing. The pidfile may be stale
# (kill -9 leaves it) and its pid reused, so check the process is redis-server.
node_pid() {
  local port=$1 pid=
  if [ -f "$(node_dir "$port")/redis.pid" ]; then
    pid=$(cat "$(node_dir "$port")/redis.pid" 2>/dev/null || true)
  fi
  if [ -z "$pid" ] && is_up "$port" && is_ours "$port"; then
    pid=$(rcli "$port" info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p' || true)
  fi
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = redis-server ] || return 0
  # Redis chdirs into its `dir`; that tells our node from a recycled pid.
  case $(readlink "/proc/$pid/cwd" 2>/dev/null) in
    "$(node_dir "$port")" | "$(node_dir "$port") (deleted)") printf '%s\n' "$pid" ;;
  esac
}

# A zombie (exited, not yet reaped by whatever init the container has) is dead.
pid_alive() {
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

write_conf() {
  local port=$1 dir
  dir=$(node_dir "$port")
  mkdir -p "$dir"
  # Rewritten on every start so env changes (node timeout) apply; nodes.conf,
  # which holds the cluster topology, is left alone.
  cat >"$dir/redis.conf" <<EOF
# generated by e2e/scripts/redis-cluster.sh -- do not edit
port $port
bind $HOST
protected-mode no
daemonize yes
pidfile "$dir/redis.pid"
logfile "$dir/redis.log"
dir "$dir"
dbfilename dump.rdb
cluster-enabled yes
cluster-config-file "$dir/nodes.conf"
cluster-node-timeout $NODE_TIMEOUT_MS
# A replica may always take over, however long it was cut off: tests kill
# masters at arbitrary times and expect a failover, not a stuck cluster.
cluster-replica-validity-factor 0
# Test data only: no persistence, so a restart with the data files removed is empty.
appendonly no
save ""
# Replicas sync at once instead of waiting 5 s for more replicas to batch with.
repl-diskless-sync yes
repl-diskless-sync-delay 0
loglevel notice
EOF
}

start_node() {
  local port=$1 dir
  dir=$(node_dir "$port")
  write_conf "$port"
  rm -f "$dir/redis.pid"
  # 9>&-: don't hand the lock fd to the daemon. Output goes to a file because
  # config errors are printed before daemonizing, and a daemon holding our
  # stdout would hang `$(... start)` callers.
  if ! redis-server "$dir/redis.conf" </dev/null >"$dir/startup.log" 2>&1 9>&-; then
    cat "$dir/startup.log" >&2 || true
    die "redis-server on port $port failed to start"
  fi
  for _ in $(seq 100); do
    is_up "$port" && return 0
    sleep 0.1
  done
  tail -n 20 "$dir/startup.log" "$dir/redis.log" >&2 2>/dev/null || true
  die "redis-server on port $port did not answer PING within 10 s"
}

# The subset of the given pids still alive.
alive_pids() {
  local pid
  for pid in "$@"; do pid_alive "$pid" && printf '%s ' "$pid"; done
  return 0
}

# wait_pids_gone TENTHS PID...: true once all are gone.
wait_pids_gone() {
  local n=$1
  shift
  for _ in $(seq "$n"); do
    [ -z "$(alive_pids "$@")" ] && return 0
    sleep 0.1
  done
  [ -z "$(alive_pids "$@")" ]
}

# Best effort: the daemons are children of the container's init, which reaps
# them a moment later; wait for that so "no redis-server left" checks
# (pgrep, ps) right after `stop` see none, not <defunct> entries.
reaped() {
  local pid
  for pid in "$@"; do
    for _ in $(seq 30); do
      [ -e "/proc/$pid" ] || break
      sleep 0.1
    done
  done
  return 0
}

# Ask every node to exit at once (not one by one, so replicas don't start
# failovers against already-stopped masters), then make sure they are gone.
stop_nodes() {
  local p pid pids=
  for p in $(ports); do
    pid=$(node_pid "$p")
    pid_alive "$pid" || continue
    pids="$pids $pid"
    # NOW: don't wait for lagging replicas (Redis 7 SHUTDOWN waits up to 10 s).
    rcli "$p" shutdown nosave now >/dev/null 2>&1 || rcli "$p" shutdown nosave >/dev/null 2>&1 || true
  done
  [ -n "$pids" ] || return 0
  # shellcheck disable=SC2086
  wait_pids_gone 50 $pids && reaped $pids && return 0
  # shellcheck disable=SC2086
  for pid in $(alive_pids $pids); do
    log "pid $pid ignored SHUTDOWN for 5 s, killing it"
    kill -9 "$pid" 2>/dev/null || true
  done
  # shellcheck disable=SC2086
  wait_pids_gone 50 $pids || die "redis-server pid(s) $(alive_pids $pids)still alive after kill -9"
  # shellcheck disable=SC2086
  reaped $pids
}

# Refuse to `rm -rf` something that is obviously not a run dir.
wipe_run_dir() {
  case $RUN_DIR in
    / | "$REPO_ROOT" | "${HOME:-/}" | "$(readlink -m "$REPO_ROOT/..")") die "refusing to delete REDIS_CLUSTER_DIR=$RUN_DIR" ;;
  esac
  rm -rf "$RUN_DIR"
}

# ---------------------------------------------------------------- health checks

# This node sees every slot served by a connected, non-failing master. Right
# after a master is kill -9'd its peers still say cluster_state:ok until the
# node timeout passes, but its link shows "disconnected" at once, so checking
# the slot owners' links avoids declaring victory before the failover.
node_serves_all_slots() {
  local port=$1 info nodes
  info=$(rcli "$port" cluster info 2>/dev/null | tr -d '\r') || return 1
  printf '%s\n' "$info" | grep -qx 'cluster_state:ok' || return 1
  printf '%s\n' "$info" | grep -qx 'cluster_slots_assigned:16384' || return 1
  printf '%s\n' "$info" | grep -qx 'cluster_slots_ok:16384' || return 1
  nodes=$(rcli "$port" cluster nodes 2>/dev/null | tr -d '\r') || return 1
  # fields: id addr flags master ping pong epoch link-state slot...
  printf '%s\n' "$nodes" | awk '
    NF >= 9 && ($8 != "connected" || $3 ~ /fail/) { bad = 1 }
    END { exit bad }'
}

# The full picture `start` promises: all 6 nodes up and ours, agreeing on
# 6 healthy members, 3 slot-owning masters each with a replica, replicas synced
# (an unsynced replica can't serve a failover test).
cluster_fully_healthy() {
  local p nodes repl
  for p in $(ports); do
    is_up "$p" && is_ours "$p" || return 1
    node_serves_all_slots "$p" || return 1
    rcli "$p" cluster info 2>/dev/null | tr -d '\r' | grep -qx "cluster_known_nodes:$NODES" || return 1
    nodes=$(rcli "$p" cluster nodes 2>/dev/null | tr -d '\r') || return 1
    printf '%s\n' "$nodes" | awk -v want=$((NODES / 2)) '
      $3 ~ /fail|handshake|noaddr/ || $8 != "connected" { bad = 1 }
      $3 ~ /master/ && NF >= 9 { masters[$1] = 1; nm++ }
      $3 ~ /slave/ { replicas[$4]++ }
      END {
        if (bad || nm != want) exit 1
        for (m in masters) if (!(m in replicas)) exit 1
      }' || return 1
    repl=$(rcli "$p" info replication 2>/dev/null | tr -d '\r') || return 1
    if printf '%s\n' "$repl" | grep -qx 'role:slave'; then
      printf '%s\n' "$repl" | grep -qx 'master_link_status:up' || return 1
      printf '%s\n' "$repl" | grep -qx 'master_sync_in_progress:0' || return 1
    fi
  done
}

# Every node that is up serves all slots (nodes that are down are ignored, so
# this is the right wait after kill-master).
live_nodes_serve_all_slots() {
  local p n=0
  for p in $(ports); do
    is_up "$p" || continue
    node_serves_all_slots "$p" || return 1
    n=$((n + 1))
  done
  [ "$n" -gt 0 ]
}

# wait_for SECS DESCRIPTION CMD...: poll CMD until it succeeds or time runs out.
wait_for() {
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$(($(date +%s) + secs))
  until "$@"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "timed out after ${secs}s waiting for $what"
      show_status >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

show_status() {
  local p
  for p in $(ports); do
    if is_up "$p"; then
      echo "# node $HOST:$p ($(node_dir "$p"))"
      echo "## cluster info"
      rcli "$p" cluster info | tr -d '\r'
      echo "## cluster nodes"
      rcli "$p" cluster nodes | tr -d '\r'
      return 0
    fi
  done
  echo "no cluster node reachable on $HOST:$BASE_PORT..$((BASE_PORT + NODES - 1))"
  return 1
}

# ---------------------------------------------------------------- install

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif have sudo; then
    sudo -n "$@"
  else
    die "need root (or passwordless sudo) to install redis"
  fi
}

OUR_POLICY_RC_D=
cleanup_policy_rc_d() {
  if [ -n "$OUR_POLICY_RC_D" ]; then
    as_root rm -f /usr/sbin/policy-rc.d || true
    OUR_POLICY_RC_D=
  fi
}

# Without systemd, the package's postinst runs /etc/init.d/redis-server start
# via invoke-rc.d, leaving a stray redis on 6379. A policy-rc.d that exits 101
# ("action forbidden") stops that; an existing one (Docker-style images ship
# one) is left untouched.
forbid_service_start() {
  [ -e /usr/sbin/policy-rc.d ] && return 0
  printf '#!/bin/sh\n# temporary, from e2e/scripts/redis-cluster.sh\nexit 101\n' |
    as_root tee /usr/sbin/policy-rc.d >/dev/null
  as_root chmod 755 /usr/sbin/policy-rc.d
  OUR_POLICY_RC_D=1
  trap cleanup_policy_rc_d EXIT
}

# Belt and braces for the policy above: if the package's default instance got
# started anyway, stop it. Identified by Debian's pidfile or its data dir, so a
# redis someone else runs on 6379 on purpose is not touched.
stop_debian_default_instance() {
  local pid
  pid=$(cat /run/redis/redis-server.pid 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = redis-server ]; then
    log "the redis-server package started its default instance (pid $pid); stopping it"
    as_root kill "$pid" 2>/dev/null || true
    wait_pids_gone 100 "$pid" || as_root kill -9 "$pid" 2>/dev/null || true
  fi
  if [ "$(timeout 5 redis-cli -p 6379 config get dir </dev/null 2>/dev/null | sed -n 2p)" = /var/lib/redis ]; then
    log "stopping the package's default redis on 6379"
    timeout 5 redis-cli -p 6379 shutdown nosave </dev/null >/dev/null 2>&1 || true
  fi
}

cmd_install() {
  if have redis-server && have redis-cli; then return 0; fi
  have apt-get || die "redis-server/redis-cli missing and no apt-get to install them"
  log "installing redis-server and redis-tools with apt-get"
  forbid_service_start
  # Lock timeout: another apt run (another worktree, unattended job) must make
  # us wait, not fail.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -qq update >&2 ||
    die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -qq -y \
    --no-install-recommends install redis-server redis-tools </dev/null >&2 ||
    die "apt-get install redis-server redis-tools failed"
  cleanup_policy_rc_d
  stop_debian_default_instance
  { have redis-server && have redis-cli; } || die "redis installed but redis-server/redis-cli not on PATH"
  log "installed $(redis-server --version | head -n 1)"
}

# ---------------------------------------------------------------- commands

check_ports_free() {
  local p q conf
  for p in $(ports); do
    for q in "$p" $((p + 10000)); do
      port_busy "$q" || continue
      if is_up "$q"; then
        conf=$(config_file_of "$q")
        die "port $q is used by another redis (config ${conf:-none}); stop it or set REDIS_CLUSTER_BASE_PORT"
      fi
      die "port $q is in use by another process; free it or set REDIS_CLUSTER_BASE_PORT"
    done
  done
}

create_cluster() {
  local p addrs=
  for p in $(ports); do addrs="$addrs $HOST:$p"; done
  # shellcheck disable=SC2086  # addrs is a word list on purpose
  if ! timeout 120 redis-cli --cluster create $addrs --cluster-replicas 1 --cluster-yes \
    </dev/null >"$RUN_DIR/create.log" 2>&1; then
    cat "$RUN_DIR/create.log" >&2
    die "redis-cli --cluster create failed"
  fi
}

cmd_start() {
  local p
  take_lock
  cmd_install
  if cluster_fully_healthy; then
    log "reusing the healthy cluster already running on $BASE_PORT..$((BASE_PORT + NODES - 1))"
    urls
    return 0
  fi
  # Anything else (half-dead cluster, nodes.conf of a dead run, which would make
  # --cluster create refuse the nodes) is wiped and rebuilt from scratch.
  if [ -d "$RUN_DIR" ] || [ -n "$(for p in $(ports); do node_pid "$p"; done)" ]; then
    log "clearing stale state in $RUN_DIR"
  fi
  stop_nodes
  wipe_run_dir
  check_ports_free
  mkdir -p "$RUN_DIR"
  for p in $(ports); do start_node "$p"; done
  create_cluster
  wait_for "$READY_TIMEOUT_S" "a healthy cluster" cluster_fully_healthy ||
    die "cluster did not become healthy (logs: $RUN_DIR/*/redis.log)"
  log "cluster up: 3 masters + 3 replicas on $HOST:$BASE_PORT..$((BASE_PORT + NODES - 1))"
  urls
}

cmd_stop() {
  take_lock
  if have redis-cli; then stop_nodes; fi
  wipe_run_dir
  local p
  for p in $(ports); do
    if is_up "$p" 2>/dev/null; then log "note: port $p still answers, but that redis is not ours (left alone)"; fi
  done
  log "stopped"
}

cmd_wait() {
  local secs=${1:-$READY_TIMEOUT_S}
  case $secs in '' | *[!0-9]*) die "wait: expected seconds, got '$secs'" ;; esac
  wait_for "$secs" "every slot to be served by a live master" live_nodes_serve_all_slots ||
    die "cluster not serving all slots after ${secs}s"
  log "all slots served"
}

cmd_kill_master() {
  local port=$1 pid role id
  check_port_arg "$port"
  take_lock
  pid=$(node_pid "$port")
  pid_alive "$pid" || die "no node of ours running on port $port"
  role=$(rcli "$port" info replication 2>/dev/null | tr -d '\r' | sed -n 's/^role://p' || true)
  id=$(rcli "$port" cluster myid 2>/dev/null | tr -d '\r' || true)
  [ "$role" = master ] || log "note: node $port is a ${role:-?}, not a master; killing it anyway"
  kill -9 "$pid"
  # Return only once the port is free, so an immediate restart-node can bind it.
  wait_pids_gone 50 "$pid" || die "pid $pid survived kill -9"
  log "killed node $port (pid $pid, ${role:-?}, id $id)"
}

# A restarted node must know the cluster again (state ok, full membership) and,
# if it came back as a replica (a killed master whose replica took over does),
# have synced from its master.
node_rejoined() {
  local port=$1 repl
  node_serves_all_slots "$port" || return 1
  rcli "$port" cluster info 2>/dev/null | tr -d '\r' | grep -qx "cluster_known_nodes:$NODES" || return 1
  repl=$(rcli "$port" info replication 2>/dev/null | tr -d '\r') || return 1
  if printf '%s\n' "$repl" | grep -qx 'role:slave'; then
    printf '%s\n' "$repl" | grep -qx 'master_link_status:up' || return 1
  fi
}

cmd_restart_node() {
  local port=$1
  check_port_arg "$port"
  take_lock
  if is_up "$port"; then
    is_ours "$port" || die "port $port is served by a redis that is not ours"
    log "node $port is already running"
    return 0
  fi
  [ -f "$(node_dir "$port")/nodes.conf" ] || die "node $port has no state in $RUN_DIR; run 'start' first"
  start_node "$port"
  wait_for "$READY_TIMEOUT_S" "node $port to rejoin" node_rejoined "$port" ||
    die "node $port did not rejoin the cluster"
  log "node $port rejoined as $(rcli "$port" info replication | tr -d '\r' | sed -n 's/^role://p')"
}

cmd_flushall() {
  local p n=0
  for p in $(ports); do
    is_up "$p" || continue
    rcli "$p" info replication 2>/dev/null | tr -d '\r' | grep -qx 'role:master' || continue
    [ "$(rcli "$p" flushall | tr -d '\r')" = OK ] || die "FLUSHALL failed on $p"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || die "no master reachable"
  log "flushed $n master(s)"
}

cmd_restart_empty() {
  take_lock
  local p
  for p in $(ports); do
    [ -f "$(node_dir "$p")/nodes.conf" ] || die "node $p has no nodes.conf in $RUN_DIR; run 'start' first"
  done
  stop_nodes
  # Remove the data only: replicas hold the RDB of their last full sync and
  # would load it back. nodes.conf (the topology) stays, so the same cluster
  # comes back, just empty -- like a Redis restart without persistence.
  for p in $(ports); do
    rm -rf "$(node_dir "$p")"/*.rdb "$(node_dir "$p")"/appendonly*
  done
  check_ports_free
  for p in $(ports); do start_node "$p"; done
  wait_for "$READY_TIMEOUT_S" "a healthy cluster" cluster_fully_healthy ||
    die "cluster did not become healthy after restart-empty"
  local keys=0 k
  for p in $(ports); do
    k=$(rcli "$p" dbsize | tr -d '\r')
    keys=$((keys + k))
  done
  [ "$keys" -eq 0 ] || die "cluster restarted with $keys keys, expected none"
  log "cluster restarted empty"
  urls
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

need_redis_cli() { have redis-cli || die "redis-cli not installed; run '$0 install' or '$0 start'"; }

main() {
  validate_env
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  case $cmd in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    urls) urls ;;
    status) need_redis_cli && show_status ;;
    wait) need_redis_cli && cmd_wait "${1:-}" ;;
    kill-master | kill-node) need_redis_cli && cmd_kill_master "${1:-}" ;;
    restart-node) need_redis_cli && cmd_restart_node "${1:-}" ;;
    flushall) need_redis_cli && cmd_flushall ;;
    restart-empty) need_redis_cli && cmd_restart_empty ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
