#!/usr/bin/env bash
# nginx as the TLS gateway in front of N presence nodes, for the e2e tests and
# for trying a multi-node setup by hand. Installs nginx from Debian's apt if
# missing; never touches the system's nginx (its own prefix, config, pid and
# logs under the run dir).
#
#   gateway.sh install                 apt-get install nginx-light (or nginx) if missing
#   gateway.sh start HOST:PORT...      write a test CA and certificate (once), the config
#                                      from e2e/gateway/nginx.conf.template, and start
#                                      nginx; prints the gateway URL as the last stdout line
#   gateway.sh reload HOST:PORT...     rewrite the upstream list and reload (open streams
#                                      stay on the old workers until they end)
#   gateway.sh status                  whether it runs, its upstreams, /healthz
#   gateway.sh url                     print the gateway URL only
#   gateway.sh stop                    stop nginx and remove the run dir but its logs/
#
# Nodes may also come from PRESENCE_GATEWAY_UPSTREAMS (comma-separated).
#
# Environment:
#   GATEWAY_PORT           TLS port to listen on (default 54443)
#   GATEWAY_HOST           address to listen on (default 127.0.0.1)
#   GATEWAY_DIR            run dir (default <repo>/.run/gateway-<port>)
#   GATEWAY_CONN_PER_IP    concurrent requests (HTTP/2 streams) per client address (default 10000)
#   GATEWAY_REQ_PER_SEC    new calls per second per client address (default 1000)
#   GATEWAY_REQ_BURST      burst above that rate, served at once (default 5000)
#   GATEWAY_WORKERS        nginx worker processes (default 1)
#   GATEWAY_MTLS           1: clients must present a certificate signed by the test CA
#                          (<run dir>/tls/client.pem and client.key are one)
#
# The certificate is for "localhost" and 127.0.0.1, signed by a throw-away CA:
# <run dir>/tls/ca.pem is what clients trust (the SDK's TlsConfig::ca_cert_pem,
# the CLI's --ca-cert). All log output goes to stderr.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd -P)
TEMPLATE=$REPO_ROOT/e2e/gateway/nginx.conf.template

HOST=${GATEWAY_HOST:-127.0.0.1}
PORT=${GATEWAY_PORT:-54443}
RUN_DIR=$(readlink -m "${GATEWAY_DIR:-$REPO_ROOT/.run/gateway-$PORT}")
CONN_PER_IP=${GATEWAY_CONN_PER_IP:-10000}
REQ_PER_SEC=${GATEWAY_REQ_PER_SEC:-1000}
REQ_BURST=${GATEWAY_REQ_BURST:-5000}
WORKERS=${GATEWAY_WORKERS:-1}
MTLS=${GATEWAY_MTLS:-0}
NGINX=${NGINX:-nginx}

log() { printf 'gateway: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

validate_env() {
  local name value
  for name in PORT CONN_PER_IP REQ_PER_SEC REQ_BURST WORKERS MTLS; do
    value=${!name}
    case $value in '' | *[!0-9]*) die "GATEWAY_$name must be a number, got '$value'" ;; esac
  done
  [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "GATEWAY_PORT out of range: $PORT"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root (or passwordless sudo) to install nginx"
  fi
}

nginx_bin() {
  if command -v "$NGINX" >/dev/null 2>&1; then command -v "$NGINX"
  elif [ -x /usr/sbin/nginx ]; then echo /usr/sbin/nginx
  else return 1
  fi
}

cmd_install() {
  if nginx_bin >/dev/null; then
    need_modules
    return 0
  fi
  have apt-get || die "nginx missing and no apt-get to install it"
  log "installing nginx with apt-get"
  # The package's postinst would start the system nginx on port 80 (no
  # systemd here: invoke-rc.d); a policy-rc.d that forbids it, if none exists.
  local ours=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod 755 /usr/sbin/policy-rc.d
    ours=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -qq update >&2 ||
    die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -qq -y \
    --no-install-recommends install nginx openssl </dev/null >&2 || die "apt-get install nginx failed"
  [ -n "$ours" ] && as_root rm -f /usr/sbin/policy-rc.d
  nginx_bin >/dev/null || die "nginx installed but not found"
  need_modules
  log "installed $("$(nginx_bin)" -v 2>&1)"
}

# grpc_pass, HTTP/2 and TLS are compiled-in modules; say so if a build lacks one.
need_modules() {
  local v
  v=$("$(nginx_bin)" -V 2>&1)
  grep -q -- --with-http_v2_module <<<"$v" || die "this nginx has no HTTP/2 module"
  grep -q -- --with-http_ssl_module <<<"$v" || die "this nginx has no TLS module"
  grep -q -- --without-http_grpc_module <<<"$v" && die "this nginx has no grpc module"
  have openssl || die "openssl missing (apt-get install openssl)"
}

pid_of() {
  local pid
  pid=$(cat "$RUN_DIR/nginx.pid" 2>/dev/null || true)
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = nginx ] && echo "$pid"
  return 0
}

# A throw-away CA and a server certificate for localhost/127.0.0.1, made once
# per run dir and reused by later starts.
make_certs() {
  local tls=$RUN_DIR/tls
  [ -s "$tls/server.pem" ] && [ -s "$tls/ca.pem" ] && [ -s "$tls/client.pem" ] && return 0
  mkdir -p "$tls"
  log "generating a test CA and server certificate in $tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=presence test CA" \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null || die "openssl could not make the CA"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null ||
    die "openssl could not make the server key"
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:$HOST" >"$tls/server.ext"
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 7 -extfile "$tls/server.ext" -out "$tls/server.pem" 2>/dev/null ||
    die "openssl could not sign the server certificate"
  # A client certificate from the same CA, for mTLS (GATEWAY_MTLS=1).
  openssl req -newkey rsa:2048 -nodes -subj "/CN=presence test client" \
    -keyout "$tls/client.key" -out "$tls/client.csr" 2>/dev/null ||
    die "openssl could not make the client key"
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=clientAuth" >"$tls/client.ext"
  openssl x509 -req -in "$tls/client.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 7 -extfile "$tls/client.ext" -out "$tls/client.pem" 2>/dev/null ||
    die "openssl could not sign the client certificate"
  chmod 600 "$tls"/*.key
}

upstreams_from() {
  local list=("$@")
  if [ ${#list[@]} -eq 0 ] && [ -n "${PRESENCE_GATEWAY_UPSTREAMS:-}" ]; then
    IFS=, read -r -a list <<<"$PRESENCE_GATEWAY_UPSTREAMS"
  fi
  [ ${#list[@]} -gt 0 ] || die "no upstream nodes: give HOST:PORT arguments or PRESENCE_GATEWAY_UPSTREAMS"
  local node
  for node in "${list[@]}"; do
    node=${node#http://}
    node=${node%/}
    [[ $node =~ ^[A-Za-z0-9._-]+:[0-9]+$ ]] || die "bad upstream '$node' (expected HOST:PORT)"
    # max_fails/fail_timeout: a node that refused a connection is skipped
    # for 2 s, so a draining or dead node stops getting new calls at once.
    printf '        server %s max_fails=1 fail_timeout=2s;\n' "$node"
  done
}

write_config() {
  local servers user_directive=
  servers=$(upstreams_from "$@")
  mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp"
  # As root, the workers would run as nobody and could not write the run
  # dir; run them as the caller instead.
  [ "$(id -u)" -eq 0 ] && user_directive="user root;"
  local client_verify="# Client certificates: not asked for (GATEWAY_MTLS=1 requires them)."
  if [ "$MTLS" = 1 ]; then
    client_verify="ssl_client_certificate $RUN_DIR/tls/ca.pem; ssl_verify_client on;"
  fi
  local streams=1000 nofile=20000
  local worker_connections=$((nofile - 100))
  awk -v run="$RUN_DIR" -v listen="$HOST:$PORT" -v cert="$RUN_DIR/tls/server.pem" \
    -v key="$RUN_DIR/tls/server.key" -v servers="$servers" -v user="$user_directive" \
    -v workers="$WORKERS" -v nofile="$nofile" -v wc="$worker_connections" -v streams="$streams" \
    -v conn="$CONN_PER_IP" -v rate="$REQ_PER_SEC" -v burst="$REQ_BURST" -v verify="$client_verify" '
    {
      gsub(/@RUN_DIR@/, run); gsub(/@LISTEN@/, listen); gsub(/@CERT@/, cert); gsub(/@KEY@/, key)
      gsub(/@USER_DIRECTIVE@/, user); gsub(/@WORKERS@/, workers); gsub(/@NOFILE@/, nofile)
      gsub(/@WORKER_CONNECTIONS@/, wc); gsub(/@STREAMS_PER_CONN@/, streams)
      gsub(/@CONN_PER_IP@/, conn); gsub(/@REQ_PER_SEC@/, rate); gsub(/@REQ_BURST@/, burst)
      gsub(/@CLIENT_VERIFY@/, verify)
      if ($0 ~ /@UPSTREAM_SERVERS@/) { print servers; next }
      print
    }' "$TEMPLATE" >"$RUN_DIR/nginx.conf.new"
  ! grep -n '@[A-Z_]*@' "$RUN_DIR/nginx.conf.new" >&2 || die "unreplaced placeholder in the config"
  "$(nginx_bin)" -t -q -p "$RUN_DIR" -e "$RUN_DIR/logs/error.log" -c "$RUN_DIR/nginx.conf.new" ||
    die "nginx rejects the generated config ($RUN_DIR/nginx.conf.new)"
  mv "$RUN_DIR/nginx.conf.new" "$RUN_DIR/nginx.conf"
}

healthz() {
  # The client certificate is sent in case GATEWAY_MTLS=1 requires one.
  curl -sS --max-time 2 --cacert "$RUN_DIR/tls/ca.pem" --cert "$RUN_DIR/tls/client.pem" \
    --key "$RUN_DIR/tls/client.key" "https://$HOST:$PORT/healthz" 2>/dev/null
}

url() { printf 'https://%s:%s\n' "$HOST" "$PORT"; }

cmd_start() {
  cmd_install
  local pid
  pid=$(pid_of)
  [ -z "$pid" ] || die "already running (pid $pid); use reload or stop"
  if (: <"/dev/tcp/$HOST/$PORT") 2>/dev/null; then die "port $PORT is in use; set GATEWAY_PORT"; fi
  mkdir -p "$RUN_DIR"
  make_certs
  write_config "$@"
  # nginx daemonises itself (master + workers) and writes its pid file.
  "$(nginx_bin)" -p "$RUN_DIR" -e "$RUN_DIR/logs/error.log" -c "$RUN_DIR/nginx.conf" ||
    die "nginx did not start; see $RUN_DIR/logs/error.log"
  local i
  for i in $(seq 100); do
    [ "$(healthz)" = ok ] && break
    sleep 0.1
  done
  if [ "$(healthz)" != ok ]; then
    kill -TERM "$(pid_of)" 2>/dev/null || true
    die "nginx started but /healthz does not answer (stopped it again); see $RUN_DIR/logs/error.log"
  fi
  log "nginx (pid $(pid_of)) on $(url), upstreams: $(grep '^ *server .*max_fails' "$RUN_DIR/nginx.conf" | sort -u | wc -l), CA $RUN_DIR/tls/ca.pem"
  url
}

cmd_reload() {
  local pid
  pid=$(pid_of)
  [ -n "$pid" ] || die "not running"
  write_config "$@"
  kill -HUP "$pid"
  log "reloaded (pid $pid)"
}

cmd_status() {
  local pid
  pid=$(pid_of)
  if [ -z "$pid" ]; then log "not running ($RUN_DIR)"; return 1; fi
  log "running: pid $pid, $(url), run dir $RUN_DIR"
  grep '^ *server .*max_fails' "$RUN_DIR/nginx.conf" | sort -u | sed 's/^ */gateway: upstream /' >&2
  log "/healthz: $(healthz || echo 'no answer')"
}

cmd_stop() {
  local pid i
  pid=$(pid_of)
  if [ -n "$pid" ]; then
    # QUIT: graceful; open streams get a few seconds, then TERM.
    kill -QUIT "$pid" 2>/dev/null || true
    for i in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ -d "/proc/$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    log "stopped nginx (pid $pid); logs kept in $RUN_DIR/logs"
  fi
  # The logs stay for a look after a failed test; the rest goes.
  [ -d "$RUN_DIR" ] && find "$RUN_DIR" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  return 0
}

main() {
  validate_env
  local command=${1:-}
  [ $# -gt 0 ] && shift
  case $command in
    install) cmd_install ;;
    start) cmd_start "$@" ;;
    reload) cmd_reload "$@" ;;
    status) cmd_status ;;
    url) url ;;
    stop) cmd_stop ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
}

main "$@"
