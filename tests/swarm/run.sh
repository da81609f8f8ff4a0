#!/usr/bin/env bash
# Real-Swarm tier for pyroute (opt-in: PYROUTE_SWARM_E2E=1). See README.md.
#
# Starts a private dockerd in swarm mode on loopback, deploys a 3-replica go-demo-like
# service labelled com.df.*, runs pyroute in the network namespace of a container on the
# same overlay (built-in Swarm listener + task balancing + sticky sessions), and runs
# check.py there. Tears everything down on exit, failure included.
set -euo pipefail

if [ "${PYROUTE_SWARM_E2E:-}" != 1 ]; then
  echo "skipped: set PYROUTE_SWARM_E2E=1 to run the real-Swarm tier (needs root; installs docker.io)" >&2
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "the real-Swarm tier must run as root" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=${PYROUTE_SWARM_DIR:-/tmp/pyroute-swarm-e2e}
SOCK="$STATE/docker.sock"
DATA="$STATE/data"
EXEC="$STATE/exec"
APP="$STATE/app"
export DOCKER_HOST="unix://$SOCK"
DOCKER=/usr/bin/docker  # the CLI that ships with the daemon (API 1.41)
PY=$(python3 -c 'import os,sys; print(os.path.realpath(sys.executable))')
PYHOME=$(python3 -c 'import os,sys; print(os.path.realpath(sys.base_prefix))')
T0=$(date +%s.%N)
log() { printf '[swarm-e2e %5ss] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%.1f", a-b}')" "$*" >&2; }
dk() { "$DOCKER" "$@"; }
DOCKERD_PID=""
PYROUTE_PID=""

teardown() {
  local rc=$?
  set +e
  log "teardown (exit status $rc)"
  if [ -n "$PYROUTE_PID" ] && kill -0 "$PYROUTE_PID" 2>/dev/null; then
    kill -TERM "$PYROUTE_PID"; wait "$PYROUTE_PID" 2>/dev/null
  fi
  [ -f "$STATE/pyroute.log" ] && { log "pyroute log (tail):"; tail -25 "$STATE/pyroute.log" >&2; }
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
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
for p in docker.io busybox-static; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
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

# -- images without a registry: docker import --------------------------------------------------------
root="$STATE/rootfs-busybox"; mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev}
cp /bin/busybox "$root/bin/busybox"
for a in sh sleep; do ln -sf busybox "$root/bin/$a"; done
tar -C "$root" -c . | dk import -c 'CMD ["/bin/sh"]' -c 'ENV PATH=/bin' - busybox:latest >/dev/null
root="$STATE/rootfs-pyrun"; mkdir -p "$root"/{usr,etc,tmp,proc,sys,dev,app,root}
ln -s usr/bin "$root/bin"; ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"; printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
tar -C "$root" -c . | dk import -c 'CMD ["/bin/sh"]' -c 'ENV PYTHONDONTWRITEBYTECODE=1' - pyrun:latest >/dev/null
log "images busybox:latest and pyrun:latest imported"

# -- go-demo: 3 replicas, dnsrr (no IPVS here), labelled for the listener ---------------------------------
cp "$HERE/demo_app.py" "$APP/demo_app.py"
mounts=()  # sorted by source: Swarm re-sorts them, and another order would restart every task on update
while read -r pair; do mounts+=(--mount "type=bind,src=${pair%%:*},dst=${pair#*:},readonly"); done < <(
  { echo "/usr:/usr"; echo "$APP:/app"; case "$PYHOME" in /usr|/usr/*) ;; *) echo "$PYHOME:$PYHOME" ;; esac; } | LC_ALL=C sort -t: -k1,1)
dk service create --detach --no-resolve-image --name go-demo --endpoint-mode dnsrr --network proxy \
  --label com.df.notify=true --label com.df.servicePath=/demo --label com.df.port=8080 \
  --label com.df.discoveryType=DNS --label com.df.sessionType=sticky-server \
  --replicas 3 --stop-grace-period 2s "${mounts[@]}" pyrun:latest "$PY" /app/demo_app.py >/dev/null
log "service go-demo created (3 replicas, labels: $(dk service inspect -f '{{json .Spec.Labels}}' go-demo))"

# -- pyroute in the network namespace of a container on the overlay -------------------------------------
dk run -d --pull=never --name probe --network proxy busybox:latest sleep 3600 >/dev/null 2>&1 \
  || dk inspect -f '{{.State.Running}}' probe | grep -q true
NETNS_PID=$(dk inspect -f '{{.State.Pid}}' probe)
env PYTHONPATH="$REPO" DOCKER_HOST="unix://$SOCK" DNS_NAMESERVERS=127.0.0.11 DEFAULT_PORTS=8081 PORT=8082 \
  IP=127.0.0.1 BIND_ADDRESS=127.0.0.1 WORKERS=1 TASK_REFRESH_INTERVAL=0.5 SWARM_POLL_INTERVAL=1 \
  nsenter -t "$NETNS_PID" -n -- python3 -m pyroute >"$STATE/pyroute.log" 2>&1 &
PYROUTE_PID=$!
log "pyroute pid $PYROUTE_PID in the netns of container 'probe' (pid $NETNS_PID), Engine API $DOCKER_HOST"

# -- the checks -----------------------------------------------------------------------------------------
env DOCKER_HOST="unix://$SOCK" DOCKER_CLI="$DOCKER" PYROUTE_HTTP=127.0.0.1:8081 PYROUTE_ADMIN=127.0.0.1:8082 \
  nsenter -t "$NETNS_PID" -n -- python3 "$HERE/check.py"

# -- the shipped stack file: docker stack deploy -c deploy/docker-stack.yml proxy ------------------------------
# The label-discovery run above used its own network `proxy`; the stack creates its own by that name.
kill -TERM "$PYROUTE_PID"; wait "$PYROUTE_PID" 2>/dev/null || true; PYROUTE_PID=""
dk rm -f probe >/dev/null
for _ in $(seq 150); do  # go-demo's tasks leave the network as they stop; the removal completes later
  dk network rm proxy >/dev/null 2>&1 || true
  dk network inspect proxy >/dev/null 2>&1 || break; sleep 0.2
done
dk network inspect proxy >/dev/null 2>&1 && { echo "FAIL the network proxy of the label run could not be removed"; exit 1; }
python3 -c 'import secrets; print(secrets.token_hex(32))' | dk secret create dfp_peer_token - >/dev/null  # as the file's header says
python3 "$HERE/stack_file.py" "$REPO/deploy/docker-stack.yml" "$STATE/stack.yml" "$PY" "$PYHOME" "$REPO" "$APP" "$SOCK"
log "deploy/docker-stack.yml adapted for this tier (images, runtime mounts, socket source): $STATE/stack.yml"
dk stack deploy --resolve-image never -c "$STATE/stack.yml" proxy
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
dk run -d --pull=never --name probe --network proxy busybox:latest sleep 3600 >/dev/null
NETNS_PID=$(dk inspect -f '{{.State.Pid}}' probe)
env PYROUTE_REPO="$REPO" nsenter -t "$NETNS_PID" -n -- python3 "$HERE/check_stack.py"

# -- the DFSL variant: deploy/docker-stack-dfsl.yml with a listener stand-in named swarm-listener -------------
cp "$HERE/listener_app.py" "$APP/listener_app.py"
dk service create --detach --no-resolve-image --name swarm-listener --network proxy --endpoint-mode dnsrr --stop-grace-period 2s \
  "${mounts[@]}" pyrun:latest "$PY" /app/listener_app.py >/dev/null
python3 "$HERE/stack_file.py" "$REPO/deploy/docker-stack-dfsl.yml" "$STATE/stack-dfsl.yml" "$PY" "$PYHOME" "$REPO" "$APP" "$SOCK"
# Its own published ports: 80/443 belong to the stack deployed above (the file's ports are as shipped otherwise).
sed -i 's/published: 80$/published: 8090/; s/published: 443$/published: 8453/' "$STATE/stack-dfsl.yml"
dk stack deploy --resolve-image never -c "$STATE/stack-dfsl.yml" dfsl
log "PASS docker stack deploy -c deploy/docker-stack-dfsl.yml dfsl: $(dk stack services dfsl --format '{{.Name}}' | tr '\n' ' ')"
for i in $(seq 240); do
  healthy=$(dk ps -q --filter label=com.docker.swarm.service.name=dfsl_proxy --filter health=healthy)
  [ "$(echo "$healthy" | grep -c .)" = 2 ] && break; sleep 0.5
done
if [ "$(echo "$healthy" | grep -c .)" != 2 ]; then
  dk service ps --no-trunc dfsl_proxy >&2
  for c in $(dk ps -aq --filter label=com.docker.swarm.service.name=dfsl_proxy); do dk logs --tail 30 "$c" >&2; done
  echo "FAIL the 2 dfsl_proxy tasks never became healthy (readiness waits for the listener's services)"; exit 1
fi
echo "PASS both dfsl_proxy replicas healthy: ready after fetching the Swarm Listener's services"
env PYROUTE_REPO="$REPO" nsenter -t "$NETNS_PID" -n -- python3 "$HERE/check_stack.py" dfsl
