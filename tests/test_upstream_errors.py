"""Upstream failures map to 502/503/504 for that route only; a request that dies on a reused
upstream connection before any response byte is retried on a new one (test_retries.py has
the whole retry policy)."""
import threading

import pytest

PYROUTE_ENV = {"TIMEOUT_SERVER": "1", "TIMEOUT_CONNECT": "1"}
DEAD_IP = "127.0.0.99"   # nothing listens there


@pytest.fixture
def routes(proxy, dns, replicas):
    good, bad = replicas[0], replicas[2]
    dns.set_service("er-good", good.ip)
    dns.set_service("er-bad", bad.ip)
    dns.set_service("er-dead", DEAD_IP)
    proxy.reconfigure(serviceName="er-good", servicePath="/good", port=good.port)
    proxy.reconfigure(serviceName="er-bad", servicePath="/bad", port=bad.port)
    proxy.reconfigure(serviceName="er-dead", servicePath="/dead", port=good.port)
    return good, bad


def test_connect_refused_is_503(proxy, routes):
    st, _, body = proxy.get("/dead/x")
    assert st == 503, body
    assert proxy.get("/good/hello")[0] == 200


def test_no_response_in_time_is_504(proxy, routes):
    st, _, body = proxy.get("/bad/slow/5")
    assert st == 504, body
    assert proxy.get("/good/hello")[0] == 200


def test_garbage_response_is_502(proxy, routes):
    st, _, body = proxy.get("/bad/garbage")
    assert st == 502, body
    # and the client connection / the route keep working afterwards
    assert proxy.get("/bad/hello") [0] == 200


def test_get_on_dead_reused_connection_is_retried(proxy, routes):
    _, bad = routes
    with proxy.raw() as c:
        c.request("GET", "/bad/hello", [("Host", "t")])          # leaves a pooled upstream connection
        assert c.read_response()[0].status_code == 200
        c.request("GET", "/bad/drop-reused", [("Host", "t")])
        resp, _ = c.read_response()
    got = bad.requests("/bad/drop-reused")
    assert [r.dropped for r in got] == [True, False], [(r.conn_id, r.index_on_conn, r.dropped) for r in got]
    assert got[1].index_on_conn == 0 and got[1].conn_id != got[0].conn_id   # retried on a new connection
    assert resp.status_code == 200


def test_post_on_dead_reused_connection_is_retried(proxy, routes):
    _, bad = routes
    with proxy.raw() as c:
        c.request("GET", "/bad/hello", [("Host", "t")])
        assert c.read_response()[0].status_code == 200
        c.request("POST", "/bad/drop-reused", [("Host", "t")], body=b"payload")
        resp, _ = c.read_response()
    got = bad.requests("/bad/drop-reused")
    assert [(r.method, r.dropped) for r in got] == [("POST", True), ("POST", False)]
    assert got[1].body_len == 7 and got[1].conn_id != got[0].conn_id
    assert resp.status_code == 200


def test_broken_services_do_not_affect_other_routes(proxy, routes):
    good, _ = routes
    slow = []
    t = threading.Thread(target=lambda: slow.append(proxy.get("/bad/slow/3")[0]))
    t.start()   # an upstream that hangs, concurrently
    try:
        for _ in range(10):
            assert proxy.get("/bad/garbage")[0] == 502
            assert proxy.get("/dead/x")[0] == 503
            st, h, body = proxy.get("/good/hello")
            assert (st, body, h["X-Upstream"]) == (200, b"hello, world!", good.addr)
    finally:
        t.join(10)
    assert slow == [504]
    # a keep-alive client connection survives an error response on it
    with proxy.raw() as c:
        for path, code in [("/bad/garbage", 502), ("/good/hello", 200), ("/dead/x", 503), ("/good/hello", 200)]:
            c.request("GET", path, [("Host", "t")])
            assert c.read_response()[0].status_code == code
