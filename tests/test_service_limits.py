"""issue 20, per-service limits: maxConn per task with a queue bounded by TIMEOUT_QUEUE
(then 503), maxRequestsInFlight per service, rateLimit/rateLimitBurst per client address
answered 429 with Retry-After and DFP's 429 page. Limits are per pyroute process."""
import http.client

import pytest

from support.proxy import register
from support.upstream import wait_until
from test_rolling import in_background

PYROUTE_ENV = {"TIMEOUT_QUEUE": "20"}


@pytest.fixture
def up(fleet):
    u = fleet.start_group(["127.0.0.81"])[0]
    yield u
    fleet.stop_upstream(u)


def test_max_conn_queues_requests_beyond_it(proxy, dns, up):
    register(proxy, dns, up, serviceName="lm-conn", maxConn="1")
    calls = [in_background(lambda i=i: proxy.get(f"/lm-conn/slow/0.5?{i}")) for i in range(3)]
    for t, out in calls:
        t.join(20)
        assert out[0][0] == 200
    assert len(up.requests("/lm-conn/slow")) == 3
    assert up.peak == 1  # they waited their turn in pyroute's queue


def test_a_queued_request_gets_503_after_timeout_queue(make_pyroute, dns, up):
    p = make_pyroute(TIMEOUT_QUEUE="1")
    register(p, dns, up, serviceName="lm-queue", maxConn="1")
    slow = in_background(lambda: p.get("/lm-queue/slow/4"))
    wait_until(lambda: up.requests("/lm-queue/slow"), what="the slow request upstream")
    st, _, body = p.get("/lm-queue/hello")
    assert st == 503 and b"503 Service Unavailable" in body
    assert not up.requests("/lm-queue/hello")  # it never left the queue
    slow[0].join(10)
    assert slow[1][0][0] == 200
    assert p.get("/lm-queue/hello")[0] == 200  # room again


def test_max_requests_in_flight_per_service(proxy, dns, up):
    register(proxy, dns, up, serviceName="lm-flight", maxRequestsInFlight="2")
    calls = [in_background(lambda i=i: proxy.get(f"/lm-flight/slow/0.5?{i}")) for i in range(5)]
    for t, out in calls:
        t.join(20)
        assert out[0][0] == 200
    assert up.peak == 2


def test_rate_limit_answers_429_with_retry_after_per_client_address(proxy, dns, up):
    register(proxy, dns, up, serviceName="lm-rate", rateLimit="1/m", rateLimitBurst="3")
    conn = proxy.conn()
    statuses = []
    for i in range(5):
        conn.request("GET", f"/lm-rate/hello?{i}")
        r = conn.getresponse()
        body = r.read()
        statuses.append(r.status)
        if r.status == 429:
            retry_after, page = r.getheader("Retry-After"), body
    conn.close()
    assert statuses == [200, 200, 200, 429, 429]
    assert 1 <= int(retry_after) <= 60
    assert b"429 Too Many Requests" in page
    assert len(up.requests("/lm-rate/hello")) == 3
    other = http.client.HTTPConnection("127.0.0.1", proxy.http_port, timeout=10, source_address=("127.0.0.2", 0))
    other.request("GET", "/lm-rate/hello?other")
    assert other.getresponse().status == 200  # another client address has a bucket of its own
    other.close()


@pytest.mark.parametrize("params", [
    {"maxConn": "-1"}, {"maxConn": "x"}, {"maxRequestsInFlight": "1.5"}, {"rateLimit": "fast"},
    {"rateLimit": "0/s"}, {"rateLimit": "5/h"}, {"rateLimitBurst": "3"},
    {"rateLimit": "5/s", "sessionType": "sticky-server"},
])
def test_bad_limits_are_400_and_change_nothing(proxy, params):
    st, body = proxy.admin("reconfigure", {"serviceName": "lm-bad", "servicePath": "/lm-bad", "port": "80", **params})
    assert st == 400 and body["Status"] == "NOK", body
    assert proxy.get("/lm-bad/x")[0] == 503


def test_with_workers_the_rate_is_divided_among_them(make_pyroute, dns, up):
    p = make_pyroute(WORKERS="2")
    register(p, dns, up, serviceName="lm-workers", rateLimit="1/m", rateLimitBurst="4")
    statuses = [p.get(f"/lm-workers/hello?{i}")[0] for i in range(10)]  # fresh connections: either worker
    assert set(statuses) == {200, 429}
    assert 2 <= statuses.count(200) <= 4  # each worker allows 4/2: the service sees at most the burst


def test_rate_limit_keys_on_the_trusted_client_address(make_pyroute, dns, up):
    """Behind a load balancer in TRUSTED_PROXIES, each client behind it has its own bucket."""
    p = make_pyroute(TRUSTED_PROXIES="127.0.0.0/8")
    register(p, dns, up, serviceName="lm-xff", rateLimit="1/m", rateLimitBurst="2")
    first = [p.get(f"/lm-xff/hello?{i}", headers={"X-Forwarded-For": "203.0.113.7"})[0] for i in range(3)]
    assert first == [200, 200, 429]
    assert p.get("/lm-xff/hello?other", headers={"X-Forwarded-For": "203.0.113.8"})[0] == 200
