"""Reconfiguring never disturbs traffic: continuous keep-alive requests to service A
while service B is added/removed 300 times and A is moved to another upstream port,
with one process and with two workers (where every change crosses to the workers)."""
import http.client
import threading

import pytest

from support.upstream import wait_until


@pytest.fixture(params=["1", "2"], ids=["workers=1", "workers=2"])
def live_proxy(request, make_pyroute):
    if request.param == "1":
        return request.getfixturevalue("proxy")
    return make_pyroute(WORKERS="2")


def test_live_reconfigure_drops_nothing(live_proxy, dns, replicas, alt):
    proxy = live_proxy
    a_old = replicas[0]                       # 127.0.0.11:P
    a_new = alt[0]                            # 127.0.0.11:Q
    assert a_old.ip == a_new.ip and a_old.port != a_new.port
    dns.set_service("live-a", a_old.ip)
    dns.set_service("live-b", replicas[1].ip)
    proxy.reconfigure(serviceName="live-a", servicePath="/live-a", port=a_old.port)
    valid = {a_old.addr, a_new.addr}

    stop = threading.Event()
    results: list[tuple[int, str | None, bytes]] = []
    errors: list[BaseException] = []

    def client():
        c = http.client.HTTPConnection("127.0.0.1", proxy.http_port, timeout=10)
        try:
            while not stop.is_set():
                c.request("GET", "/live-a/hello")
                r = c.getresponse()
                results.append((r.status, r.getheader("X-Upstream"), r.read()))
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 10, timeout=5, what="traffic to start")
        for i in range(300):
            proxy.reconfigure(serviceName="live-b", servicePath="/live-b", port=replicas[1].port)
            if i % 50 == 0:
                st, h, body = proxy.get("/live-b/hello")
                assert (st, h["X-Upstream"]) == (200, replicas[1].addr)
            proxy.remove("live-b")
            if i == 150:
                proxy.reconfigure(serviceName="live-a", servicePath="/live-a", port=a_new.port)
                # a request started after the 200 goes to the new port
                st, h, _ = proxy.get("/live-a/hello")
                assert (st, h["X-Upstream"]) == (200, a_new.addr)
                switched_at = len(results)
        n_before_stop = len(results)
        wait_until(lambda: len(results) >= n_before_stop + 10, timeout=5, what="traffic after the changes")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not errors, errors
    bad = [r for r in results if r[0] != 200 or r[1] not in valid or r[2] != b"hello, world!"]
    assert not bad, f"{len(bad)} of {len(results)} requests failed, e.g. {bad[:5]}"
    assert len(results) > 50
    # after the move, the keep-alive clients end up on the new upstream
    assert results[-1][1] == a_new.addr, results[-5:]
    assert {r[1] for r in results[switched_at:]} >= {a_new.addr}
    assert proxy.get("/live-b/hello")[0] == 503
