"""DFP admin API: status codes, NOK envelopes, remove, replicas=0, config, indexed
destinations, precedence and domain matching -- each observed through real requests."""
import http.client

import pytest

API_BAD = [
    # (params without the base service, expected status)
    ({"servicePath": "/adm-new", "port": "{port}"}, 400),                       # no serviceName
    ({"serviceName": "adm-base", "servicePath": "/adm-new"}, 400),               # no port
    ({"serviceName": "adm-base", "port": "{port}"}, 409),                        # no path, no domain
]


def who(proxy, path, host=None):
    headers = {"Host": host} if host else {}
    st, h, _ = proxy.get(path, headers=headers)
    return st, h.get("X-Upstream")


@pytest.fixture
def base(proxy, dns, replicas):
    """adm-base: /adm-base -> replica .11"""
    dns.set_service("adm-base", replicas[0].ip)
    proxy.reconfigure(serviceName="adm-base", servicePath="/adm-base", port=replicas[0].port)
    assert who(proxy, "/adm-base/echo") == (200, replicas[0].addr)
    return replicas[0]


def test_reconfigure_ok_envelope(proxy, dns, replicas):
    dns.set_service("env-ok", replicas[0].ip)
    st, body = proxy.admin("reconfigure", serviceName="env-ok", servicePath="/env-ok", port=replicas[0].port)
    proxy.services.add("env-ok")
    assert st == 200
    assert body["Status"] == "OK" and body["Message"] == "" and body["ServiceName"] == "env-ok"


@pytest.mark.parametrize("params,status", API_BAD, ids=["no-serviceName", "no-port", "no-path-no-domain"])
def test_rejected_reconfigure_leaves_routing_unchanged(proxy, base, params, status):
    st0, before = proxy.admin("config", type="json")
    assert st0 == 200
    q = {k: v.format(port=base.port) for k, v in params.items()}
    st, body = proxy.admin("reconfigure", q)
    assert st == status, body
    assert isinstance(body, dict) and body["Status"] == "NOK" and body["Message"], body
    # nothing changed: old route still served by the same upstream, no new route
    assert who(proxy, "/adm-base/echo") == (200, base.addr)
    assert proxy.get("/adm-new/echo")[0] == 503
    assert proxy.admin("config", type="json") == (200, before)


def test_remove(proxy, base):
    st, body = proxy.admin("remove", serviceName="adm-base")
    assert st == 200 and body["Status"] == "OK", body
    st, _, page = proxy.get("/adm-base/echo")
    assert st == 503 and b"503 Service Unavailable" in page
    st, body = proxy.admin("config", type="json")
    assert "adm-base" not in body


def test_remove_absent_is_200(proxy):
    st, body = proxy.admin("remove", serviceName="never-registered")
    assert st == 200 and body["Status"] == "OK", body


def test_remove_with_acl_name(proxy, base):
    st, body = proxy.admin("remove", serviceName="adm-base", aclName="adm-base")
    assert st == 200, body
    assert proxy.get("/adm-base/echo")[0] == 503


def test_remove_without_service_name_is_400(proxy, base):
    st, body = proxy.admin("remove")
    assert st == 400 and body["Status"] == "NOK" and body["Message"], body
    assert who(proxy, "/adm-base/echo") == (200, base.addr)


def test_replicas_zero_removes(proxy, base):
    st, body = proxy.admin("reconfigure", serviceName="adm-base", servicePath="/adm-base",
                           port=base.port, replicas=0)
    assert st == 200, body
    assert proxy.get("/adm-base/echo")[0] == 503


def test_reconfigure_replaces_service(proxy, dns, base, alt):
    # same serviceName, new path and port: old path gone, new path served by the new port
    proxy.reconfigure(serviceName="adm-base", servicePath="/adm-moved", port=alt[0].port)
    assert proxy.get("/adm-base/echo")[0] == 503
    assert who(proxy, "/adm-moved/echo") == (200, f"127.0.0.11:{alt[0].port}")


def test_unknown_params_ignored(proxy, dns, replicas):
    dns.set_service("adm-unk", replicas[1].ip)
    proxy.reconfigure(serviceName="adm-unk", servicePath="/adm-unk", port=replicas[1].port,
                      distribute="true", fooBarBaz="whatever", notify="1")
    assert who(proxy, "/adm-unk/x") == (200, replicas[1].addr)


def test_config_text_and_json(proxy, base, dns, replicas):
    dns.set_service("adm-two", replicas[1].ip)
    proxy.reconfigure(serviceName="adm-two", servicePath="/adm-two,/adm-deux", port=replicas[1].port)
    st, text = proxy.admin("config")
    assert st == 200 and isinstance(text, str), text
    for word in ("adm-base", "adm-two", "/adm-deux"):
        assert word in text
    st, js = proxy.admin("config", type="json")
    assert st == 200 and isinstance(js, dict)
    assert {"adm-base", "adm-two"} <= set(js)
    assert "/adm-deux" in str(js["adm-two"]) and str(replicas[1].port) in str(js["adm-two"])
    proxy.remove("adm-two")
    st, js = proxy.admin("config", type="json")
    assert "adm-two" not in js and "adm-base" in js


def test_comma_separated_paths(proxy, dns, replicas):
    dns.set_service("adm-multi", replicas[2].ip)
    proxy.reconfigure(serviceName="adm-multi", servicePath="/m-one,/m-two", port=replicas[2].port)
    assert who(proxy, "/m-one/x") == (200, replicas[2].addr)
    assert who(proxy, "/m-two/x") == (200, replicas[2].addr)
    assert who(proxy, "/m-three/x")[0] == 503


def test_path_is_byte_prefix(proxy, dns, replicas):
    dns.set_service("adm-prefix", replicas[0].ip)
    proxy.reconfigure(serviceName="adm-prefix", servicePath="/pfx", port=replicas[0].port)
    assert who(proxy, "/pfxonstration")[0] == 200
    assert who(proxy, "/pf")[0] == 503


def test_indexed_destinations(proxy, dns, replicas, alt):
    p, q = replicas[0].port, alt[0].port   # both groups listen on 127.0.0.11
    dns.set_service("adm-idx", "127.0.0.11")
    proxy.reconfigure({"serviceName": "adm-idx", "servicePath.1": "/idx-one", "port.1": p,
                       "servicePath.2": "/idx-two", "port.2": q})
    assert who(proxy, "/idx-one/e") == (200, f"127.0.0.11:{p}")
    assert who(proxy, "/idx-two/e") == (200, f"127.0.0.11:{q}")


def test_indexed_destinations_bare_value_is_default(proxy, dns, replicas, alt):
    p, q = replicas[0].port, alt[0].port
    dns.set_service("adm-idx2", "127.0.0.11")
    # bare port applies to index 1 (which has none); index 2 has its own
    proxy.reconfigure({"serviceName": "adm-idx2", "port": p, "servicePath.1": "/idd-one",
                       "servicePath.2": "/idd-two", "port.2": q})
    assert who(proxy, "/idd-one/e") == (200, f"127.0.0.11:{p}")
    assert who(proxy, "/idd-two/e") == (200, f"127.0.0.11:{q}")


def test_indexed_drops_bare_destination(proxy, dns, replicas):
    p = replicas[0].port
    dns.set_service("adm-idx3", "127.0.0.11")
    proxy.reconfigure({"serviceName": "adm-idx3", "port": p, "servicePath": "/bare-path",
                       "servicePath.1": "/ix-one"})
    # bare servicePath is the default for index 1, so /ix-one is what index 1 routes
    assert who(proxy, "/ix-one/e") == (200, f"127.0.0.11:{p}")


# -- precedence -------------------------------------------------------------------------

def test_precedence_by_service_name_by_default(proxy, dns, replicas):
    dns.set_service("pa-b", replicas[1].ip)
    dns.set_service("pa-a", replicas[0].ip)
    proxy.reconfigure(serviceName="pa-b", servicePath="/same", port=replicas[1].port)
    proxy.reconfigure(serviceName="pa-a", servicePath="/same", port=replicas[0].port)
    assert who(proxy, "/same/x") == (200, replicas[0].addr)
    # and the other way round: registration order does not matter
    proxy.remove("pa-a")
    dns.set_service("pa-c", replicas[2].ip)
    proxy.reconfigure(serviceName="pa-c", servicePath="/same", port=replicas[2].port)
    assert who(proxy, "/same/x") == (200, replicas[1].addr)


def test_precedence_acl_name(proxy, dns, replicas):
    dns.set_service("acl-zeta", replicas[2].ip)
    dns.set_service("acl-alpha", replicas[0].ip)
    proxy.reconfigure(serviceName="acl-alpha", aclName="02-alpha", servicePath="/acl", port=replicas[0].port)
    proxy.reconfigure(serviceName="acl-zeta", aclName="01-zeta", servicePath="/acl", port=replicas[2].port)
    assert who(proxy, "/acl/x") == (200, replicas[2].addr)


def test_root_path_goes_last(proxy, dns, replicas):
    dns.set_service("aaa-root", replicas[0].ip)
    dns.set_service("zzz-thing", replicas[1].ip)
    proxy.reconfigure(serviceName="aaa-root", servicePath="/", port=replicas[0].port)
    proxy.reconfigure(serviceName="zzz-thing", servicePath="/thing", port=replicas[1].port)
    assert who(proxy, "/thing/x") == (200, replicas[1].addr)
    assert who(proxy, "/anything-else") == (200, replicas[0].addr)


def test_well_known_goes_first(proxy, dns, replicas):
    dns.set_service("aaa-well", replicas[0].ip)
    dns.set_service("zzz-acme", replicas[2].ip)
    # aaa-well's /.we prefix also matches /.well-known/..., and sorts first by name
    proxy.reconfigure(serviceName="aaa-well", servicePath="/.we", port=replicas[0].port)
    proxy.reconfigure(serviceName="zzz-acme", servicePath="/.well-known/acme-challenge", port=replicas[2].port)
    assert who(proxy, "/.well-known/acme-challenge/tok") == (200, replicas[2].addr)
    assert who(proxy, "/.weather") == (200, replicas[0].addr)


# -- domains ----------------------------------------------------------------------------

def test_domain_prefix_match_default(proxy, dns, replicas):
    dns.set_service("dom-app", replicas[1].ip)
    proxy.reconfigure(serviceName="dom-app", serviceDomain="app.example.com", port=replicas[1].port)
    ok = (200, replicas[1].addr)
    assert who(proxy, "/any/path", host="app.example.com") == ok
    assert who(proxy, "/", host="APP.Example.COM:8080") == ok         # case, port stripped
    assert who(proxy, "/", host="app.example.com.evil.net") == ok     # hdr_beg is a prefix
    assert who(proxy, "/", host="other.example.com")[0] == 503
    assert who(proxy, "/", host="www.app.example.com")[0] == 503


def test_domain_wildcard_is_suffix_match(proxy, dns, replicas):
    dns.set_service("dom-wild", replicas[2].ip)
    proxy.reconfigure(serviceName="dom-wild", serviceDomain="*example.org", port=replicas[2].port)
    ok = (200, replicas[2].addr)
    assert who(proxy, "/", host="a.b.example.org") == ok
    assert who(proxy, "/", host="EXAMPLE.ORG:80") == ok
    assert who(proxy, "/", host="example.org.evil.net")[0] == 503


def test_domain_and_path_together(proxy, dns, replicas):
    dns.set_service("dom-path", replicas[0].ip)
    proxy.reconfigure(serviceName="dom-path", serviceDomain="dp.test", servicePath="/api", port=replicas[0].port)
    assert who(proxy, "/api/x", host="dp.test") == (200, replicas[0].addr)
    assert who(proxy, "/web", host="dp.test")[0] == 503
    assert who(proxy, "/api/x", host="other.test")[0] == 503


def test_outbound_hostname_and_ip_literal(proxy, dns, replicas):
    # serviceName does not resolve; outboundHostname is what gets dialed
    dns.set_service("outbound-real", replicas[1].ip)
    proxy.reconfigure(serviceName="ob-unresolvable", outboundHostname="outbound-real",
                      servicePath="/ob", port=replicas[1].port)
    assert who(proxy, "/ob/x") == (200, replicas[1].addr)
    # an IP literal is dialed directly, no DNS query
    proxy.reconfigure(serviceName="ob-ip", outboundHostname=replicas[2].ip, servicePath="/obip",
                      port=replicas[2].port)
    assert who(proxy, "/obip/x") == (200, replicas[2].addr)
    assert not [q for q in dns.queries if q[1] == replicas[2].ip]


def test_latency_endpoint_merges_workers_behind_admin_credentials(make_pyroute, dns, replicas):
    """GET /latency: STATS_URI;data's JSON (every worker's slots added up) on the admin port,
    behind the admin credentials, with no stats page configured."""
    up = replicas[0]
    dns.set_service("adm-lat", up.ip)
    p = make_pyroute(ADMIN_USER="ops", ADMIN_PASS="pw", WORKERS="2")
    p.reconfigure(serviceName="adm-lat", servicePath="/adm-lat", port=up.port)
    c = http.client.HTTPConnection("127.0.0.1", p.admin_port, timeout=10)
    c.request("GET", "/v1/docker-flow-proxy/latency")
    r = c.getresponse()
    assert r.status == 401 and b'"Status":"NOK"' in r.read()
    c.close()

    st, idle = p.admin("latency")
    assert st == 200 and idle["slot_seconds"] == 10 and idle["slots"] == 90
    assert idle["services"].get("adm-lat", {}).get("p99_ms") is None
    n = 30
    for _ in range(n):  # a new connection each: the kernel spreads them over both workers
        assert p.get("/adm-lat/hello")[0] == 200
    st, doc = p.admin("latency")
    view = doc["services"]["adm-lat"]
    assert st == 200 and view["requests_minute"] == n and round(sum(view["request_rate"]) * 10) == n
    assert 0 < view["p50_ms"] <= view["p95_ms"] <= view["p99_ms"]
    task = view["tasks"][f"{up.ip}:{up.port}"]
    assert task["requests_minute"] == n and task["p99_ms"] > 0 and task["health"] == "up"
