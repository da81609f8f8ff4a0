"""The rolling-update check (issue 20), run by rolling.sh in the network namespace of a
pyroute on the overlay: a steady mix of GETs and POSTs with bodies (RATE requests/s) while
`docker service update --force --update-parallelism 1 --update-delay 2s roll` replaces the
3 tasks of the service `roll` (rolling_app.py), then the counts.

usage: check_rolling.py MODE HTTP ADMIN LOGDIR
  MODE  graceful   labels + Engine API; the app finishes in-flight requests on SIGTERM:
                   PASS only with 0 failed requests
        abrupt     the same with an app that exits at once on SIGTERM: PASS with 0 failed
                   GETs and every failed POST one that reached a task which died mid-request
        dns-graceful, dns-abrupt
                   a pyroute without the Docker socket (the route comes from a reconfigure
                   call): the counts are reported, not judged
Every failed request is looked up in the tasks' logs (LOGDIR, rolling_app.py writes
`B id`/`E id`): "reached a task that died mid-request" when a task began it and never
answered, "reached no task" otherwise.
"""
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse

MODE, HTTP, ADMIN, LOGDIR = sys.argv[1:5]
DOCKER = os.environ.get("DOCKER_CLI", "docker")
RATE = 200  # requests per second, half GETs, half POSTs
CLIENTS = 16  # keep-alive connections to pyroute, each paced at RATE / CLIENTS
BODY = b"x" * 4096
T0 = time.monotonic()


def say(status, what):
    print(f"[{time.monotonic() - T0:5.1f}s] {status} rolling/{MODE}: {what}", flush=True)


def fail(what):
    say("FAIL", what)
    sys.exit(1)


def call(hostport, method, path, body=None, headers=None):
    host, port = hostport.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.getheader("X-Served-By"), r.read()
    except OSError as exc:
        return 0, None, str(exc).encode()
    finally:
        c.close()


def wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not (result := cond()):
        if time.monotonic() > deadline:
            fail(f"{what} (not within {timeout}s)")
        time.sleep(0.3)
    return result


class Load:
    """CLIENTS threads, each on one keep-alive connection (reopened after a failure)."""

    def __init__(self):
        self.stop = threading.Event()
        self.results = []  # (id, method, ok, what)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(n,)) for n in range(CLIENTS)]

    def client(self, n):
        host, port = HTTP.split(":")
        interval = CLIENTS / RATE
        conn = None
        i = 0
        next_at = time.monotonic() + n * interval / CLIENTS
        while not self.stop.is_set():
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            i += 1
            req_id = f"{MODE}-{n}-{i}"
            method = "POST" if i % 2 else "GET"
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                conn.request(method, f"/roll/{req_id}", body=BODY if method == "POST" else None,
                             headers={"X-Req-Id": req_id})
                r = conn.getresponse()
                r.read()
                ok, what = r.status == 200, str(r.status)
            except (OSError, http.client.HTTPException) as exc:
                ok, what = False, type(exc).__name__
            if not ok:
                conn.close()
                conn = None
            with self.lock:
                self.results.append((req_id, method, ok, what))
        if conn is not None:
            conn.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(15)


def retries():
    """pyroute's retries of the service roll so far (pyroute_upstream_retries_total, every task)."""
    status, _, body = call(ADMIN, "GET", "/metrics")
    total = 0.0
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("pyroute_upstream_retries_total{") and 'service="roll"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def task_logs():
    """{request id: (began somewhere, ended somewhere)} from every task's log."""
    seen = {}
    for name in os.listdir(LOGDIR):
        with open(os.path.join(LOGDIR, name)) as f:
            for line in f:
                mark, _, req_id = line.strip().partition(" ")
                began, ended = seen.get(req_id, (False, False))
                seen[req_id] = (began or mark == "B", ended or mark == "E")
    return seen


def main():
    if MODE.startswith("dns"):
        params = {"serviceName": "roll", "servicePath": "/roll", "port": "8080", "discoveryType": "DNS"}
        path = "/v1/docker-flow-proxy/reconfigure?" + urllib.parse.urlencode(params)
        wait(lambda: call(ADMIN, "GET", path)[0] == 200, 30, "reconfigure roll on the DNS-only pyroute")
    tasks = wait(lambda: (lambda seen: seen if len(seen) == 3 else None)(
        {call(HTTP, "GET", "/roll/warm")[1] for _ in range(12)} - {None}), 90, "the 3 tasks of roll answer")
    say("INFO", f"3 tasks answer before the update: {sorted(tasks)}")

    update = [DOCKER, "service", "update", "--force", "--update-parallelism", "1", "--update-delay", "2s",
              "--detach=false", "-q", "roll"]
    retries_before = retries()
    with Load() as load:
        time.sleep(2)
        started = time.monotonic()
        subprocess.run(update, check=True, stdout=subprocess.DEVNULL)
        took = time.monotonic() - started
        time.sleep(2)
    after = {call(HTTP, "GET", "/roll/after")[1] for _ in range(12)} - {None}
    if after & tasks:
        fail(f"old tasks still answer after the update: {sorted(after & tasks)}")

    results = load.results
    failed = [r for r in results if not r[2]]
    logs = task_logs()
    died = [r for r in failed if logs.get(r[0], (False, False)) == (True, False)]
    counts = {
        "requests": len(results),
        "gets": sum(r[1] == "GET" for r in results),
        "posts": sum(r[1] == "POST" for r in results),
        "failed_gets": sum(r[1] == "GET" for r in failed),
        "failed_posts": sum(r[1] == "POST" for r in failed),
        "failed_reached_a_task_that_died": len(died),
        "failed_reached_no_task": len(failed) - len(died),
        "retried_by_pyroute": retries() - retries_before,
        "update_seconds": round(took, 1),
        "failures": sorted({r[3] for r in failed}),
    }
    say("COUNTS", json.dumps(counts))
    if MODE == "graceful" and failed:
        fail(f"{len(failed)} failed requests with a graceful app: {failed[:10]}")
    if MODE == "abrupt":
        if counts["failed_gets"]:
            fail(f"{counts['failed_gets']} failed GETs with an abrupt app: {[r for r in failed if r[1] == 'GET'][:10]}")
        unaccounted = [r for r in failed if r not in died]
        if unaccounted:
            fail(f"failed POSTs that reached no dying task: {unaccounted[:10]}")
    say("PASS", f"{len(results)} requests during a rolling update of 3 tasks, {len(failed)} failed")


if __name__ == "__main__":
    main()
