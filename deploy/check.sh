#!/usr/bin/env bash
# Checks the deployment artefacts without deploying them:
#   - Dockerfile: multi-stage, no `latest` or untagged base image, a non-root
#     USER in the final stage, a pinned ENTRYPOINT, .dockerignore present
#   - deploy/k8s/*.yaml: parsed with PyYAML; Deployment with gRPC readiness,
#     liveness and startup probes, termination grace that covers the drain,
#     PRESENCE_JWT_SECRET from a Secret, settings from a ConfigMap, non-root;
#     a PodDisruptionBudget and a Service selecting the pods
#   - deploy/systemd/presence.service: `systemd-analyze verify`, if present,
#     plus the same drain rule
#   - deploy/nginx/presence.conf: `nginx -t` with placeholder certificates
# No image is built: no container registry is reachable from the development
# machine, so the base images cannot be pulled. Exits non-zero on a failure.
set -euo pipefail

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$DEPLOY/.." && pwd -P)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "check: PyYAML missing; installing python3-yaml (Debian) or PyYAML (PyPI)" >&2
  { command -v apt-get >/dev/null && apt-get -qq install -y python3-yaml >/dev/null 2>&1; } ||
    python3 -m pip install -q PyYAML >&2
fi

python3 - "$REPO" <<'PY'
import glob, os, re, sys
import yaml

repo = sys.argv[1]
failures = []
def check(ok, what):
    print(("  ok    " if ok else "  FAIL  ") + what)
    if not ok:
        failures.append(what)

def seconds(value):
    m = re.fullmatch(r"(\d+)(ms|s|m)?", str(value))
    n = int(m.group(1)); unit = m.group(2) or "s"
    return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n

# Drain after SIGTERM (server/src/lib.rs): grace + DRAIN_STRAGGLERS (3 s) +
# sessions lingering grace + 2 sweeps + history flush (<= 10 s).
STRAGGLERS, FLUSH, SWEEPS = 3, 10, 1
def drain_seconds(grace):
    return grace + STRAGGLERS + grace + SWEEPS + FLUSH

print("Dockerfile")
lines = [l.strip() for l in open(os.path.join(repo, "Dockerfile")) if l.strip() and not l.strip().startswith("#")]
froms = [l.split()[1] for l in lines if l.upper().startswith("FROM ")]
check(len(froms) >= 2, f"multi-stage ({len(froms)} stages)")
for image in froms:
    tag = image.rsplit("/", 1)[-1]
    check(":" in tag or "@sha256:" in image, f"base image {image} has a tag or digest")
    check(not tag.endswith(":latest"), f"base image {image} is not :latest")
final = lines[max(i for i, l in enumerate(lines) if l.upper().startswith("FROM ")):]
users = [l.split()[1] for l in final if l.upper().startswith("USER ")]
check(bool(users) and users[-1].split(":")[0] not in ("root", "0"), f"final stage runs as non-root USER ({users[-1] if users else 'none'})")
check(any(l.upper().startswith("ENTRYPOINT [") for l in final), "exec-form ENTRYPOINT in the final stage")
check(any("--locked" in l for l in lines), "cargo build --locked (the committed Cargo.lock)")
check(os.path.exists(os.path.join(repo, ".dockerignore")), ".dockerignore keeps target/ out of the context")

print("Kubernetes manifests (deploy/k8s)")
docs = []
for path in sorted(glob.glob(os.path.join(repo, "deploy/k8s/*.yaml"))):
    for doc in yaml.safe_load_all(open(path)):
        if doc:
            docs.append(doc)
kinds = {}
for d in docs:
    kinds.setdefault(d["kind"], []).append(d)
check("Deployment" in kinds or "StatefulSet" in kinds, "a Deployment or StatefulSet")
workload = (kinds.get("Deployment") or kinds.get("StatefulSet"))[0]
labels = workload["spec"]["selector"]["matchLabels"]
pod = workload["spec"]["template"]["spec"]
check(workload["spec"].get("replicas", 1) >= 2, f"N nodes: replicas {workload['spec'].get('replicas')}")
check(workload["spec"]["template"]["metadata"]["labels"].items() >= labels.items(), "pod labels match the selector")
container = pod["containers"][0]
check(":latest" not in container["image"] and ":" in container["image"].rsplit("/", 1)[-1], f"image tag pinned ({container['image']})")
ready = container.get("readinessProbe", {})
check("grpc" in ready and ready["grpc"].get("service") == "presence.v1.PresenceService", "readiness: gRPC health probe of presence.v1.PresenceService")
check("grpc" in container.get("livenessProbe", {}), "liveness: gRPC health probe")
ports = {p["containerPort"] for p in container.get("ports", [])}
check(ready.get("grpc", {}).get("port") in ports, "the probe's port is a container port")
env = {e["name"]: e for e in container.get("env", [])}
secret_refs = [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]
config_refs = [s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s]
secrets = {d["metadata"]["name"]: d for d in kinds.get("Secret", [])}
configmaps = {d["metadata"]["name"]: d for d in kinds.get("ConfigMap", [])}
jwt_from_secret = any("PRESENCE_JWT_SECRET" in {**secrets.get(n, {}).get("stringData", {}), **secrets.get(n, {}).get("data", {})} for n in secret_refs) \
    or env.get("PRESENCE_JWT_SECRET", {}).get("valueFrom", {}).get("secretKeyRef")
check(bool(jwt_from_secret), "PRESENCE_JWT_SECRET comes from a Secret")
check("PRESENCE_JWT_SECRET" not in str(configmaps) and "value" not in env.get("PRESENCE_JWT_SECRET", {}), "the JWT secret is in no ConfigMap and no plain env value")
check(bool(config_refs) and all(n in configmaps for n in config_refs), f"settings from a ConfigMap ({config_refs})")
config = {}
for n in config_refs:
    config.update(configmaps[n].get("data", {}))
grace = seconds(config.get("PRESENCE_GRACE", "1s"))
pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
needed = pre_stop + drain_seconds(grace)
tgps = pod.get("terminationGracePeriodSeconds", 30)
check(tgps >= needed, f"terminationGracePeriodSeconds {tgps} >= preStop {pre_stop} + drain {drain_seconds(grace)} (grace {grace}s)")
check(tgps <= needed + 30, f"terminationGracePeriodSeconds {tgps} not far above the drain ({needed})")
sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
check(sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, "pods run as non-root")
check(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False, "read-only root, no privilege escalation")
strategy = workload["spec"].get("strategy", {}).get("rollingUpdate", {})
check(str(strategy.get("maxUnavailable", "25%")) == "0", "rolling update keeps every node until its replacement is ready (maxUnavailable 0)")
pdbs = kinds.get("PodDisruptionBudget", [])
check(any(p["spec"]["selector"]["matchLabels"] == labels for p in pdbs), "a PodDisruptionBudget selects the pods")
check(any("maxUnavailable" in p["spec"] or "minAvailable" in p["spec"] for p in pdbs), "the budget bounds disruptions")
services = kinds.get("Service", [])
check(any(s["spec"]["selector"] == labels and any(p["targetPort"] in ("grpc", 50051) for p in s["spec"]["ports"]) for s in services), "a Service selects the pods on the gRPC port")

print("systemd unit (deploy/systemd/presence.service)")
unit = open(os.path.join(repo, "deploy/systemd/presence.service")).read()
def directive(name):
    m = re.findall(rf"^{name}=(.*)$", unit, re.M)
    return m[-1].strip() if m else None
check(directive("KillSignal") == "SIGTERM", "KillSignal=SIGTERM (drains)")
check(int(directive("TimeoutStopSec") or 0) >= drain_seconds(1), f"TimeoutStopSec {directive('TimeoutStopSec')} >= drain {drain_seconds(1)}")
check(directive("DynamicUser") == "yes" or directive("User") not in (None, "root"), "runs as an unprivileged user")
check(directive("Restart") in ("on-failure", "always"), "restarted when it exits non-zero")
check(int(directive("LimitNOFILE") or 0) >= 65536, "LimitNOFILE raised (one file per connection)")

if failures:
    print(f"{len(failures)} check(s) failed")
    sys.exit(1)
PY

echo "systemd-analyze verify"
if command -v systemd-analyze >/dev/null 2>&1; then
  # The binary and the environment file do not exist here: point the unit at
  # stand-ins so verify checks the unit itself.
  sed -e "s|^ExecStart=/usr/local/bin/presence-server|ExecStart=/bin/true|" \
      -e "s|^EnvironmentFile=|EnvironmentFile=-|" \
      "$DEPLOY/systemd/presence.service" >"$TMP/presence.service"
  if out=$(systemd-analyze verify "$TMP/presence.service" 2>&1) && [ -z "$out" ]; then
    echo "  ok    systemd-analyze verify: no complaints"
  else
    echo "  FAIL  systemd-analyze verify:"; echo "$out" | sed 's/^/        /'; exit 1
  fi
else
  echo "  skip  systemd-analyze not installed (the unit's rules were checked above)"
fi

echo "nginx (deploy/nginx/presence.conf)"
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  nginx=$(command -v nginx || echo /usr/sbin/nginx)
  mkdir -p "$TMP/nginx/logs" "$TMP/nginx/tmp"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=presence.example.com \
    -keyout "$TMP/nginx/key.pem" -out "$TMP/nginx/cert.pem" 2>/dev/null
  # The production paths point at /etc/ssl and /var/log: rewritten to the
  # temp dir so the check runs unprivileged and touches nothing.
  sed -e "s|/etc/ssl/presence/fullchain.pem|$TMP/nginx/cert.pem|" \
      -e "s|/etc/ssl/presence/privkey.pem|$TMP/nginx/key.pem|" \
      -e "s|/var/log/nginx/|$TMP/nginx/logs/|" \
      "$DEPLOY/nginx/presence.conf" >"$TMP/nginx/presence.conf"
  cat >"$TMP/nginx/nginx.conf" <<CONF
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log;
events {}
http {
  client_body_temp_path $TMP/nginx/tmp;
  proxy_temp_path $TMP/nginx/tmp;
  include $TMP/nginx/presence.conf;
}
CONF
  if out=$("$nginx" -t -q -p "$TMP/nginx" -e "$TMP/nginx/logs/error.log" -c "$TMP/nginx/nginx.conf" 2>&1); then
    echo "  ok    nginx -t accepts the production config"
  else
    echo "  FAIL  nginx -t:"; echo "$out" | sed 's/^/        /'; exit 1
  fi
else
  echo "  skip  nginx not installed (e2e/scripts/gateway.sh install)"
fi

echo "container image: NOT built. No container registry is reachable from this machine, so the"
echo "base images (rust:1.95-bookworm, gcr.io/distroless/cc-debian12:nonroot) cannot be pulled;"
echo "the Dockerfile was checked by the rules above instead. Build it where a registry is reachable:"
echo "  docker build -t presence-server ."
echo "all deployment checks passed"
