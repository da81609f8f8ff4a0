"""The stack-file checks, run by run.sh in a container of the built image on the stack's
`proxy` network after `docker stack deploy -c deploy/docker-stack.yml proxy`.

Talks to the proxy task by its overlay address (tasks.proxy_proxy through Docker's DNS):
the go-demo route appears from the stack's labels alone, requests on port 80 reach it, a
service registered through the admin API is routed too, and `pyroute routes` prints both.
"""
import asyncio
import http.client
import json
import subprocess
import sys
import time

import aiodns

T0 = time.monotonic()


def say(status, what):
    print(f"[{time.monotonic() - T0:5.1f}s] {status} {what}", flush=True)


def fail(what):
    say("FAIL", what)
    sys.exit(1)


def wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            fail(f"{what} (not within {timeout}s)")
        time.sleep(0.5)


def proxy_tasks(service="proxy_proxy"):
    async def query():
        resolver = aiodns.DNSResolver(nameservers=["127.0.0.11"], timeout=2, tries=1)
        try:
            result = await resolver.query_dns(f"tasks.{service}", "A")
        except aiodns.error.DNSError:
            return []
        finally:
            await resolver.close()
        return sorted(rr.data.addr for rr in result.answer if hasattr(rr.data, "addr"))
    return asyncio.run(query())


def get(ip, port, path):
    c = http.client.HTTPConnection(ip, port, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    except OSError as exc:
        return 0, str(exc).encode()
    finally:
        c.close()


def main():
    ips = wait(proxy_tasks, 90, "tasks.proxy_proxy resolves (the proxy task is on the proxy network)")
    ip = ips[0]
    say("PASS", f"proxy task on the overlay: {ip}")
    routes = wait(lambda: (lambda r: r[0] == 200 and "go-demo" in json.loads(r[1]) and json.loads(r[1]))(
        get(ip, 8080, "/v1/docker-flow-proxy/config?type=json")), 90, "route go-demo from the stack's labels")
    say("PASS", f"route go-demo from the stack's com.df.* labels: {json.dumps(routes['go-demo']['ServiceDest'])}")
    wait(lambda: get(ip, 80, "/demo/hello") == (200, b"hello, world!\n"), 60, "GET :80/demo/hello -> 200")
    say("PASS", "GET :80/demo/hello -> 200 hello, world! (port 80 as the stack file publishes it)")

    status, body = get(ip, 8080, "/v1/docker-flow-proxy/reconfigure?serviceName=by-admin&servicePath=/by-admin"
                                 "&port=8080&outboundHostname=proxy_go-demo")
    if status != 200:
        fail(f"reconfigure by admin call: {status} {body!r}")
    wait(lambda: get(ip, 80, "/by-admin/x")[0] == 200, 30, "GET :80/by-admin/x -> 200")
    say("PASS", "a service registered by an admin call is routed next to the labelled one")

    shown = subprocess.run(["pyroute", "routes", "--admin", f"http://{ip}:8080"],  # the image's command
                           capture_output=True, text=True, timeout=30)
    if shown.returncode != 0 or "go-demo" not in shown.stdout or "by-admin" not in shown.stdout:
        fail(f"pyroute routes: {shown.returncode} {shown.stdout} {shown.stderr}")
    print(shown.stdout, flush=True)
    say("PASS", "pyroute routes prints both routes")
    say("PASS", "stack deploy checks")


def main_dfsl():
    """deploy/docker-stack-dfsl.yml as stack `dfsl`: the routes come from the listener's get-services."""
    ip = wait(lambda: proxy_tasks("dfsl_proxy"), 90, "tasks.dfsl_proxy resolves")[0]
    say("PASS", f"DFSL-variant proxy task on the overlay: {ip}")
    wait(lambda: (lambda r: r[0] == 200 and "dfsl-demo" in json.loads(r[1]))(
        get(ip, 8080, "/v1/docker-flow-proxy/config?type=json")), 60, "route dfsl-demo from the listener")
    say("PASS", "route dfsl-demo fetched from the Swarm Listener (LISTENER_ADDRESS=swarm-listener)")
    wait(lambda: get(ip, 80, "/dfsl/x")[0] == 200, 30, "GET :80/dfsl/x -> 200")
    say("PASS", "GET :80/dfsl/x -> 200 through the DFSL variant")
    say("PASS", "DFSL stack checks")


if __name__ == "__main__":
    main_dfsl() if sys.argv[1:] == ["dfsl"] else main()
