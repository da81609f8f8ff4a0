"""discoveryType=DNS: pyroute looks up tasks.<svc> on an interval (despite TTL 600) and
balances over the task addresses itself: round-robin, least-connections, power of two."""
import threading
from collections import Counter

import pytest

from support.upstream import wait_until

PYROUTE_ENV = {"TASK_REFRESH_INTERVAL": "0.1", "HEALTH_CHECK_INTERVAL": "0.1", "HEALTH_FALL": "2",
               "HEALTH_RISE": "1"}
VIP = "127.0.0.99"  # what the service name resolves to: nothing listens there (no IPVS here)


@pytest.fixture(scope="module")
def tasks5(fleet):
    return fleet.start_group([f"127.0.0.{n}" for n in range(21, 26)])


def deploy(proxy, dns, name, tasks, **params):
    dns.set(name, VIP)
    dns.set(f"tasks.{name}", [t.ip for t in tasks])
    proxy.reconfigure(serviceName=name, servicePath=f"/{name}", port=tasks[0].port, **params)


def served_by(proxy, path, n):
    got = []
    for _ in range(n):
        st, h, _ = proxy.get(path)
        assert st == 200, st
        got.append(h["X-Upstream"])
    return got


def test_round_robin_over_task_addresses_not_the_vip(proxy, dns, tasks5):
    three = tasks5[:3]
    deploy(proxy, dns, "tb-rr", three, discoveryType="DNS")
    got = served_by(proxy, "/tb-rr/x", 9)
    assert Counter(got) == {t.addr: 3 for t in three}
    assert all(got[i] != got[i + 1] for i in range(8))  # strictly in turn


def test_scaling_is_seen_despite_ttl_600_and_in_flight_requests_finish(proxy, dns, tasks5, fleet):
    one, rest = tasks5[0], tasks5[1:3]
    deploy(proxy, dns, "tb-scale", [one], discoveryType="DNS")
    assert set(served_by(proxy, "/tb-scale/x", 3)) == {one.addr}
    dns.set("tasks.tb-scale", [t.ip for t in [one, *rest]])  # scaled to 3; the old answer said TTL 600
    want = {t.addr for t in [one, *rest]}
    seen = set()
    wait_until(lambda: seen.update(served_by(proxy, "/tb-scale/x", 3)) or seen >= want, timeout=5,
               what="new tasks in rotation")

    # a slow request is in flight on `one` when `one` leaves the service
    result = {}
    slow = threading.Thread(target=lambda: result.update(r=proxy.get("/tb-scale/slow/1.5")))
    started = len(one.requests("/slow/"))
    attempts = 0
    while len(one.requests("/slow/")) == started:  # round-robin: at most 3 tries land one on `one`
        attempts += 1
        assert attempts <= 3
        slow = threading.Thread(target=lambda: result.update(r=proxy.get("/tb-scale/slow/1.5")))
        slow.start()
        wait_until(lambda: sum(len(t.requests("/slow/")) for t in [one, *rest]) >= attempts, what="slow request arrived")
        if len(one.requests("/slow/")) == started:
            slow.join()
    dns.set("tasks.tb-scale", [t.ip for t in rest])
    wait_until(lambda: one.addr not in served_by(proxy, "/tb-scale/x", 4), timeout=5, what="removed task out")
    assert one.addr not in served_by(proxy, "/tb-scale/x", 6)
    slow.join()
    status, headers, body = result["r"]
    assert status == 200 and headers["X-Upstream"] == one.addr and body == b"slow done"


def hold(proxy, path):
    """Start a slow request in a thread; returns the thread (join it) and its result dict."""
    result = {}
    t = threading.Thread(target=lambda: result.update(r=proxy.get(path)))
    t.start()
    return t, result


@pytest.mark.parametrize("algorithm", ["leastconn", "p2c"])
def test_busy_task_is_avoided_by_load_aware_algorithms(proxy, dns, tasks5, algorithm):
    a, b = tasks5[3], tasks5[4]
    name = f"tb-{algorithm}"
    deploy(proxy, dns, name, [a, b], discoveryType="DNS", balance=algorithm)
    served_by(proxy, f"/{name}/x", 2)  # both tasks known
    before = {t.addr: len(t.requests("/slow/")) for t in (a, b)}
    t, _ = hold(proxy, f"/{name}/slow/1.5")
    wait_until(lambda: sum(len(u.requests("/slow/")) for u in (a, b)) > sum(before.values()), what="slow request arrived")
    busy = a if len(a.requests("/slow/")) > before[a.addr] else b
    idle = b if busy is a else a
    assert set(served_by(proxy, f"/{name}/x", 6)) == {idle.addr}  # 1 in flight vs 0: always the idle one
    t.join()


def test_round_robin_does_not_avoid_a_busy_task(proxy, dns, tasks5):
    a, b = tasks5[3], tasks5[4]
    deploy(proxy, dns, "tb-rr-busy", [a, b], discoveryType="DNS")
    t, _ = hold(proxy, "/tb-rr-busy/slow/1.5")
    wait_until(lambda: any(u.requests("tb-rr-busy/slow/") for u in (a, b)), what="slow request arrived")
    assert set(served_by(proxy, "/tb-rr-busy/x", 4)) == {a.addr, b.addr}
    t.join()


def test_global_discovery_setting_applies_to_every_service(make_pyroute, dns, tasks5):
    p = make_pyroute(DISCOVERY_TYPE="DNS", TASK_REFRESH_INTERVAL="0.1")
    deploy(p, dns, "tb-global", tasks5[:2])
    assert Counter(served_by(p, "/tb-global/x", 4)) == {tasks5[0].addr: 2, tasks5[1].addr: 2}
    deploy(p, dns, "tb-overlay", tasks5[:2], discoveryType="Overlay")  # the per-service value wins
    st, _, _ = p.get("/tb-overlay/x")
    assert st == 503  # dials the VIP, where nothing listens


def test_service_that_has_no_task_answers_503(proxy, dns, tasks5):
    dns.set("tb-none", VIP)
    dns.remove("tasks.tb-none")
    proxy.reconfigure(serviceName="tb-none", servicePath="/tb-none", port=tasks5[0].port, discoveryType="DNS")
    st, _, body = proxy.get("/tb-none/x")
    assert st == 503 and b"503 Service Unavailable" in body
    dns.set("tasks.tb-none", tasks5[0].ip)
    wait_until(lambda: proxy.get("/tb-none/x")[0] == 200, timeout=5, what="first task appears")


def test_task_balancing_in_every_worker(make_pyroute, dns, tasks5):
    p = make_pyroute(DISCOVERY_TYPE="DNS", TASK_REFRESH_INTERVAL="0.1", WORKERS="2")
    deploy(p, dns, "tb-workers", tasks5[:3])
    seen = set()
    wait_until(lambda: seen.update(served_by(p, "/tb-workers/x", 3)) or len(seen) == 3, what="all tasks reached")
    assert seen == {t.addr for t in tasks5[:3]}


@pytest.mark.parametrize("params, message", [
    ({"discoveryType": "IPVS"}, "discoveryType"),
    ({"balance": "random"}, "balance"),
    ({"sessionType": "sticky-client"}, "sessionType"),
    ({"sessionType": "sticky-server", "sessionCookie": "a b"}, "sessionCookie"),
    ({"healthCheckPath": "health"}, "healthCheckPath"),
    ({"healthCheckInterval": "0"}, "healthCheckInterval"),
    ({"healthCheckFall": "x"}, "healthCheckFall"),
])
def test_bad_balancing_params_are_refused_and_change_nothing(proxy, tasks5, params, message):
    before = proxy.admin("config", type="json")[1]
    st, body = proxy.admin("reconfigure", serviceName="tb-bad", servicePath="/tb-bad", port=tasks5[0].port, **params)
    assert st == 400 and body["Status"] == "NOK" and message in body["Message"]
    assert proxy.admin("config", type="json")[1] == before
