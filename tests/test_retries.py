"""issue 20, safe retries: a request is retried (on another task where there is one) when
its connection failed, or when a reused keep-alive connection closed before any response
byte (the upstream had closed it idle: nothing was processed), POSTs with bodies included;
a request an upstream read and then died on is never retried. Each retry is counted per
task and shown in the access log."""
import hashlib
import json
from pathlib import Path

from support.proxy import register
from support.upstream import wait_until

PYROUTE_ENV = {"DEBUG": "true", "TIMEOUT_CONNECT": "1", "TASK_REFRESH_INTERVAL": "0.1", "HEALTH_FALL": "1000"}
BODY = b"payload-" * 1000  # 8 KB


def access_lines(proxy, path):
    out = []
    for line in Path(proxy.stderr_path).read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"path":"{path}"' in line:
            out.append(json.loads(line))
    return out


def access_line(proxy, path):
    wait_until(lambda: access_lines(proxy, path), what=f"access log line for {path}")
    return access_lines(proxy, path)[-1]


def reused_then(proxy, prefix, method, target, body=b""):
    """Leave a pooled upstream connection with one GET, then send `method target` on it."""
    with proxy.raw() as c:
        c.request("GET", f"{prefix}/hello", [("Host", "t")])
        assert c.read_response()[0].status_code == 200
        c.request(method, target, [("Host", "t")], body=body)
        return c.read_response()


def test_post_on_a_reused_connection_closed_idle_is_retried_with_its_body(proxy, dns, replicas):
    up = replicas[0]
    register(proxy, dns, up, serviceName="rt-post")
    resp, body = reused_then(proxy, "/rt-post", "POST", "/rt-post/drop-reused?a", BODY)
    got = up.requests("/rt-post/drop-reused?a")
    assert [(r.method, r.dropped) for r in got] == [("POST", True), ("POST", False)]
    assert got[1].index_on_conn == 0 and got[1].conn_id != got[0].conn_id  # a new connection
    assert (got[1].body_len, got[1].body_sha256) == (len(BODY), hashlib.sha256(BODY).hexdigest())
    assert resp.status_code == 200
    line = access_line(proxy, "/rt-post/drop-reused?a")
    assert (line["status"], line["retried"], line["retries"]) == (200, True, 1)


def test_chunked_post_on_a_reused_connection_is_retried(proxy, dns, replicas):
    up = replicas[0]
    register(proxy, dns, up, serviceName="rt-chunk")
    with proxy.raw() as c:
        c.request("GET", "/rt-chunk/hello", [("Host", "t")])
        assert c.read_response()[0].status_code == 200
        headers = [("Host", "t"), ("Transfer-Encoding", "chunked")]
        c.expect("POST", "/rt-chunk/drop-reused", headers, b"hello world")
        c.send_raw(b"POST /rt-chunk/drop-reused HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        resp, _ = c.read_response()
    got = up.requests("/rt-chunk/drop-reused")
    assert [r.dropped for r in got] == [True, False]
    assert got[1].body_sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert resp.status_code == 200


def test_post_an_upstream_read_and_died_on_is_not_retried(proxy, dns, replicas):
    up = replicas[0]
    register(proxy, dns, up, serviceName="rt-died")
    st, _, _ = proxy.get("/rt-died/read-drop", method="POST", body=BODY)
    assert st == 502
    got = up.requests("/rt-died/read-drop")
    assert [(r.method, r.body_len, r.dropped) for r in got] == [("POST", len(BODY), True)]
    assert access_line(proxy, "/rt-died/read-drop")["retries"] == 0


def test_body_too_large_to_keep_is_not_retried(proxy, dns, replicas):
    up = replicas[0]
    register(proxy, dns, up, serviceName="rt-big")
    big = b"x" * (256 * 1024)
    resp, _ = reused_then(proxy, "/rt-big", "POST", "/rt-big/drop-reused", big)
    assert resp.status_code == 502
    assert [r.dropped for r in up.requests("/rt-big/drop-reused")] == [True]


def test_retries_zero_turns_retrying_off(proxy, dns, replicas):
    up = replicas[0]
    register(proxy, dns, up, serviceName="rt-off", retries="0")
    resp, _ = reused_then(proxy, "/rt-off", "GET", "/rt-off/drop-reused")
    assert resp.status_code == 502
    assert [r.dropped for r in up.requests("/rt-off/drop-reused")] == [True]


def test_retry_on_without_empty_response(proxy, dns, replicas):
    up = replicas[0]
    register(proxy, dns, up, serviceName="rt-conn", retryOn="connect-failure")
    resp, _ = reused_then(proxy, "/rt-conn", "GET", "/rt-conn/drop-reused")
    assert resp.status_code == 502


def test_connect_failure_retries_any_method_on_another_task_counted_per_task(proxy, dns, fleet):
    good = fleet.start_group(["127.0.0.41"])[0]
    dead = "127.0.0.42"  # nothing listens there
    dns.set("rt-tasks", "127.0.0.99")
    dns.set("tasks.rt-tasks", [good.ip, dead])
    proxy.reconfigure(serviceName="rt-tasks", servicePath="/rt-tasks", port=good.port, discoveryType="DNS")
    for i in range(4):
        st, h, _ = proxy.get(f"/rt-tasks/upload?{i}", method="POST", body=b"x" * 100)
        assert (st, h["X-Upstream"]) == (200, good.addr)
    assert sum(r.method == "POST" for r in good.requests("/rt-tasks/upload")) == 4
    lines = [access_line(proxy, f"/rt-tasks/upload?{i}") for i in range(4)]
    retried = [line for line in lines if line["retries"]]
    assert retried and all(line["retries"] == 1 and line["upstream"] == good.addr for line in retried)
    from test_observability import samples, value
    assert value(samples(proxy), "pyroute_upstream_retries_total", service="rt-tasks",
                 address=f"{dead}:{good.port}") == len(retried)
    fleet.stop_upstream(good)


def test_connect_failure_with_retries_zero_is_503(proxy, dns, fleet):
    good = fleet.start_group(["127.0.0.43"])[0]
    dns.set("rt-once", "127.0.0.99")
    dns.set("tasks.rt-once", [good.ip, "127.0.0.44"])
    proxy.reconfigure(serviceName="rt-once", servicePath="/rt-once", port=good.port, discoveryType="DNS",
                      retries="0")
    statuses = sorted(proxy.get("/rt-once/x")[0] for _ in range(4))
    assert statuses == [200, 200, 503, 503]
    fleet.stop_upstream(good)


def test_bad_retry_parameters_are_400(proxy):
    for params in ({"retries": "-1"}, {"retries": "x"}, {"retries": "11"}, {"retryOn": "timeout"}):
        st, body = proxy.admin("reconfigure", {"serviceName": "rt-bad", "servicePath": "/rt-bad", "port": "80",
                                               **params})
        assert st == 400 and body["Status"] == "NOK", (params, body)
    assert proxy.get("/rt-bad/x")[0] == 503  # nothing was stored


def two_tasks(proxy, dns, fleet, name, ips, **params):
    """A service with two tasks found by DNS (tasks.<name>): the upstreams on `ips`."""
    tasks = fleet.start_group(ips)
    dns.set(name, "127.0.0.99")
    dns.set(f"tasks.{name}", [t.ip for t in tasks])
    proxy.reconfigure(serviceName=name, servicePath=f"/{name}", port=tasks[0].port, discoveryType="DNS", **params)
    return tasks


def retries_of(proxy, service, task):
    from test_observability import samples, value
    return value(samples(proxy), "pyroute_upstream_retries_total", service=service, address=task.addr)


def test_retry_on_503_sends_an_idempotent_request_to_the_other_task(proxy, dns, fleet):
    sick, well = two_tasks(proxy, dns, fleet, "r503-get", ["127.0.0.61", "127.0.0.62"], retryOn="503")
    for i in range(4):
        st, h, body = proxy.get(f"/r503-get/unavailable-on/{sick.ip}?{i}")
        assert (st, h["X-Upstream"]) == (200, well.addr)
    answered_503 = len(sick.requests("/r503-get/unavailable-on"))
    assert answered_503 >= 1  # round robin sent some first tries there
    assert len(well.requests("/r503-get/unavailable-on")) == 4
    lines = [access_line(proxy, f"/r503-get/unavailable-on/{sick.ip}?{i}") for i in range(4)]
    assert sorted(line["retries"] for line in lines) == sorted([1] * answered_503 + [0] * (4 - answered_503))
    assert all((line["status"], line["upstream"]) == (200, well.addr) for line in lines)
    assert retries_of(proxy, "r503-get", sick) == answered_503
    fleet.stop_upstream(sick)
    fleet.stop_upstream(well)


def test_retry_on_503_replays_an_idempotent_body(proxy, dns, fleet):
    sick, well = two_tasks(proxy, dns, fleet, "r503-put", ["127.0.0.63", "127.0.0.64"], retryOn="503")
    for i in range(2):  # one of the two first tries meets the sick task, on a fresh connection
        st, h, body = proxy.get(f"/r503-put/unavailable-on/{sick.ip}?{i}", method="PUT", body=BODY)
        assert (st, h["X-Upstream"]) == (200, well.addr)
        echoed = json.loads(body)
        assert (echoed["method"], echoed["body_len"], echoed["body_sha256"]) == (
            "PUT", len(BODY), hashlib.sha256(BODY).hexdigest())
    assert [r.body_len for r in sick.requests("/r503-put/unavailable-on")] == [len(BODY)]
    fleet.stop_upstream(sick)
    fleet.stop_upstream(well)


def test_retry_on_503_passes_a_post_on(proxy, dns, fleet):
    sick, well = two_tasks(proxy, dns, fleet, "r503-post", ["127.0.0.65", "127.0.0.66"], retryOn="503")
    answers = [proxy.get(f"/r503-post/unavailable-on/{sick.ip}?{i}", method="POST", body=b"x" * 100)
               for i in range(4)]
    assert sorted(st for st, _, _ in answers) == [200, 200, 503, 503]
    assert [body for st, _, body in answers if st == 503] == [f"unavailable: {sick.addr}".encode()] * 2
    assert len(sick.requests("/r503-post/unavailable-on")) == 2
    assert retries_of(proxy, "r503-post", sick) == 0
    fleet.stop_upstream(sick)
    fleet.stop_upstream(well)


def test_503_passes_on_without_retry_on_503_or_with_retries_zero(proxy, dns, fleet):
    for name, ips, params in (("r503-none", ["127.0.0.67", "127.0.0.68"], {}),
                              ("r503-zero", ["127.0.0.69", "127.0.0.70"], {"retryOn": "503", "retries": "0"})):
        sick, well = two_tasks(proxy, dns, fleet, name, ips, **params)
        statuses = sorted(proxy.get(f"/{name}/unavailable-on/{sick.ip}?{i}")[0] for i in range(4))
        assert statuses == [200, 200, 503, 503], name
        assert len(sick.requests(f"/{name}/unavailable-on")) == 2
        fleet.stop_upstream(sick)
        fleet.stop_upstream(well)


def test_the_last_tries_503_reaches_the_client_intact(proxy, dns, fleet):
    a, b = two_tasks(proxy, dns, fleet, "r503-all", ["127.0.0.71", "127.0.0.72"],
                     retryOn="connect-failure,empty-response,503", retries="2")
    with proxy.raw() as c:
        c.request("GET", "/r503-all/status/503", [("Host", "t")])
        resp, body = c.read_response()
        c.request("GET", "/r503-all/hello", [("Host", "t")])  # the connection goes on after it
        assert c.read_response()[0].status_code == 200
    # the first try and two retries, alternating between the tasks: the last on the first's task
    tries = sorted([(len(t.requests("/r503-all/status/503")), t.addr) for t in (a, b)])
    assert [n for n, _ in tries] == [1, 2]
    last = tries[1][1]
    headers = {k.decode().lower(): v.decode() for k, v in resp.headers}
    assert (resp.status_code, body) == (503, b"status 503")
    assert (headers["content-length"], headers["x-upstream"]) == ("10", last)
    line = access_line(proxy, "/r503-all/status/503")
    assert (line["status"], line["retries"], line["upstream"]) == (503, 2, last)
    fleet.stop_upstream(a)
    fleet.stop_upstream(b)
