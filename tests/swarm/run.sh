#!/usr/bin/env bash
# Real-Swarm tier for pyroute (opt-in: PYROUTE_SWARM_E2E=1). See README.md.
#
# Starts a private dockerd in swarm mode on loopback, builds pyroute's image from the
# repo's Dockerfile (on a Debian base made with debootstrap: no registry here), deploys a
# 3-replica go-demo-like service labelled com.df.*, runs the image as a container on the
# same overlay (built-in Swarm listener + task balancing + sticky sessions) and runs
# check.py in its network namespace, then deploys both stack files with the image.
# Tears everything down on exit, failure included. Needs no Python packages on the host:
# everything pyroute runs comes from the image (check.py is stdlib only).
set -euo pipefail

if [ "${PYROUTE_SWARM_E2E:-}" != 1 ]; then
  echo "skipped: set PYROUTE_SWARM_E2E=1 to run the real-Swarm tier (needs root; installs docker.io)" >&2
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "the real-Swarm tier must run as root" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=${PYROUTE_SWARM_DIR:-/tmp/pyroute-swarm-e2e}
CACHE=${PYROUTE_SWARM_CACHE:-/var/cache/pyroute-swarm}  # the debootstrap base, kept between runs
IMAGE=pyroute:latest  # the stack files' default image (PYROUTE_IMAGE unset)
SOCK="$STATE/docker.sock"
DATA="$STATE/data"
EXEC="$STATE/exec"
APP="$STATE/app"
export DOCKER_HOST="unix://$SOCK"
DOCKER=/usr/bin/docker  # the CLI that ships with the daemon (API 1.41)
T0=$(date +%s.%N)
log() { printf '[swarm-e2e %5ss] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%.1f", a-b}')" "$*" >&2; }
dk() { "$DOCKER" "$@"; }
DOCKERD_PID=""

teardown() {
  local rc=$?
  set +e
  log "teardown (exit status $rc)"
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    if [ "$rc" != 0 ]; then
      for c in $( (dk ps -aq --filter name=probe --filter ancestor="$IMAGE"
                   dk ps -aq --filter label=com.docker.swarm.service.name=proxy_proxy
                   dk ps -aq --filter label=com.docker.swarm.service.name=dfsl_proxy) 2>/dev/null); do
        log "log of container $(dk inspect -f '{{.Name}}' "$c" 2>&1) (tail):"; dk logs --tail 25 "$c" >&2 2>&1
      done
    fi
    svcs=$(dk service ls -q 2>/dev/null); [ -z "$svcs" ] || dk service rm $svcs >/dev/null 2>&1
    ctrs=$(dk ps -aq 2>/dev/null); [ -z "$ctrs" ] || dk rm -f $ctrs >/dev/null 2>&1
    for _ in $(seq 50); do [ -z "$(dk ps -aq 2>/dev/null)" ] && break; sleep 0.2; done
    timeout 30 "$DOCKER" swarm leave --force >/dev/null 2>&1
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 200); do kill -0 "$DOCKERD_PID" 2>/dev/null || break
      [ "$(awk '{print $3}' /proc/$DOCKERD_PID/stat 2>/dev/null)" = Z ] && break; sleep 0.1; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && [ "$(awk '{print $3}' /proc/$DOCKERD_PID/stat 2>/dev/null)" != Z ] \
      && kill -KILL "$DOCKERD_PID"
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  # containerd and shims started by our dockerd name our state dir: end them by pid
  for p in /proc/[0-9]*; do
    if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q -- "$STATE/"; then kill -KILL "${p#/proc/}" 2>/dev/null; fi
  done
  awk -v d="$STATE" 'index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r | uniq \
    | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  ip link show docker_gwbridge >/dev/null 2>&1 && ip link del docker_gwbridge
  [ -f "$STATE/ip_forward.orig" ] && sysctl -qw net.ipv4.ip_forward="$(cat "$STATE/ip_forward.orig")"
  if [ -f "$STATE/netfiles.before" ] && [ -d /var/lib/docker/network/files ]; then
    for f in $(ls -1 /var/lib/docker/network/files); do
      grep -qxF "$f" "$STATE/netfiles.before" || rm -rf --one-file-system "/var/lib/docker/network/files/$f"
    done
  fi
  rm -rf --one-file-system "$STATE"
  left=""
  ip link show docker_gwbridge >/dev/null 2>&1 && left+=" docker_gwbridge"
  [ -e "$STATE" ] && left+=" $STATE"
  pgrep -f -- "$STATE/" >/dev/null && left+=" processes"
  if [ -n "$left" ]; then log "LEFT BEHIND:$left"; [ "$rc" = 0 ] && rc=1
  else log "torn down: no dockerd/containerd of ours, no docker_gwbridge, ip_forward=$(sysctl -n net.ipv4.ip_forward)"; fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# -- packages (apt only) ------------------------------------------------------------------------
missing=()
for p in docker.io busybox-static debootstrap; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null; apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
if [ -e "$STATE" ]; then echo "$STATE exists: a previous run is still up or was not cleaned; remove it first" >&2; trap - EXIT; exit 2; fi
ip link show docker_gwbridge >/dev/null 2>&1 && { echo "docker_gwbridge exists: another Docker engine is up here" >&2; trap - EXIT; exit 2; }
mkdir -p "$STATE" "$DATA" "$EXEC" "$APP"
sysctl -n net.ipv4.ip_forward >"$STATE/ip_forward.orig"
ls -1 /var/lib/docker/network/files 2>/dev/null >"$STATE/netfiles.before" || true

# -- dockerd in swarm mode on loopback -------------------------------------------------------------
printf '{"deprecated-key-path": "%s/key.json"}\n' "$STATE" >"$STATE/daemon.json"
dockerd --config-file "$STATE/daemon.json" --iptables=false --ip6tables=false --ip-forward=false --bridge=none \
  --dns 127.0.0.1 --data-root "$DATA" --exec-root "$EXEC" -H "unix://$SOCK" --pidfile "$EXEC/dockerd.pid" \
  </dev/null >"$STATE/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for i in $(seq 300); do timeout 5 "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.2; done
dk info >/dev/null || { tail -20 "$STATE/dockerd.log" >&2; exit 1; }
dk swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 >/dev/null
dk network create -d overlay --attachable proxy >/dev/null
log "dockerd $(dk version -f '{{.Server.Version}} (API {{.Server.APIVersion}})') in swarm mode, overlay 'proxy'"

# -- images without a registry: busybox, and pyroute's from the Dockerfile on a debootstrap base ----------
root="$STATE/rootfs-busybox"; mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev}
cp /bin/busybox "$root/bin/busybox"
for a in sh sleep; do ln -sf busybox "$root/bin/$a"; done
tar -C "$root" -c . | dk import -c 'CMD ["/bin/sh"]' -c 'ENV PATH=/bin' - busybox:latest >/dev/null
t=$(date +%s.%N)
read -r base_tar how < <("$HERE/base_image.sh" "$CACHE")
[ -s "$base_tar" ] || { echo "FAIL no base image (debootstrap: $CACHE/debootstrap.log)"; exit 1; }
. /etc/os-release
BASE="pyroute-base:$VERSION_CODENAME"
dk import -c 'CMD ["/bin/bash"]' -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  "$base_tar" "$BASE" >/dev/null
log "base image $BASE: debootstrap of $PRETTY_NAME with its python3 ($base_tar, $how), imported; took $(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN{printf "%.1f", a-b}') s"
# pip in the build uses this machine's pip configuration (index, certificate) as build secrets.
secrets=(--secret "id=pip.conf,src=$STATE/pip.conf")
cert=$(python3 "$HERE/pip_conf.py" "$STATE/pip.conf")
[ -z "$cert" ] || secrets+=(--secret "id=pip-cert,src=$cert")
t=$(date +%s.%N)
# --network host: this dockerd has no bridge, and pip needs the network.
DOCKER_BUILDKIT=1 dk build --progress plain --network host --build-arg "BASE=$BASE" "${secrets[@]}" -t "$IMAGE" "$REPO" \
  >"$STATE/build.log" 2>&1 || { tail -40 "$STATE/build.log" >&2; echo "FAIL docker build of the Dockerfile"; exit 1; }
took=$(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN{printf "%.1f", a-b}')
size=$(dk image inspect -f '{{.Size}}' "$IMAGE"); base_size=$(dk image inspect -f '{{.Size}}' "$BASE")
above=$(( (size - base_size) / 1000000 ))
echo "PASS image $IMAGE built from the Dockerfile (BASE=$BASE) in $took s: $((size / 1000000)) MB, $above MB above its base ($((base_size / 1000000)) MB)"
[ "$above" -lt 80 ] || { echo "FAIL image $IMAGE is $above MB above its base (target: under 80 MB)"; exit 1; }
[ "$(dk image inspect -f '{{.Config.User}}' "$IMAGE")" = pyroute ] || { echo "FAIL the image's user is not pyroute"; exit 1; }

# -- go-demo: 3 replicas, dnsrr (no IPVS here), labelled for the listener ---------------------------------
# The stand-ins (go-demo, swarm-listener) run on the image's Python, without pyroute's health check.
cp "$HERE/demo_app.py" "$HERE/listener_app.py" "$APP/"
dk service create --detach --no-resolve-image --name go-demo --endpoint-mode dnsrr --network proxy \
  --label com.df.notify=true --label com.df.servicePath=/demo --label com.df.port=8080 \
  --label com.df.discoveryType=DNS --label com.df.sessionType=sticky-server \
  --replicas 3 --stop-grace-period 2s --mount "type=bind,src=$APP,dst=/app,readonly" \
  --no-healthcheck --entrypoint python "$IMAGE" /app/demo_app.py >/dev/null
log "service go-demo created (3 replicas, labels: $(dk service inspect -f '{{json .Spec.Labels}}' go-demo))"

# -- the image as a container on the overlay, with the Engine API socket --------------------------------------
# root to read the socket, as deploy/docker-stack.yml runs it
dk run -d --name probe --network proxy --user root --mount "type=bind,src=$SOCK,dst=/var/run/docker.sock" \
  -e DOCKER_HOST=unix:///var/run/docker.sock -e DNS_NAMESERVERS=127.0.0.11 -e DEFAULT_PORTS=8081 -e PORT=8082 \
  -e WORKERS=1 -e TASK_REFRESH_INTERVAL=0.5 -e SWARM_POLL_INTERVAL=1 "$IMAGE" >/dev/null
NETNS_PID=$(dk inspect -f '{{.State.Pid}}' probe)
log "container probe runs $IMAGE (pid $NETNS_PID), Engine API through the socket"
for i in $(seq 120); do
  [ "$(dk inspect -f '{{.State.Health.Status}}' probe)" = healthy ] && break; sleep 0.5
done
[ "$(dk inspect -f '{{.State.Health.Status}}' probe)" = healthy ] \
  || { dk inspect -f '{{json .State.Health}}' probe >&2; echo "FAIL the image's HEALTHCHECK never went healthy"; exit 1; }
echo "PASS the image's HEALTHCHECK went healthy: $(dk inspect -f '{{json .Config.Healthcheck.Test}}' probe | cut -c1-60)..."

# -- the checks -----------------------------------------------------------------------------------------
env DOCKER_HOST="unix://$SOCK" DOCKER_CLI="$DOCKER" PYROUTE_HTTP=127.0.0.1:8081 PYROUTE_ADMIN=127.0.0.1:8082 \
  nsenter -t "$NETNS_PID" -n -- python3 "$HERE/check.py"

# -- the shipped stack file: docker stack deploy -c deploy/docker-stack.yml proxy ------------------------------
# The label-discovery run above used its own network `proxy`; the stack creates its own by that name.
dk rm -f probe >/dev/null
for _ in $(seq 150); do  # go-demo's tasks leave the network as they stop; the removal completes later
  dk network rm proxy >/dev/null 2>&1 || true
  dk network inspect proxy >/dev/null 2>&1 || break; sleep 0.2
done
dk network inspect proxy >/dev/null 2>&1 && { echo "FAIL the network proxy of the label run could not be removed"; exit 1; }
python3 -c 'import secrets; print(secrets.token_hex(32))' | dk secret create dfp_peer_token - >/dev/null  # as the file's header says
# The socket mount's source is this dockerd's socket (a merged file would add a second mount, not replace it).
sed "s#- /var/run/docker.sock:/var/run/docker.sock:ro#- $SOCK:/var/run/docker.sock:ro#" "$REPO/deploy/docker-stack.yml" \
  >"$STATE/stack.yml"
grep -qF -- "- $SOCK:/var/run/docker.sock:ro" "$STATE/stack.yml" \
  || { echo "FAIL deploy/docker-stack.yml has no /var/run/docker.sock mount to point at the tier's dockerd"; exit 1; }
TIER_APP="$APP" dk stack deploy --resolve-image never -c "$STATE/stack.yml" -c "$HERE/stack-override.yml" proxy
log "PASS docker stack deploy -c deploy/docker-stack.yml proxy: $(dk stack services proxy --format '{{.Name}}' | tr '\n' ' ')"
for i in $(seq 240); do
  healthy=$(dk ps -q --filter label=com.docker.swarm.service.name=proxy_proxy --filter health=healthy)
  [ -n "$healthy" ] && break; sleep 0.5
done
if [ -z "$healthy" ]; then
  dk service ps --no-trunc proxy_proxy >&2; dk ps -a >&2
  for c in $(dk ps -aq --filter label=com.docker.swarm.service.name=proxy_proxy); do dk logs --tail 30 "$c" >&2; done
  echo "FAIL the proxy task never became healthy (readiness health check)"; exit 1
fi
echo "PASS proxy task healthy: the stack's health check on successfulinitreload answers 200"
as=$(dk exec "$healthy" id -un)
echo "PASS proxy_proxy runs as $as: the stack file sets user: root to read the Docker socket"
check_stack() {  # in a container of the image on the stack's network: aiodns and `pyroute routes` from the image
  dk run --rm --network proxy --mount "type=bind,src=$HERE,dst=/tier,readonly" --entrypoint python "$IMAGE" \
    /tier/check_stack.py "$@"
}
check_stack

# -- the DFSL variant: deploy/docker-stack-dfsl.yml with a listener stand-in named swarm-listener -------------
dk service create --detach --no-resolve-image --name swarm-listener --network proxy --endpoint-mode dnsrr --stop-grace-period 2s \
  --mount "type=bind,src=$APP,dst=/app,readonly" --no-healthcheck --entrypoint python "$IMAGE" /app/listener_app.py \
  >/dev/null
# As shipped but for its published ports: 80/443 belong to the stack deployed above.
sed 's/published: 80$/published: 8090/; s/published: 443$/published: 8453/' "$REPO/deploy/docker-stack-dfsl.yml" \
  >"$STATE/stack-dfsl.yml"
dk stack deploy --resolve-image never -c "$STATE/stack-dfsl.yml" dfsl
log "PASS docker stack deploy -c deploy/docker-stack-dfsl.yml dfsl: $(dk stack services dfsl --format '{{.Name}}' | tr '\n' ' ')"
for i in $(seq 240); do
  healthy=$(dk ps -q --filter label=com.docker.swarm.service.name=dfsl_proxy --filter health=healthy)
  [ "$(echo "$healthy" | grep -c .)" = 2 ] && break; sleep 0.5
done
if [ "$(echo "$healthy" | grep -c .)" != 2 ]; then
  dk service ps --no-trunc dfsl_proxy swarm-listener >&2; dk service logs --tail 20 swarm-listener >&2
  for c in $(dk ps -aq --filter label=com.docker.swarm.service.name=dfsl_proxy); do dk logs --tail 30 "$c" >&2; done
  echo "FAIL the 2 dfsl_proxy tasks never became healthy (readiness waits for the listener's services)"; exit 1
fi
echo "PASS both dfsl_proxy replicas healthy: ready after fetching the Swarm Listener's services"
for c in $healthy; do  # no user: in this stack file, so the image's own
  uid=$(dk exec "$c" id -u); [ "$uid" != 0 ] || { echo "FAIL a dfsl_proxy task runs as root"; exit 1; }
done
echo "PASS both dfsl_proxy replicas run as the image's user $(dk exec "${healthy%%$'\n'*}" id -un) (uid $uid), not root"
check_stack dfsl
