"""Observability: /metrics parsed by prometheus_client's parser, DFP's metrics CSV, the JSON
access log (200, no-route 503, upstream-timeout 504, client abort), the structured
control-plane log, and the stats page on the public port behind STATS_USER/STATS_PASS."""
import base64
import csv
import io
import json
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.rawupstream import reset
from support.upstream import wait_until

PYROUTE_ENV = {"DEBUG": "true", "TIMEOUT_SERVER": "1", "STATS_USER": "admin", "STATS_PASS": "s3cret"}
DEAD_IP = "127.0.0.99"  # nothing listens there
AUTH = {"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()}


def scrape(proxy, path="/metrics"):
    c = proxy.conn()
    c.port = proxy.admin_port
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.getheader("Content-Type"), r.read().decode()
    finally:
        c.close()


def samples(proxy) -> dict:
    """{(name, frozenset(labels.items())): value} from a real Prometheus text parser."""
    st, ctype, text = scrape(proxy)
    assert st == 200 and ctype.startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(snap, name, **labels):
    return snap.get((name, frozenset({k: str(v) for k, v in labels.items()}.items())), 0)


def log_lines(proxy) -> list[dict]:
    """Access log lines (stdout) and structured control-plane lines ("<prefix>: {...}", stderr)."""
    out = []
    for line in Path(proxy.stderr_path).read_text(errors="replace").splitlines():
        start = 0 if line.startswith("{") else line.find(": {") + 2
        if start == 1:
            continue
        try:
            out.append(json.loads(line[start:]))
        except ValueError:
            pass
    return out


def access_line(proxy, path, **expect):
    """The access log line of `path`, once it is written (lines are flushed per loop iteration)."""
    found = []

    def written():
        found[:] = [e for e in log_lines(proxy) if e.get("path") == path and "termination" in e]
        return found

    wait_until(written, what=f"access log line for {path}")
    entry = found[-1]
    for key, want in expect.items():
        assert entry[key] == want, (key, entry)
    return entry


@pytest.fixture
def svc(proxy, dns, replicas):
    up = replicas[0]
    dns.set_service("obs-a", up.ip)
    dns.set_service("obs-dead", DEAD_IP)
    proxy.reconfigure(serviceName="obs-a", servicePath="/obs", port=up.port)
    proxy.reconfigure(serviceName="obs-dead", servicePath="/gone", port=up.port)
    return up


def test_metrics_move_with_traffic(proxy, svc):
    before = samples(proxy)
    with proxy.raw() as c:  # 5 requests on one keep-alive connection: 1 connect, then reuses
        for _ in range(5):
            c.request("GET", "/obs/hello", [("Host", "t")])
            assert c.read_response()[0].status_code == 200
    assert proxy.get("/obs/status/404")[0] == 404
    assert proxy.get("/nowhere")[0] == 503
    assert proxy.get("/gone/x")[0] == 503
    after = samples(proxy)
    addr = f"{svc.ip}:{svc.port}"

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("pyroute_requests_total", service="obs-a", method="GET", code=200) == 5
    assert moved("pyroute_requests_total", service="obs-a", method="GET", code=404) == 1
    assert moved("pyroute_requests_total", service="", method="GET", code=503) == 1
    assert moved("pyroute_requests_total", service="obs-dead", method="GET", code=503) == 1
    assert moved("pyroute_request_duration_seconds_count", service="obs-a") == 6
    assert moved("pyroute_upstream_duration_seconds_count", service="obs-a") == 6
    assert moved("pyroute_upstream_first_byte_seconds_count", service="obs-a") == 6
    assert moved("pyroute_upstream_connect_seconds_count", service="obs-a", address=addr) == \
        moved("pyroute_upstream_connects_total", service="obs-a", address=addr) >= 1
    assert moved("pyroute_upstream_connect_seconds_sum", service="obs-a", address=addr) > 0  # (perf_counter: us)
    assert value(after, "pyroute_request_duration_seconds_bucket", service="obs-a", le="+Inf") == \
        value(after, "pyroute_request_duration_seconds_count", service="obs-a")
    assert moved("pyroute_service_sent_bytes_total", service="obs-a") > 6 * len("hello")
    assert moved("pyroute_client_connections_total") == 4
    assert moved("pyroute_client_received_bytes_total") > 0 and moved("pyroute_client_sent_bytes_total") > 0
    assert moved("pyroute_upstream_connects_total", service="obs-a", address=addr) >= 1
    assert moved("pyroute_upstream_reuses_total", service="obs-a", address=addr) >= 4
    assert value(after, "pyroute_upstream_up", service="obs-a", address=addr) == 1
    dead = f"{DEAD_IP}:{svc.port}"
    assert moved("pyroute_upstream_failures_total", service="obs-dead", address=dead) == 1
    assert value(after, "pyroute_upstream_up", service="obs-dead", address=dead) == 0
    assert value(after, "pyroute_dns_lookups_total") >= 2
    st, body = proxy.admin("ping")
    assert value(after, "pyroute_route_table_revision", process="pyroute") == body["Revision"]
    assert value(after, "pyroute_route_table_reloads_total", process="pyroute") >= 2
    assert value(after, "pyroute_process_resident_memory_bytes", process="pyroute") > 10 * 2**20
    assert value(after, "pyroute_process_open_fds", process="pyroute") > 3


def test_haproxy_exporter_names_move_with_the_same_traffic(proxy, svc):
    """Issue 17: DFP's dashboards read haproxy_exporter's families; pyroute serves them from
    the counters the pyroute_* families come from (docs/metrics.md maps each)."""
    before = samples(proxy)
    for _ in range(3):
        assert proxy.get("/obs/hello")[0] == 200
    assert proxy.get("/obs/status/404")[0] == 404
    assert proxy.get("/gone/x")[0] == 503
    after = samples(proxy)
    backend, dead = {"backend": "obs-a-be%d_0" % svc.port}, {"backend": "obs-dead-be%d_0" % svc.port}

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("haproxy_backend_http_responses_total", code="2xx", **backend) == 3
    assert moved("haproxy_backend_http_responses_total", code="4xx", **backend) == 1
    assert moved("haproxy_backend_sessions_total", **backend) == 4
    assert moved("haproxy_frontend_http_requests_total", frontend="services") == 5
    assert moved("haproxy_frontend_http_responses_total", code="5xx", frontend="services") == 1
    assert value(after, "haproxy_server_up", server=f"{svc.ip}:{svc.port}", **backend) == 1
    assert value(after, "haproxy_server_up", server=f"{DEAD_IP}:{svc.port}", **dead) == 0
    assert value(after, "haproxy_backend_up", **dead) == 0 and value(after, "haproxy_backend_up", **backend) == 1
    assert moved("haproxy_backend_connection_errors_total", **dead) >= 1
    assert value(after, "haproxy_up") == 1 and value(after, "pyroute_rejected_services") == 0


def test_retries_and_timeouts_are_counted(proxy, svc):
    addr = f"{svc.ip}:{svc.port}"
    before = samples(proxy)
    with proxy.raw() as c:
        c.request("GET", "/obs/hello", [("Host", "t")])
        assert c.read_response()[0].status_code == 200
        c.request("GET", "/obs/drop-reused", [("Host", "t")])
        assert c.read_response()[0].status_code == 200
    assert proxy.get("/obs/slow/3")[0] == 504
    after = samples(proxy)
    assert value(after, "pyroute_upstream_retries_total", service="obs-a", address=addr) - \
        value(before, "pyroute_upstream_retries_total", service="obs-a", address=addr) == 1
    assert value(after, "pyroute_upstream_timeouts_total", service="obs-a", address=addr) - \
        value(before, "pyroute_upstream_timeouts_total", service="obs-a", address=addr) == 1


def test_dfp_metrics_csv(proxy, svc):
    for _ in range(3):
        assert proxy.get("/obs/hello")[0] == 200
    st, ctype, text = scrape(proxy, "/v1/docker-flow-proxy/metrics")
    assert st == 200 and ctype.startswith("text/plain")
    assert text.startswith("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,")
    rows = list(csv.DictReader(io.StringIO(text[2:])))
    backend = next(r for r in rows if r["pxname"] == "obs-a" and r["svname"] == "BACKEND")
    assert int(backend["hrsp_2xx"]) >= 3 and backend["status"] == "UP"
    server = next(r for r in rows if r["pxname"] == "obs-a" and r["svname"] == f"{svc.ip}:{svc.port}")
    assert server["status"] == "UP" and int(server["lbtot"]) >= 3
    assert next(r for r in rows if r["svname"] == "FRONTEND")["status"] == "OPEN"


def test_access_log_200_no_route_and_timeout(proxy, svc):
    assert proxy.get("/obs/hello?x=1")[0] == 200
    ok = access_line(proxy, "/obs/hello?x=1", status=200, method="GET", service="obs-a",
                     upstream=f"{svc.ip}:{svc.port}", termination="--", client="127.0.0.1")
    assert ok["bytes"] > 0 and ok["bytes_in"] > 0 and ok["time"].endswith("+00:00")
    for key in ("request_ms", "connect_ms", "response_ms", "total_ms"):
        assert ok[key] >= 0, key
        assert isinstance(ok[key], float) and ok[key] == round(ok[key], 3), key  # ms, microsecond resolution
    assert ok["total_ms"] >= ok["response_ms"] > 0  # a fast exchange is not rounded down to 0 ms

    assert proxy.get("/no/such/route")[0] == 503
    nr = access_line(proxy, "/no/such/route", status=503, service="", upstream="", termination="NR")
    assert nr["connect_ms"] is None and nr["response_ms"] is None

    assert proxy.get("/obs/slow/3")[0] == 504
    access_line(proxy, "/obs/slow/3", status=504, service="obs-a", termination="sH", response_ms=None)

    assert proxy.get("/gone/y")[0] == 503
    access_line(proxy, "/gone/y", status=503, service="obs-dead", termination="SC")


def test_access_log_client_abort(proxy, svc):
    # An abort is a reset: a FIN alone is a half-close, and the request is still answered (F14).
    with socket.create_connection(("127.0.0.1", proxy.http_port)) as s:
        s.sendall(b"GET /obs/slow/0.5?abort HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: svc.requests("/obs/slow/0.5?abort"), what="the request reached the upstream")
        reset(s)
    entry = access_line(proxy, "/obs/slow/0.5?abort", status=0, termination="CD", service="obs-a")
    assert entry["response_ms"] is None and entry["bytes"] == 0


def test_control_plane_log_is_structured(proxy, svc):
    events = [e for e in log_lines(proxy) if e.get("event") in ("reconfigure", "remove")]
    mine = [e for e in events if e.get("service") == "obs-a" and e["event"] == "reconfigure"]
    assert mine and isinstance(mine[-1]["revision"], int)
    st, body = proxy.admin("ping")
    proxy.remove("obs-dead")
    wait_until(lambda: any(e.get("event") == "remove" and e.get("service") == "obs-dead"
                           and e["revision"] == body["Revision"] + 1 for e in log_lines(proxy)),
               what="a structured remove line with the new revision")
    health = [e for e in log_lines(proxy) if e.get("event") == "health"]
    assert any(e["service"] == "obs-a" and e["to"] == "up" for e in health)


# -- the stats page ------------------------------------------------------------------------
def test_stats_page_needs_the_password(proxy, svc):
    st, headers, _ = proxy.get("/admin?stats")
    assert st == 401 and headers["WWW-Authenticate"].startswith("Basic")
    bad = {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()}
    assert proxy.get("/admin?stats", headers=bad)[0] == 401
    assert proxy.get("/obs/hello")[0] == 200
    st, headers, body = proxy.get("/admin?stats", headers=AUTH)
    assert st == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert "obs-a" in page and f"{svc.ip}:{svc.port}" in page and 'http-equiv="refresh"' in page
    assert proxy.get("/admin/other", headers=AUTH)[0] == 404  # only STATS_URI is answered under its path


def test_stats_page_off_by_default_and_none_none(make_pyroute, dns, replicas):
    off = make_pyroute()
    assert off.get("/admin?stats")[0] == 503  # just a path without a route
    assert off.get("/metrics")[0] == 503
    open_page = make_pyroute(STATS_USER_ENV="MY_USER", MY_USER="none", STATS_PASS="none", STATS_URI="/stats")
    st, _, body = open_page.get("/stats")
    assert st == 200 and b"pyroute stats" in body


def test_workers_are_aggregated(make_pyroute, dns, replicas):
    up = replicas[1]
    dns.set_service("obs-w", up.ip)
    p = make_pyroute(WORKERS="2", STATS_USER="none", STATS_PASS="none")
    p.reconfigure(serviceName="obs-w", servicePath="/w", port=up.port)
    n = 40
    for _ in range(n):  # a new connection each: the kernel spreads them over both workers
        assert p.get("/w/hello")[0] == 200
    snap = samples(p)
    assert value(snap, "pyroute_requests_total", service="obs-w", method="GET", code=200) == n
    processes = {labels for (name, labels) in snap if name == "pyroute_process_resident_memory_bytes"}
    assert len(processes) == 3  # the control process and two workers
    workers = [dict(l)["process"] for l in processes if dict(l)["process"] != "control"]
    assert all(value(snap, "pyroute_route_table_revision", process=w) >= 1 for w in workers)
    served = {w: value(snap, "pyroute_route_table_reloads_total", process=w) for w in workers}
    assert all(served.values()), served
    st, _, body = p.get("/admin?stats")
    assert st == 200 and b"obs-w" in body
    st, _, body = p.get("/admin?stats;data")  # recent traffic: every worker's slots, added up
    recent = json.loads(body)["services"]["obs-w"]
    assert st == 200 and recent["requests_minute"] == n and round(sum(recent["request_rate"]) * 10) == n
    assert recent["tasks"][f"{up.ip}:{up.port}"]["requests_minute"] == n and recent["p99_ms"] > 0


def test_refused_request_is_logged_and_counted(proxy, svc):
    before = samples(proxy)
    with socket.create_connection(("127.0.0.1", proxy.http_port)) as s:
        s.sendall(b"GET /obs/hello HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 400")
    after = samples(proxy)
    assert value(after, "pyroute_requests_total", service="", method="other", code=400) - \
        value(before, "pyroute_requests_total", service="", method="other", code=400) == 1
    wait_until(lambda: any(e.get("status") == 400 and e.get("termination") == "PR" for e in log_lines(proxy)),
               what="an access log line for the refused request")


def test_errors_only_and_sampling(make_pyroute, dns, replicas):
    up = replicas[0]
    dns.set_service("obs-s", up.ip)
    errors_only = make_pyroute(DEBUG="true", DEBUG_ERRORS_ONLY="true")
    errors_only.reconfigure(serviceName="obs-s", servicePath="/s", port=up.port)
    assert errors_only.get("/s/hello?ok")[0] == 200
    assert errors_only.get("/s/status/500?err")[0] == 500
    access_line(errors_only, "/s/status/500?err", status=500)
    assert not [e for e in log_lines(errors_only) if e.get("path") == "/s/hello?ok"]

    sampled = make_pyroute(DEBUG="true", ACCESS_LOG_SAMPLE="0.5")
    sampled.reconfigure(serviceName="obs-s", servicePath="/s", port=up.port)
    n = 200
    with sampled.raw() as c:
        for i in range(n):
            c.request("GET", f"/s/hello?sample={i}", [("Host", "t")])
            assert c.read_response()[0].status_code == 200
    samples(sampled)  # a scrape: by its answer every line of earlier requests was flushed
    logged = [e for e in log_lines(sampled) if "sample=" in e.get("path", "")]
    assert 50 < len(logged) < 150, len(logged)  # binomial(200, 0.5): outside this is ~1e-12


def test_disabled_log_writes_nothing(make_pyroute, dns, replicas):
    up = replicas[0]
    dns.set_service("obs-q", up.ip)
    quiet = make_pyroute()
    quiet.reconfigure(serviceName="obs-q", servicePath="/q", port=up.port)
    assert quiet.get("/q/hello")[0] == 200
    assert value(samples(quiet), "pyroute_requests_total", service="obs-q", method="GET", code=200) == 1
    assert not [e for e in log_lines(quiet) if "termination" in e]


def test_stats_uri_may_not_cover_the_admin_api():
    from pyroute.config import SettingsError, load_settings
    for uri in ("/", "/v1", "/metrics?x", "/v1/docker-flow-proxy/config"):
        with pytest.raises(SettingsError, match="STATS_URI"):
            load_settings([], {"STATS_URI": uri})
    assert load_settings([], {"STATS_URI_ENV": "X", "X": "/_stats"}).stats_uri == "/_stats"


def test_task_gone_from_dns_has_no_health(proxy, dns, replicas):
    first, second = replicas[0], replicas[1]
    dns.set_service("obs-m", first.ip)
    proxy.reconfigure(serviceName="obs-m", servicePath="/m", port=first.port)
    assert proxy.get("/m/hello")[0] == 200
    old, new = f"{first.ip}:{first.port}", f"{second.ip}:{second.port}"
    assert value(samples(proxy), "pyroute_upstream_up", service="obs-m", address=old) == 1
    dns.set_service("obs-m", second.ip)  # the task moved (DNS_TTL_CAP is 0.5 s in these tests)

    def moved():
        return proxy.get("/m/hello")[1]["X-Upstream"] == new
    wait_until(moved, what="requests reach the new task")
    snap = samples(proxy)
    assert value(snap, "pyroute_upstream_up", service="obs-m", address=new) == 1
    assert ("pyroute_upstream_up", frozenset({"service": "obs-m", "address": old}.items())) not in snap
    assert value(snap, "pyroute_upstream_connects_total", service="obs-m", address=old) == 1  # counters stay
    page = proxy.get("/admin?stats", headers=AUTH)[2].decode()
    assert f'{old}</td><td class="gone">gone' in page.replace("&nbsp;", "")
