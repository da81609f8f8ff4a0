# The rolling-update checks of the real-Swarm tier (issue 20), sourced by run.sh, which
# calls rolling_checks once pyroute (labels + Engine API) runs in the netns of `probe`.
# Uses run.sh's variables and helpers: dk, log, STATE, APP, HERE, IMAGE, SOCK, DOCKER,
# NETNS_PID (the container `probe`, running the image with the Engine API socket).
#
# The service `roll`: 3 replicas of rolling_app.py (dnsrr, com.df.discoveryType=DNS),
# stop grace period 10s, each task logging the requests it began and answered to a shared
# directory. check_rolling.py sends 200 requests/s (GET and POST with a body) while
# `docker service update --force --update-parallelism 1 --update-delay 2s roll` runs:
#   graceful      pyroute with the Engine API, app finishing in-flight requests: 0 failed
#   abrupt        the same with ABRUPT=1 (exit at once on SIGTERM): 0 failed GETs, every
#                 failed POST one that reached a task that died mid-request
#   dns-abrupt, dns-graceful
#                 the image in a second container without the Docker socket (DNS
#                 discovery only, TASK_REFRESH_INTERVAL=0.5): counts

rolling_checks() {
  local logdir="$STATE/rolling-log" dns_pid
  mkdir -p "$logdir"; chmod 0777 "$logdir"  # the image runs as user pyroute
  cp "$HERE/rolling_app.py" "$APP/rolling_app.py"
  dk service create --detach --no-resolve-image --name roll --endpoint-mode dnsrr --network proxy \
    --label com.df.notify=true --label com.df.servicePath=/roll --label com.df.port=8080 \
    --label com.df.discoveryType=DNS --replicas 3 --stop-grace-period 10s \
    --mount "type=bind,src=$APP,dst=/app,readonly" --mount "type=bind,src=$logdir,dst=/log" \
    --no-healthcheck --entrypoint python "$IMAGE" /app/rolling_app.py >/dev/null
  log "service roll created (3 replicas of rolling_app.py)"
  rolling_run graceful "$NETNS_PID" 127.0.0.1:8081 127.0.0.1:8082
  dk service update --detach=false -q --env-add ABRUPT=1 roll >/dev/null
  log "roll now exits at once on SIGTERM (ABRUPT=1)"
  rolling_run abrupt "$NETNS_PID" 127.0.0.1:8081 127.0.0.1:8082
  log "pyroute drained tasks of roll $(dk logs probe 2>&1 | grep -c 'roll: draining') time(s) on the Engine API's word (its log; 9 tasks were stopped)"

  # The image again, without the Docker socket: DNS discovery only.
  dk run -d --name probe-dns --network proxy -e DNS_NAMESERVERS=127.0.0.11 -e DEFAULT_PORTS=8091 -e PORT=8092 \
    -e WORKERS=1 -e TASK_REFRESH_INTERVAL=0.5 -e SERVICE_NAME=pyroute-dns "$IMAGE" >/dev/null
  dns_pid=$(dk inspect -f '{{.State.Pid}}' probe-dns)
  log "container probe-dns runs $IMAGE without the Docker socket (DNS discovery only)"
  rolling_run dns-abrupt "$dns_pid" 127.0.0.1:8091 127.0.0.1:8092
  dk service update --detach=false -q --env-rm ABRUPT roll >/dev/null
  rolling_run dns-graceful "$dns_pid" 127.0.0.1:8091 127.0.0.1:8092
  dk rm -f probe-dns >/dev/null
  dk service rm roll >/dev/null
}

rolling_run() {  # MODE NETNS_PID HTTP ADMIN
  local states
  for _ in $(seq 60); do  # every task answering (and the previous update over) before the next
    states=$(dk service ps --format '{{.CurrentState}}' --filter desired-state=running roll)
    [ "$(echo "$states" | grep -c '^Running')" = 3 ] && [ "$(echo "$states" | wc -l)" = 3 ] && break
    sleep 0.5
  done
  env DOCKER_HOST="unix://$SOCK" DOCKER_CLI="$DOCKER" \
    nsenter -t "$2" -n -- python3 "$HERE/check_rolling.py" "$1" "$3" "$4" "$STATE/rolling-log"
}
