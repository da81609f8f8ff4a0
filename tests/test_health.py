"""Task health: passive ejection (connect failures, 5xx), probing back, active checks on
healthCheckPath, and redispatch of requests whose connect failed."""
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from support.upstream import wait_until

PYROUTE_ENV = {"TASK_REFRESH_INTERVAL": "0.1", "HEALTH_CHECK_INTERVAL": "0.1", "HEALTH_FALL": "2",
               "HEALTH_RISE": "1", "TIMEOUT_CONNECT": "1"}


class Switchable:
    """A task whose answers a test sets: `health` for /hc, `status` for anything else."""

    def __init__(self, ip, port):
        self.health = 200
        self.status = 200
        self.hits = Counter()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                code = owner.health if self.path.endswith("/hc") else owner.status
                owner.hits[self.path] += 1
                body = b"status %d" % code
                self.send_response(code)
                self.send_header("X-Upstream", f"{ip}:{port}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.addr = f"{ip}:{port}"
        self.server = ThreadingHTTPServer((ip, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def good(fleet):
    return fleet.start_group(["127.0.0.31"])[0]


@pytest.fixture
def switchable(good):
    s = Switchable("127.0.0.32", good.port)
    yield s
    s.close()


def deploy(proxy, dns, name, ips, port, **params):
    dns.set(name, "127.0.0.99")
    dns.set(f"tasks.{name}", ips)
    proxy.reconfigure(serviceName=name, servicePath=f"/{name}", port=port, discoveryType="DNS", **params)


def spread(proxy, path, n):
    out = []
    for _ in range(n):
        st, h, _ = proxy.get(path)
        out.append((st, h.get("X-Upstream")))
    return out


def test_connect_failures_are_redispatched_ejected_and_probed_back(proxy, dns, fleet, good):
    dead_ip = "127.0.0.33"  # nothing listens there yet
    deploy(proxy, dns, "hl-dead", [good.ip, dead_ip], good.port)
    # every request succeeds: a refused connect is retried on the other task
    assert all(r == (200, good.addr) for r in spread(proxy, "/hl-dead/x", 6))
    wait_until(lambda: "127.0.0.33:%d leaves the rotation" % good.port in proxy.log(), what="dead task ejected")
    revived = fleet.start_group([dead_ip], port=good.port)[0]
    wait_until(lambda: "127.0.0.33:%d is back" % good.port in proxy.log(), timeout=5, what="probed back")
    assert {a for _, a in spread(proxy, "/hl-dead/x", 4)} == {good.addr, revived.addr}
    fleet.stop_upstream(revived)


def test_failed_connect_redispatches_any_method(make_pyroute, dns, good):
    p = make_pyroute(TASK_REFRESH_INTERVAL="0.1", HEALTH_FALL="1000")  # never ejected: every other pick is dead
    deploy(p, dns, "hl-post", [good.ip, "127.0.0.34"], good.port)
    posts = [p.get("/hl-post/upload", method="POST", body=b"x")[0] for _ in range(4)]
    assert posts == [200] * 4  # nothing reached the dead task: the POST goes to the other one
    assert all(st == 200 for st, _ in spread(p, "/hl-post/x", 4))


def test_consecutive_5xx_eject_a_task(make_pyroute, dns, good, switchable):
    p = make_pyroute(TASK_REFRESH_INTERVAL="0.1", HEALTH_CHECK_INTERVAL="0.1", HEALTH_FALL="2", HEALTH_RISE="1000")
    deploy(p, dns, "hl-5xx", [good.ip, "127.0.0.32"], good.port)
    switchable.status = 500
    results = spread(p, "/hl-5xx/x", 6)
    assert results.count((500, switchable.addr)) == 2  # passed on as they are, until the 2nd in a row
    assert results[-2:] == [(200, good.addr)] * 2
    assert all(r == (200, good.addr) for r in spread(p, "/hl-5xx/x", 6))
    assert "leaves the rotation (answered 500, 2 in a row)" in p.log()


def test_active_checks_eject_and_restore_on_health_path(proxy, dns, good, switchable):
    deploy(proxy, dns, "hl-active", [good.ip, "127.0.0.32"], good.port, healthCheckPath="/hl-active/hc")
    wait_until(lambda: switchable.hits["/hl-active/hc"] >= 2, what="probes arrive")
    assert {a for _, a in spread(proxy, "/hl-active/x", 4)} == {good.addr, switchable.addr}
    switchable.health = 503  # its traffic still answers 200, but its health check fails
    wait_until(lambda: f"{switchable.addr} leaves the rotation" in proxy.log(), what="ejected by probes")
    assert all(r == (200, good.addr) for r in spread(proxy, "/hl-active/x", 6))
    switchable.health = 200
    wait_until(lambda: f"{switchable.addr} is back" in proxy.log(), what="restored by probes")
    assert {a for _, a in spread(proxy, "/hl-active/x", 4)} == {good.addr, switchable.addr}
