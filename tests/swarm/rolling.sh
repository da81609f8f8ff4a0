# The rolling-update checks of the real-Swarm tier (issue 20), sourced by run.sh, which
# calls rolling_checks once pyroute (labels + Engine API) runs in the netns of `probe`.
# Uses run.sh's variables and helpers: dk, log, STATE, APP, HERE, REPO, PY, PYHOME, SOCK,
# DOCKER, NETNS_PID.
#
# The service `roll`: 3 replicas of rolling_app.py (dnsrr, com.df.discoveryType=DNS),
# stop grace period 10s, each task logging the requests it began and answered to a shared
# directory. check_rolling.py sends 200 requests/s (GET and POST with a body) while
# `docker service update --force --update-parallelism 1 --update-delay 2s roll` runs:
#   graceful      pyroute with the Engine API, app finishing in-flight requests: 0 failed
#   abrupt        the same with ABRUPT=1 (exit at once on SIGTERM): 0 failed GETs, every
#                 failed POST one that reached a task that died mid-request
#   dns-graceful, dns-abrupt
#                 a second pyroute without the Docker socket (DNS discovery only): counts

rolling_checks() {
  local logdir="$STATE/rolling-log" mounts_roll=() pair dns_pid
  mkdir -p "$logdir"
  cp "$HERE/rolling_app.py" "$APP/rolling_app.py"
  while read -r pair; do  # sorted by source, as Swarm keeps them
    case "$pair" in *:/log) mounts_roll+=(--mount "type=bind,src=${pair%%:*},dst=/log") ;;
      *) mounts_roll+=(--mount "type=bind,src=${pair%%:*},dst=${pair#*:},readonly") ;; esac
  done < <({ echo "/usr:/usr"; echo "$APP:/app"; echo "$logdir:/log"
             case "$PYHOME" in /usr|/usr/*) ;; *) echo "$PYHOME:$PYHOME" ;; esac; } | LC_ALL=C sort -t: -k1,1)
  dk service create --detach --no-resolve-image --name roll --endpoint-mode dnsrr --network proxy \
    --label com.df.notify=true --label com.df.servicePath=/roll --label com.df.port=8080 \
    --label com.df.discoveryType=DNS --replicas 3 --stop-grace-period 10s \
    "${mounts_roll[@]}" pyrun:latest "$PY" /app/rolling_app.py >/dev/null
  log "service roll created (3 replicas of rolling_app.py)"
  rolling_run graceful 127.0.0.1:8081 127.0.0.1:8082
  dk service update --detach=false -q --env-add ABRUPT=1 roll >/dev/null
  log "roll now exits at once on SIGTERM (ABRUPT=1)"
  rolling_run abrupt 127.0.0.1:8081 127.0.0.1:8082
  log "pyroute drained tasks of roll $(grep -c 'roll: draining' "$STATE/pyroute.log") time(s) on the Engine API's word (its log; 9 tasks were stopped)"

  env -u DOCKER_HOST PYTHONPATH="$REPO" DNS_NAMESERVERS=127.0.0.11 DEFAULT_PORTS=8091 PORT=8092 \
    IP=127.0.0.1 BIND_ADDRESS=127.0.0.1 WORKERS=1 TASK_REFRESH_INTERVAL=0.5 SERVICE_NAME=pyroute-dns \
    nsenter -t "$NETNS_PID" -n -- python3 -m pyroute >"$STATE/pyroute-dns.log" 2>&1 &
  dns_pid=$!
  log "pyroute without the Docker socket (DNS discovery only), pid $dns_pid"
  rolling_run dns-abrupt 127.0.0.1:8091 127.0.0.1:8092
  dk service update --detach=false -q --env-rm ABRUPT roll >/dev/null
  rolling_run dns-graceful 127.0.0.1:8091 127.0.0.1:8092
  kill -TERM "$dns_pid"; wait "$dns_pid" 2>/dev/null || true
  dk service rm roll >/dev/null
}

rolling_run() {  # MODE HTTP ADMIN
  local states
  for _ in $(seq 60); do  # every task answering (and the previous update over) before the next
    states=$(dk service ps --format '{{.CurrentState}}' --filter desired-state=running roll)
    [ "$(echo "$states" | grep -c '^Running')" = 3 ] && [ "$(echo "$states" | wc -l)" = 3 ] && break
    sleep 0.5
  done
  env DOCKER_HOST="unix://$SOCK" DOCKER_CLI="$DOCKER" \
    nsenter -t "$NETNS_PID" -n -- python3 "$HERE/check_rolling.py" "$1" "$2" "$3" "$STATE/rolling-log"
}
