"""The real-Swarm checks, run by run.sh inside the network namespace where pyroute runs.

Each check prints PASS/FAIL with what it saw; the first failure ends the run (exit 1).
Only the docker CLI (for scaling and removing the service) and pyroute's own ports are used.
"""
import http.client
import json
import os
import subprocess
import sys
import time

HTTP = os.environ["PYROUTE_HTTP"]
ADMIN = os.environ["PYROUTE_ADMIN"]
DOCKER = os.environ.get("DOCKER_CLI", "docker")
T0 = time.monotonic()


def say(status, what):
    print(f"[{time.monotonic() - T0:5.1f}s] {status} {what}", flush=True)


def fail(what):
    say("FAIL", what)
    sys.exit(1)


def get(path, cookie=None):
    """-> (status, X-Served-By, Set-Cookie) on a fresh connection."""
    host, port = HTTP.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        c.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        r = c.getresponse()
        r.read()
        return r.status, r.getheader("X-Served-By"), r.getheader("Set-Cookie")
    except OSError as exc:
        return 0, None, str(exc)
    finally:
        c.close()


def routes():
    host, port = ADMIN.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        c.request("GET", "/v1/docker-flow-proxy/config?type=json")
        return json.loads(c.getresponse().read())
    except OSError:
        return {}
    finally:
        c.close()


def wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            fail(f"{what} (not within {timeout}s)")
        time.sleep(0.2)


def exactly(n, n_requests):
    """A condition: the tasks n_requests requests reached, when they are exactly n (and all answered 200)."""
    def check():
        answers = [get("/demo/x") for _ in range(n_requests)]
        seen = {a[1] for a in answers}
        return seen if len(seen) == n and all(a[0] == 200 for a in answers) else None
    return check


def docker(*args):
    subprocess.run([DOCKER, *args], check=True, stdout=subprocess.DEVNULL)


def main():
    service = wait(lambda: routes().get("go-demo"), 60, "route go-demo from the service labels")
    say("PASS", f"route appeared from the labels alone: {json.dumps(service['ServiceDest'])}")

    wait(lambda: get("/demo/hello")[0] == 200, 60, "GET /demo/hello answered 200")
    say("PASS", "GET /demo/hello -> 200 through pyroute")

    three = wait(exactly(3, 9), 60, "requests reach 3 tasks")
    say("PASS", f"9 requests reached all 3 tasks: {sorted(three)}")

    status, task, set_cookie = get("/demo/x")
    if status != 200 or not set_cookie or not set_cookie.startswith("go-demo="):
        fail(f"sticky: first response sets cookie go-demo=..., got {status} {set_cookie!r}")
    cookie = set_cookie.split(";")[0]
    pinned = {get("/demo/x", cookie)[1] for _ in range(6)}
    if pinned != {task}:
        fail(f"sticky client stays on {task}, went to {pinned}")
    say("PASS", f"sticky client pinned to {task} ({cookie})")

    docker("service", "scale", "--detach", "go-demo=5")
    five = wait(exactly(5, 15), 90, "requests reach 5 tasks after scale 3->5")
    say("PASS", f"scale to 5 reflected: {len(five)} tasks answer")
    after = [get("/demo/x", cookie) for _ in range(10)]
    if {a[1] for a in after} != {task} or any(a[2] for a in after):
        fail(f"sticky client moved during the scale-up: {after}")
    say("PASS", f"sticky client still on {task} after scaling to 5 (no new cookie)")

    docker("service", "scale", "--detach", "go-demo=1")
    one = wait(exactly(1, 8), 90, "only 1 task answers after scale ->1")
    say("PASS", f"scale to 1 reflected: only {sorted(one)} answers")
    status, now_on, new_cookie = get("/demo/x", cookie)
    if status != 200 or now_on not in one:
        fail(f"sticky client after scale-down: {status} {now_on}")
    say("PASS", f"sticky client served by the remaining task ({'kept' if now_on == task else 'moved, new cookie ' + str(new_cookie)})")

    docker("service", "rm", "go-demo")
    wait(lambda: "go-demo" not in routes(), 30, "route removed with the service")
    status = get("/demo/hello")[0]
    if status != 503:
        fail(f"after removal GET /demo/hello should be 503, got {status}")
    say("PASS", "service removed -> route removed, /demo answers 503")
    say("PASS", "all real-Swarm checks")


if __name__ == "__main__":
    main()
