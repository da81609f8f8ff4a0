"""metrics.merge and the two renderings, checked with real parsers (prometheus_client's
text parser, the csv module): sums across workers, health by the latest change, label escaping."""
import csv
import io
import math
from bisect import bisect_left

from hypothesis import given, settings
from hypothesis import strategies as st

from prometheus_client.parser import text_string_to_metric_families

from pyroute import latency, metrics
from pyroute.dataplane.exchange import Exchange


def exchange(method, took, upstream_took, address=None):
    """An exchange that ended at time 100.0, `took` s after it began (sent upstream `upstream_took` before the end)."""
    ex = Exchange(True, True, method, b"/", False, False, 100.0 - took)
    ex.address = address
    if upstream_took >= 0:
        ex.sent_at = 100.0 - upstream_took
        ex.response_at = ex.sent_at + upstream_took * 0.6
    return ex


def worker_snapshot(name, requests, health, changed, took=0.004):
    stats = metrics.ServiceStats('we"ird\\svc')
    address = stats.address(("10.0.0.5", 80))
    address.connected(0.0003)
    for _ in range(requests):
        stats.count(exchange(b"GET", took, took / 2, ("10.0.0.5", 80)), 200, 100.0, 10, 20)
    stats.count(exchange(b"PROPFIND", took, -1.0), 207, 100.0, 0, 0)
    address.connects, address.reuses, address.health, address.changed = 1, requests - 1, health, changed
    return {
        "services": {stats.name: stats.to_json(latency.slot_now())},
        "connections": {"active": 1, "total": 2, "bytes_in": 3, "bytes_out": 4},
        "dns": {"lookups": 5, "failures": 1},
        "routes": [{"service": stats.name, "index": 0, "paths": ["/x"], "domains": [], "backend": "svc:80",
                    "addresses": ["10.0.0.5:80"]}],
        "processes": [{"name": name, "pid": 1, "rss": 100, "fds": 7, "revision": 3, "reloads": 4}],
    }


def parse(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_merge_sums_and_latest_health_wins():
    merged = metrics.merge([worker_snapshot("w1", 3, "up", 10.0), worker_snapshot("w2", 5, "down", 20.0)])
    got = parse(metrics.render_prometheus(merged).decode())
    svc = 'we"ird\\svc'
    assert got[("pyroute_requests_total", (("code", "200"), ("method", "GET"), ("service", svc)))] == 8
    assert got[("pyroute_requests_total", (("code", "207"), ("method", "other"), ("service", svc)))] == 2
    assert got[("pyroute_request_duration_seconds_count", (("service", svc),))] == 10
    assert got[("pyroute_request_duration_seconds_bucket", (("le", "0.0025"), ("service", svc)))] == 0
    assert got[("pyroute_request_duration_seconds_bucket", (("le", "0.005"), ("service", svc)))] == 10
    assert got[("pyroute_upstream_duration_seconds_count", (("service", svc),))] == 8
    assert got[("pyroute_upstream_first_byte_seconds_bucket", (("le", "0.001"), ("service", svc)))] == 0
    assert got[("pyroute_upstream_first_byte_seconds_bucket", (("le", "0.0025"), ("service", svc)))] == 8
    assert got[("pyroute_upstream_connect_seconds_count", (("address", "10.0.0.5:80"), ("service", svc)))] == 2
    assert got[("pyroute_upstream_connect_seconds_bucket",
                (("address", "10.0.0.5:80"), ("le", "0.001"), ("service", svc)))] == 2
    assert got[("pyroute_upstream_reuses_total", (("address", "10.0.0.5:80"), ("service", svc)))] == 6
    assert got[("pyroute_upstream_up", (("address", "10.0.0.5:80"), ("service", svc)))] == 0  # w2's change is later
    assert got[("pyroute_client_connections", ())] == 2
    assert got[("pyroute_dns_failures_total", ())] == 2
    assert got[("pyroute_route_table_revision", (("process", "w2"),))] == 3
    assert got[("pyroute_service_sent_bytes_total", (("service", svc),))] == 160


def test_csv_has_haproxy_columns():
    snap = metrics.merge([worker_snapshot("w1", 3, "up", 10.0)])
    text = metrics.render_csv(snap).decode()
    rows = list(csv.DictReader(io.StringIO(text[2:])))
    assert list(rows[0])[:4] == ["pxname", "svname", "qcur", "qmax"]
    server = next(r for r in rows if r["svname"] == "10.0.0.5:80")
    assert server["status"] == "UP" and server["lbtot"] == "3"
    backend = next(r for r in rows if r["svname"] == "BACKEND")
    assert backend["hrsp_2xx"] == "4" and backend["req_tot"] == "4"


def families(text):
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_haproxy_exporter_families_beside_pyroute_ones():
    """Issue 17: DFP's /metrics spoke haproxy_exporter's names; dashboards and alerts on them
    keep working (names, types, labels frontend/backend/server), computed from the same
    counters as the pyroute_* families."""
    snap = metrics.merge([worker_snapshot("w1", 3, "up", 10.0), worker_snapshot("w2", 5, "down", 20.0)])
    snap["routes"][0]["haproxy_backend"] = "01-svc-be80_0"
    snap["services"][""] = metrics.ServiceStats("").to_json(0)
    snap["services"][""]["responses"] = [["GET", 503, 2], ["GET", 400, 1]]  # unrouted, and one refused head
    text = metrics.render_prometheus(snap, {"rejected": 2, "shadowed": 1}).decode()
    got = parse(text)
    kinds = families(text)
    fe, be = (("frontend", "services"),), (("backend", "01-svc-be80_0"),)
    server = (("backend", "01-svc-be80_0"), ("server", "10.0.0.5:80"))
    assert got[("haproxy_up", ())] == 1
    assert got[("haproxy_frontend_http_requests_total", fe)] == 13  # 8 GET + 2 PROPFIND + 3 unrouted
    assert got[("haproxy_frontend_http_responses_total", (("code", "2xx"), ("frontend", "services")))] == 10
    assert got[("haproxy_frontend_http_responses_total", (("code", "5xx"), ("frontend", "services")))] == 2
    assert got[("haproxy_frontend_request_errors_total", fe)] == 1
    assert got[("haproxy_frontend_current_sessions", fe)] == got[("pyroute_client_connections", ())] == 2
    assert got[("haproxy_frontend_connections_total", fe)] == got[("pyroute_client_connections_total", ())]
    assert got[("haproxy_frontend_bytes_out_total", fe)] == got[("pyroute_client_sent_bytes_total", ())]
    assert got[("haproxy_backend_http_responses_total", (("backend", "01-svc-be80_0"), ("code", "2xx")))] == 10
    assert got[("haproxy_backend_sessions_total", be)] == 10
    assert got[("haproxy_backend_bytes_out_total", be)] == 160
    assert got[("haproxy_backend_up", be)] == 0  # its one server is down (w2's later change)
    assert got[("haproxy_backend_current_queue", be)] == 0
    assert got[("haproxy_server_up", server)] == 0
    assert got[("haproxy_server_server_selected_total", server)] == 8  # connects + reuses of both workers
    assert got[("pyroute_rejected_services", ())] == 2 and got[("pyroute_shadowed_routes", ())] == 1
    assert kinds["haproxy_frontend_http_requests"] == kinds["haproxy_backend_http_responses"] == "counter"
    assert kinds["haproxy_backend_up"] == kinds["haproxy_server_up"] == kinds["haproxy_frontend_current_sessions"] \
        == "gauge"
    assert kinds["pyroute_requests"] == "counter"  # the pyroute families are all still there


def test_recent_latency_percentiles_merge_across_workers():
    """Two workers' slots add up: p50/p95 from the many fast requests, p99 from the slow ones."""
    merged = metrics.merge([worker_snapshot("w1", 97, "up", 10.0, took=0.004),
                            worker_snapshot("w2", 1, "up", 10.0, took=0.25)])
    svc = merged["services"]['we"ird\\svc']
    got = latency.summary(svc["recent"], latency.slot_now())
    assert got["requests_minute"] == 100
    assert 0.004 * 0.95 < got["p50_ms"] / 1000 < 0.004 * 1.05 and got["p95_ms"] == got["p50_ms"]
    assert 0.25 * 0.95 < got["p99_ms"] / 1000 < 0.25 * 1.05
    task = latency.summary(svc["addresses"]["10.0.0.5:80"]["recent"], latency.slot_now())
    assert task["requests_minute"] == 98 and task["p99_ms"] == got["p99_ms"]  # PROPFIND had no upstream


def test_recent_rates_per_slot():
    stats = metrics.ServiceStats("rates")
    stats.address(("10.0.0.7", 80))
    for i in range(20):
        stats.count(exchange(b"GET", 0.001, 0.0005, ("10.0.0.7", 80)), 502 if i % 4 == 0 else 200, 100.0, 0, 0)
    stats.close_slot(500)
    for _ in range(10):
        stats.count(exchange(b"GET", 0.001, 0.0005), 200, 100.0, 0, 0)
    got = latency.summary(stats.to_json(501)["recent"], 501)
    assert got["request_rate"][-2:] == [20 / latency.SLOT, 10 / latency.SLOT]
    assert got["error_rate"][-2:] == [5 / latency.SLOT, 0.0]
    assert got["requests_minute"] == 30 and len(got["request_rate"]) == latency.HISTORY_SLOTS
    assert latency.summary(stats.to_json(501)["recent"], 501 + latency.MINUTE_SLOTS)["requests_minute"] == 0
    task = latency.summary(stats.to_json(501)["addresses"]["10.0.0.7:80"]["recent"], 501)
    assert task["request_rate"][-2:] == [20 / latency.SLOT, 0.0] and task["error_rate"][-2:] == [5 / latency.SLOT, 0.0]


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.floats(min_value=0.0, max_value=200.0),
                 st.sampled_from([*metrics.DURATION_BOUNDS, *latency.BOUNDS]),
                 st.sampled_from(metrics.DURATION_BOUNDS).map(lambda b: math.nextafter(b, math.inf))))
def test_duration_bucket_from_the_latency_bucket(took):
    """One bisect gives both buckets: the Prometheus one (le, exact) read off the latency one."""
    bucket, split = metrics.DURATION_OF_LATENCY[bisect_left(latency.BOUNDS, took)]
    assert (bucket if took <= split else bucket + 1) == bisect_left(metrics.DURATION_BOUNDS, took)


def test_rotate_closes_only_services_that_counted(monkeypatch):
    """An idle service closes nothing; one that counted (or refused) closes its slot and its tasks'."""
    stats = metrics.DataStats()
    busy, idle = stats.service("busy"), stats.service("idle")
    busy.address(("10.0.0.7", 80))
    idle.address(("10.0.0.8", 80))
    busy.count(exchange(b"GET", 0.002, 0.001, ("10.0.0.7", 80)), 503, 100.0, 0, 0)
    stats.unrouted.count_refused(400)
    slot = stats.slot
    monkeypatch.setattr(latency, "slot_now", lambda: slot + 1)
    stats.rotate()
    assert [s[0] for s in busy.recent.slots] == [slot] and busy.recent.slots[0][2] == 1
    assert [s[0] for s in busy.addresses[("10.0.0.7", 80)].recent.slots] == [slot]
    assert not stats.unrouted.recent.slots  # a refusal: no duration, no 5xx, nothing to keep
    assert stats.unrouted.closed_at == 1 and busy.closed_at == 1
    assert not idle.recent.slots and not idle.addresses[("10.0.0.8", 80)].recent.slots and idle.closed_at == 0
    monkeypatch.setattr(latency, "slot_now", lambda: slot + 2)
    stats.rotate()  # nothing counted since: the busy service's slot stays as it was
    assert len(busy.recent.slots) == 1 and busy.recent.counts == [0] * (len(latency.BOUNDS) + 1)
