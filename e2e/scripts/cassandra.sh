#!/usr/bin/env bash
# A real single-node Apache Cassandra 5.0 on loopback, standing in for
# ScyllaDB (same CQL protocol) in the e2e tests.
#
# Cassandra cannot be downloaded as a tarball here (only package registries
# are reachable), so it comes from Maven Central: e2e/cassandra/pom.xml pulls
# org.apache.cassandra:cassandra-all and its runtime dependencies, and this
# script runs org.apache.cassandra.service.CassandraDaemon with plain `java`
# (the jar has no bin/cassandra launcher), with the flags that launcher would
# have added.
#
# Usage: e2e/scripts/cassandra.sh COMMAND
#   install         fetch the jars with Maven (quiet) unless already cached
#   start           install, start in the background, wait until a real CQL
#                   query works; reuses a node that is already up. Last stdout
#                   line is the contact point, e.g. 127.0.0.1:9042:
#                     export PRESENCE_SCYLLA_NODES=$(e2e/scripts/cassandra.sh start | tail -1)
#   stop [--wipe] [--kill]
#                   stop it (SIGTERM, then SIGKILL after a grace period). Data
#                   is kept, so `stop` + `start` is a full restart with the same
#                   keyspaces (outage test: "node went down, came back").
#                   --wipe also deletes data and logs. --kill sends SIGKILL
#                   at once (a crash: no flush, commit log replays on the next
#                   start; fastest way down).
#   pause           SIGSTOP the JVM: the port stays open and the kernel still
#                   accepts TCP connections, but nothing answers, so clients
#                   see timeouts, not refused connections (outage test: "node
#                   hangs"). Fast: no JVM restart.
#   resume          SIGCONT it and wait until CQL answers again.
#   status          print running / paused / stopped; exit 0 only if a CQL
#                   query works right now.
#   cql STMT...     run CQL statements against the node, print result rows.
#   nodes           print the contact point (127.0.0.1:PORT).
#
# Environment (all optional):
#   CASSANDRA_HOME           jars, config, data, logs   (<repo>/.run/cassandra)
#   CASSANDRA_VERSION        cassandra-all version      (5.0.9)
#   CASSANDRA_PORT           CQL native port            (9042)
#   CASSANDRA_STORAGE_PORT   inter-node port; never 7000-7005, Redis
#                            Cluster uses those          (7199; JMX is off)
#   CASSANDRA_HEAP           max heap                   (1g)
#   CASSANDRA_START_TIMEOUT  seconds to wait for CQL    (180)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
ASSETS="$REPO_ROOT/e2e/cassandra"

CASSANDRA_HOME="${CASSANDRA_HOME:-$REPO_ROOT/.run/cassandra}"
CASSANDRA_VERSION="${CASSANDRA_VERSION:-5.0.9}"
CASSANDRA_PORT="${CASSANDRA_PORT:-9042}"
CASSANDRA_STORAGE_PORT="${CASSANDRA_STORAGE_PORT:-7199}"
CASSANDRA_HEAP="${CASSANDRA_HEAP:-1g}"
CASSANDRA_START_TIMEOUT="${CASSANDRA_START_TIMEOUT:-180}"
HOST=127.0.0.1

LIB_DIR="$CASSANDRA_HOME/lib"
TOOLS_DIR="$CASSANDRA_HOME/tools"
CONF_DIR="$CASSANDRA_HOME/conf"
DATA_DIR="$CASSANDRA_HOME/data"
LOG_DIR="$CASSANDRA_HOME/logs"
PID_FILE="$CASSANDRA_HOME/cassandra.pid"
STAMP="$CASSANDRA_HOME/.installed"

log() { echo "cassandra.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Serialise commands on one CASSANDRA_HOME (two test processes calling
# `start` at once must not launch two JVMs). fd 9 stays open until exit; it
# is closed for the JVM so the daemon never inherits the lock.
take_lock() {
    mkdir -p "$CASSANDRA_HOME"
    exec 9>"$CASSANDRA_HOME/.lock"
    if command -v flock >/dev/null; then
        flock -w 600 9 || die "timed out waiting for $CASSANDRA_HOME/.lock"
    fi
}

# ---------------------------------------------------------------- install

# What the cache depends on: a change to any of these re-installs.
install_fingerprint() {
    echo "version=$CASSANDRA_VERSION"
    cat "$ASSETS/pom.xml" "$ASSETS/CqlCheck.java" | sha256sum | cut -d' ' -f1
}

cmd_install() {
    if [[ -f "$STAMP" && -f "$LIB_DIR/cassandra-all-$CASSANDRA_VERSION.jar" &&
          "$(cat "$STAMP")" == "$(install_fingerprint)" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found (Maven is needed to fetch Cassandra)"
    command -v javac >/dev/null || die "javac not found (a JDK 17 is needed)"
    log "installing Cassandra $CASSANDRA_VERSION from Maven Central into $LIB_DIR"

    # Build into a temp dir and swap it in, so an interrupted install never
    # leaves a half-filled lib/ that looks complete.
    local tmp="$CASSANDRA_HOME/.install.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    if ! mvn -q -B -f "$ASSETS/pom.xml" \
            -Dcassandra.version="$CASSANDRA_VERSION" \
            dependency:copy-dependencies \
            -DincludeScope=runtime \
            -DoutputDirectory="$tmp/lib" >"$tmp/mvn.log" 2>&1; then
        tail -n 40 "$tmp/mvn.log" >&2
        die "Maven could not fetch org.apache.cassandra:cassandra-all:$CASSANDRA_VERSION"
    fi
    [[ -f "$tmp/lib/cassandra-all-$CASSANDRA_VERSION.jar" ]] \
        || die "Maven finished but cassandra-all-$CASSANDRA_VERSION.jar is missing"

    # The readiness check and `cql` use the DataStax driver that cassandra-all
    # already depends on: no Python, no extra download.
    mkdir -p "$tmp/tools"
    javac -nowarn -d "$tmp/tools" -cp "$tmp/lib/*" "$ASSETS/CqlCheck.java" \
        || die "could not compile CqlCheck.java"

    rm -rf "$LIB_DIR" "$TOOLS_DIR"
    mv "$tmp/lib" "$LIB_DIR"
    mv "$tmp/tools" "$TOOLS_DIR"
    rm -rf "$tmp"
    install_fingerprint >"$STAMP"
    local jars=("$LIB_DIR"/*.jar)
    log "installed ${#jars[@]} jars ($(du -sh "$LIB_DIR" | cut -f1))"
}

# ---------------------------------------------------------------- process state

# The pid from the pidfile, only if that process is alive and is *our*
# Cassandra (guards against a stale pidfile whose pid was reused).
running_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *CassandraDaemon* && "$cmdline" == *"-Dcassandra.storagedir=$DATA_DIR "* ]] || return 1
    echo "$pid"
}

# True while the process exists and is not a zombie. The daemon outlives the
# shell that started it, so after it dies it waits as a zombie until its new
# parent (PID 1 or a subreaper) reaps it, and `kill -0` would still succeed.
alive() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# True if the process is stopped by SIGSTOP (state T in /proc/PID/stat).
is_paused() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ "$state" == T ]]
}

port_open() {
    # bash's /dev/tcp: no nc/ss needed on a fresh machine.
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# Run CQL through the compiled driver client. Extra args are statements.
cql() {
    java -Xms32m -Xmx256m -XX:TieredStopAtLevel=1 -Xshare:auto \
        -Djava.net.preferIPv4Stack=true \
        -cp "$TOOLS_DIR:$LIB_DIR/*" CqlCheck "$HOST" "$CASSANDRA_PORT" "$@"
}

# A real query, not just an open port: the native port opens a moment before
# the node can serve reads of system tables.
cql_healthy() {
    port_open "$CASSANDRA_PORT" && cql >/dev/null 2>&1
}

# ---------------------------------------------------------------- config

render_config() {
    mkdir -p "$CONF_DIR/triggers" "$DATA_DIR" "$LOG_DIR"
    sed -e "s|@RUN_DIR@|$CASSANDRA_HOME|g" \
        -e "s|@NATIVE_PORT@|$CASSANDRA_PORT|g" \
        -e "s|@STORAGE_PORT@|$CASSANDRA_STORAGE_PORT|g" \
        "$ASSETS/cassandra.yaml.in" >"$CONF_DIR/cassandra.yaml"
    cp "$ASSETS/logback.xml" "$CONF_DIR/logback.xml"
}

# JVM flags, filling the global array JVM_OPTS. The --add-exports and
# --add-opens lines are exactly the JPMS section of Cassandra's
# conf/jvm17-server.options: Cassandra reaches into JDK internals (Unsafe,
# direct-buffer cleaners, RMI, javac for UDFs) and without them dies at once
# on Java 17 (IllegalAccessException on sun.nio.ch.DirectBuffer.cleaner).
jvm_opts() {
    local jamm=("$LIB_DIR"/jamm-*.jar)
    [[ -f "${jamm[0]}" ]] || die "no jamm jar in $LIB_DIR (re-run install)"
    JVM_OPTS=(
        # A small initial heap: G1 grows it on demand, and a large -Xms ends up
        # fully resident after the start-up allocation churn.
        -Xms256m "-Xmx$CASSANDRA_HEAP" -Xss256k
        -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1
        -XX:+PerfDisableSharedMem -XX:+ExitOnOutOfMemoryError
        # jamm measures object sizes for memtable accounting; Cassandra's own
        # launcher always loads it as an agent.
        "-javaagent:${jamm[0]}"
        -Djava.net.preferIPv4Stack=true
        -Djdk.attach.allowAttachSelf=true
        --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
        --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
        --add-exports java.sql/java.sql=ALL-UNNAMED
        --add-exports java.base/java.lang.ref=ALL-UNNAMED
        --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
        --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
        --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
        --add-opens java.base/java.lang.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
        --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
        --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
        --add-opens java.base/jdk.internal.math=ALL-UNNAMED
        --add-opens java.base/jdk.internal.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
        --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
        --add-opens java.base/sun.nio.ch=ALL-UNNAMED
        --add-opens java.base/java.io=ALL-UNNAMED
        --add-opens java.base/java.lang=ALL-UNNAMED
        --add-opens java.base/java.lang.reflect=ALL-UNNAMED
        --add-opens java.base/java.util=ALL-UNNAMED
        --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
        # Netty: allow Unsafe-backed direct buffers (as jvm17-server.options).
        -Dio.netty.tryReflectionSetAccessible=true
        -Dio.netty.allocator.useCacheForAllThreads=true
        -Dio.netty.allocator.maxOrder=11
        # Where things live.
        "-Dcassandra.config=file://$CONF_DIR/cassandra.yaml"
        "-Dlogback.configurationFile=$CONF_DIR/logback.xml"
        "-Dcassandra.logdir=$LOG_DIR"
        "-Dcassandra.storagedir=$DATA_DIR"
        "-Dcassandra-pidfile=$PID_FILE"
        # Otherwise it warns every few seconds that the directory is missing.
        "-Dcassandra.triggers_dir=$CONF_DIR/triggers"
        # Keep stdout/stderr open (they go to logs/stdout.log): fatal start-up
        # errors are printed there before logging is up.
        -Dcassandra-foreground=yes
        # A lone seed has no one to gossip with: never wait for gossip to
        # settle (measured no gain here today, but it rules out the wait),
        # and set up the default role at once rather than after 10 s.
        -Dcassandra.skip_wait_for_gossip_to_settle=0
        -Dcassandra.superuser_setup_delay_ms=0
        # On SIGTERM it would sleep 2 s announcing the shutdown to peers it
        # does not have.
        -Dcassandra.shutdown_announce_in_ms=0
        # No JMX: neither cassandra.jmx.local.port nor .remote.port is set,
        # so Cassandra opens no JMX port (nothing here uses nodetool).
    )
}

# ---------------------------------------------------------------- start / stop

# Wait until CQL answers or the deadline passes; fail early if the JVM dies.
wait_healthy() {
    local pid="$1" deadline=$((SECONDS + CASSANDRA_START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! alive "$pid"; then
            show_logs
            die "Cassandra (pid $pid) exited during start-up; logs above, full ones in $LOG_DIR"
        fi
        # Cheap checks first; starting the driver JVM costs ~1 s.
        if port_open "$CASSANDRA_PORT" && cql_healthy; then
            return 0
        fi
        sleep 0.5
    done
    show_logs
    die "Cassandra did not answer CQL on $HOST:$CASSANDRA_PORT within ${CASSANDRA_START_TIMEOUT}s (pid $pid still running; see $LOG_DIR)"
}

show_logs() {
    local f
    for f in "$LOG_DIR/stdout.log" "$LOG_DIR/system.log"; do
        [[ -s "$f" ]] || continue
        log "--- last lines of $f"
        tail -n 30 "$f" >&2
    done
}

cmd_start() {
    cmd_install
    local pid
    if pid="$(running_pid)"; then
        if is_paused "$pid"; then
            log "node (pid $pid) was paused; resuming it"
            kill -CONT "$pid"
        fi
        wait_healthy "$pid"
        cmd_nodes
        return 0
    fi
    rm -f "$PID_FILE"
    if port_open "$CASSANDRA_PORT"; then
        die "port $CASSANDRA_PORT is already in use, but not by the Cassandra of $CASSANDRA_HOME (set CASSANDRA_PORT, or stop the other one)"
    fi
    if port_open "$CASSANDRA_STORAGE_PORT"; then
        die "storage port $CASSANDRA_STORAGE_PORT is already in use (set CASSANDRA_STORAGE_PORT)"
    fi

    render_config
    jvm_opts
    log "starting Cassandra $CASSANDRA_VERSION on $HOST:$CASSANDRA_PORT (home $CASSANDRA_HOME)"
    local t0=$SECONDS
    # setsid: its own session, so a Ctrl-C or hang-up aimed at the caller does
    # not reach it. stdin/stdout/stderr and the lock fd are all redirected or
    # closed, so `$(cassandra.sh start | tail -1)` returns instead of waiting
    # on a pipe the daemon would otherwise hold open.
    setsid java "${JVM_OPTS[@]}" -cp "$LIB_DIR/*" org.apache.cassandra.service.CassandraDaemon \
        </dev/null >>"$LOG_DIR/stdout.log" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$PID_FILE"
    wait_healthy "$pid"
    log "CQL is up after $((SECONDS - t0))s (pid $pid)"
    cmd_nodes
}

cmd_stop() {
    local wipe=0 grace=60 arg
    for arg in "$@"; do
        case "$arg" in
            --wipe) wipe=1 ;;
            --kill) grace=0 ;;
            *) die "usage: $0 stop [--wipe] [--kill]" ;;
        esac
    done
    local pid
    if pid="$(running_pid)"; then
        # A stopped process would only act on SIGTERM once continued.
        kill -CONT "$pid" 2>/dev/null || true
        ((grace == 0)) || kill -TERM "$pid" 2>/dev/null || true
        # Cassandra's shutdown hook drains and flushes (about 3-5 s here);
        # give it up to 30 s (grace counts 0.5 s steps).
        local i
        for ((i = 0; i < grace; i++)); do
            alive "$pid" || break
            sleep 0.5
        done
        if alive "$pid"; then
            ((grace == 0)) || log "pid $pid ignored SIGTERM for 30s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 20; i++)); do
                alive "$pid" || break
                sleep 0.25
            done
        fi
        log "stopped (pid $pid)"
    else
        log "not running"
    fi
    rm -f "$PID_FILE"
    if ((wipe)); then
        rm -rf "$DATA_DIR" "$LOG_DIR" "$CONF_DIR"
        log "wiped data and logs under $CASSANDRA_HOME"
    fi
}

cmd_pause() {
    local pid
    pid="$(running_pid)" || die "not running"
    kill -STOP "$pid"
    log "paused (pid $pid): CQL connections will hang until resume"
}

cmd_resume() {
    local pid
    pid="$(running_pid)" || die "not running (use start)"
    kill -CONT "$pid"
    wait_healthy "$pid"
    log "resumed (pid $pid)"
}

cmd_status() {
    local pid
    if ! pid="$(running_pid)"; then
        echo "stopped"
        return 3
    fi
    if is_paused "$pid"; then
        echo "paused (pid $pid)"
        return 1
    fi
    if cql_healthy; then
        echo "running (pid $pid) $(cmd_nodes)"
        return 0
    fi
    echo "starting or unhealthy (pid $pid)"
    return 1
}

cmd_cql() {
    (($# > 0)) || die "usage: $0 cql STATEMENT..."
    [[ -f "$STAMP" ]] || die "not installed (run: $0 install)"
    cql "$@"
}

cmd_nodes() { echo "$HOST:$CASSANDRA_PORT"; }

usage() {
    sed -n '/^# Usage:/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

main() {
    local cmd="${1:-}"
    (($# > 0)) && shift
    case "$cmd" in
        install) take_lock; cmd_install ;;
        start) take_lock; cmd_start ;;
        stop) take_lock; cmd_stop "$@" ;;
        pause) take_lock; cmd_pause ;;
        resume) take_lock; cmd_resume ;;
        status) cmd_status ;;
        cql) cmd_cql "$@" ;;
        nodes) cmd_nodes ;;
        *) usage ;;
    esac
}

main "$@"
