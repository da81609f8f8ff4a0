"""issue 20, drain before stop: with the built-in Swarm listener, a task whose desired
state is no longer `running` (the fake Engine API says so, as Swarm does at the start of a
rolling update, without any task event) takes no new request from that moment; requests
in flight on it finish, its pooled idle connections are closed and its busy ones are not
pooled again. A new task joins once the Engine says it is running, not when DNS first
lists it."""
import threading

import pytest

from support.engine import FakeEngine
from support.upstream import wait_until


@pytest.fixture
def engine():
    e = FakeEngine()
    yield e
    e.close()


def service_labels(name, port):
    return {"com.df.notify": "true", "com.df.servicePath": f"/{name}", "com.df.port": str(port),
            "com.df.discoveryType": "DNS"}


def in_background(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_task_swarm_stops_drains_and_a_new_one_joins_when_running(engine, make_pyroute, fleet, dns, workers):
    name = f"ro-web{workers}"
    a, b = fleet.start_group([f"127.0.0.5{workers}", f"127.0.0.6{workers}"])
    c_ip = f"127.0.0.7{workers}"
    dns.set(name, "127.0.0.99")
    dns.set(f"tasks.{name}", [a.ip, b.ip])
    sid = engine.create(name, service_labels(name, a.port))
    engine.set_tasks(sid, [(a.ip, "running", "running"), (b.ip, "running", "running")])
    # DNS is looked up once a minute: whatever changes below comes from the Engine API.
    p = make_pyroute(DOCKER_HOST=engine.docker_host, SWARM_POLL_INTERVAL="0.2", TASK_REFRESH_INTERVAL="60",
                     WORKERS=workers, BALANCE="roundrobin")
    wait_until(lambda: p.get(f"/{name}/hello")[0] == 200, what="route from the labels")
    wait_until(lambda: engine.open_streams > 0, what="the listener's event stream open")

    # In flight on each task, through one worker (a keep-alive client sticks to it).
    conn = p.conn()
    slow = []
    while not (a.requests("/slow/3") and b.requests("/slow/3")):  # (with 2 workers, each balances alone)
        assert len(slow) < 8
        slow.append(in_background(lambda: p.get(f"/{name}/slow/3")))
        wait_until(lambda: len(a.requests("/slow/3")) + len(b.requests("/slow/3")) == len(slow), what="in flight")
    on_b = len(b.requests("/slow/3"))
    for i in range(4):  # and an idle pooled connection beside each busy one
        conn.request("GET", f"/{name}/warm{i}")
        assert conn.getresponse().read()
    wait_until(lambda: b.open > on_b, what="b holds busy and idle connections")

    engine.set_tasks(sid, [(a.ip, "running", "running"), (b.ip, "shutdown", "running")])
    engine.rolling(sid, "updating")
    wait_until(lambda: b.open == on_b, what="b's idle connections closed, the busy ones left alone")
    for i in range(6):
        st, h, _ = p.get(f"/{name}/after{i}")
        assert (st, h["X-Upstream"]) == (200, a.addr)
    for t, out in slow:
        t.join(10)
        assert out[0][0] == 200
    assert sum(out[0][1]["X-Upstream"] == b.addr for _, out in slow) == on_b  # b's requests finished there
    wait_until(lambda: b.open == 0, what="b's busy connection closed after its response, not pooled")
    assert not b.requests("/after")

    # A new task: DNS lists it as soon as Swarm starts it; it joins when the Engine says running.
    c = fleet.start_group([c_ip], port=a.port)[0]
    dns.set(f"tasks.{name}", [a.ip, b.ip, c_ip])
    engine.set_tasks(sid, [(a.ip, "running", "running"), (b.ip, "shutdown", "shutdown"),
                           (c_ip, "running", "starting")])
    wait_until(lambda: "tasks not running: %s, %s" % (b.ip, c_ip) in p.log(), what="c seen starting")
    for i in range(4):
        assert p.get(f"/{name}/starting{i}")[1]["X-Upstream"] == a.addr
    engine.set_tasks(sid, [(a.ip, "running", "running"), (b.ip, "shutdown", "shutdown"),
                           (c_ip, "running", "running")])
    wait_until(lambda: p.get(f"/{name}/joined")[1]["X-Upstream"] == c.addr, what="c in the rotation")
    engine.rolling(sid, "completed")
    assert not b.requests("/starting") and not b.requests("/joined")
    conn.close()
    for u in (a, b, c):
        fleet.stop_upstream(u)


def test_slow_start_ramps_a_new_task_up(make_pyroute, fleet, dns):
    a, c = fleet.start_group(["127.0.0.56", "127.0.0.57"])
    dns.set("ro-slow", "127.0.0.99")
    dns.set("tasks.ro-slow", [a.ip])
    p = make_pyroute(TASK_REFRESH_INTERVAL="0.1")
    p.reconfigure(serviceName="ro-slow", servicePath="/ro-slow", port=a.port, discoveryType="DNS", slowStart="60s")
    assert p.get("/ro-slow/x")[0] == 200
    dns.set("tasks.ro-slow", [a.ip, c.ip])
    wait_until(lambda: f"ro-slow: tasks {a.addr}, {c.addr}" in p.log(), what="c joined")
    served = [p.get(f"/ro-slow/ramp{i}")[1]["X-Upstream"] for i in range(40)]
    assert served.count(c.addr) < 10  # a second into a 60 s ramp: about 1 in 60 (round-robin alone: 20)
    for u in (a, c):
        fleet.stop_upstream(u)


def test_bad_slow_start_is_400(proxy):
    for value in ("-1", "fast", "0", "10h"):
        st, body = proxy.admin("reconfigure", {"serviceName": "ro-bad", "servicePath": "/ro-bad", "port": "80",
                                               "slowStart": value})
        assert st == 400 and body["Status"] == "NOK", (value, body)
