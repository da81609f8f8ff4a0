"""Routes that explain themselves (issue 17): shadowed routes found on every reconfigure and
label apply (the reconfigure answer's Message, the log, GET /v1/docker-flow-proxy/shadowed),
and GET /v1/docker-flow-proxy/match (+ `pyroute routes --match URL`) saying which route a
request takes and why each earlier one lost. Every claim is checked against what the data
plane really does with the same request."""
from __future__ import annotations

import itertools

import pytest

from support.upstream import wait_until
from test_operator import pyroute


@pytest.fixture
def ups(replicas):
    return replicas[0], replicas[1]


def add(proxy, dns, upstream, **params):
    dns.set_service(params["serviceName"], upstream.ip)
    params.setdefault("port", upstream.port)
    return proxy.reconfigure(params)


def reached(proxy, path, host=None, headers=None):
    st, h, _ = proxy.get(path, headers={**({"Host": host} if host else {}), **(headers or {})})
    return st, h.get("X-Upstream")


def shadowed(proxy) -> list[dict]:
    st, body = proxy.admin("shadowed")
    assert st == 200 and body["Status"] == "OK"
    return body["Shadowed"]


def test_prefix_catching_a_longer_path_is_reported_everywhere(proxy, dns, ups):
    """DFP's most common support thread: /ztest catches /ztest1."""
    a, b = ups
    add(proxy, dns, a, serviceName="ztest", servicePath="/ztest")
    answer = add(proxy, dns, b, serviceName="ztest1", servicePath="/ztest1,/zother")
    assert answer["Status"] == "OK"
    assert "warning: ztest1 servicePath /ztest1 can never match: ztest" in answer["Message"], answer["Message"]
    # what the data plane does agrees: /ztest1 reaches ztest, ztest1's other path still works
    assert reached(proxy, "/ztest1/x") == (200, a.addr)
    assert reached(proxy, "/zother/x") == (200, b.addr)
    [finding] = shadowed(proxy)
    assert (finding["Service"], finding["Path"], finding["ShadowedBy"]["Service"], finding["ShadowedBy"]["Path"]) == \
        ("ztest1", "/ztest1", "ztest", "/ztest")
    assert '"event":"shadowed","service":"ztest1","path":"/ztest1","by":"ztest"' in proxy.log()
    # the catcher's own reconfigure names it too
    assert "ztest1 servicePath /ztest1 can never match" in add(proxy, dns, a, serviceName="ztest",
                                                               servicePath="/ztest")["Message"]
    # the aclName order is DFP's fix: ztest1 first, and nothing is shadowed any more
    assert add(proxy, dns, b, serviceName="ztest1", servicePath="/ztest1,/zother", aclName="00-ztest1")["Message"] == ""
    assert shadowed(proxy) == []
    assert reached(proxy, "/ztest1/x") == (200, b.addr)


def test_wildcard_domain_catching_a_specific_one(proxy, dns, ups):
    a, b = ups
    add(proxy, dns, a, serviceName="w-all", serviceDomain="*.wild.test")
    answer = add(proxy, dns, b, serviceName="w-api", serviceDomain="api.wild.test", serviceDomainAlgo="hdr(host)")
    assert "w-api servicePath / can never match: w-all" in answer["Message"]
    assert reached(proxy, "/", host="api.wild.test") == (200, a.addr)
    assert [f["Service"] for f in shadowed(proxy)] == ["w-api"]


@pytest.mark.parametrize("catcher,route,request_reaching_route", [
    # hdr_beg (DFP's default) takes Hosts that only start with the name: the wildcard misses some
    ({"serviceDomain": "*.nfp.test"}, {"serviceDomain": "api.nfp.test"}, ("/", "api.nfp.test.other", None)),
    # a catcher with a condition beyond path and Host does not always catch
    ({"servicePath": "/nfp", "serviceHeader": "X-Nfp:1"}, {"servicePath": "/nfp/a"}, ("/nfp/a", None, None)),
    ({"servicePath": "/nfp", "servicePathExclude": "/nfp/a"}, {"servicePath": "/nfp/a"}, ("/nfp/a", None, None)),
    # case: a route taking every case is not covered by a case-sensitive prefix
    ({"servicePath": "/nfp"}, {"servicePath": "/nfp/a", "pathType": "path_beg -i"}, ("/NFP/A", None, None)),
    # a path_reg route is never claimed covered
    ({"servicePath": "/nfp"}, {"servicePath": "^/x/nfp", "pathType": "path_reg"}, ("/x/nfp", None, None)),
    # srcPort on the catcher: other ports are not caught
    ({"servicePath": "/nfp", "srcPort": "1"}, {"servicePath": "/nfp/a"}, ("/nfp/a", None, None)),
])
def test_no_false_positives(proxy, dns, ups, catcher, route, request_reaching_route):
    a, b = ups
    add(proxy, dns, a, serviceName="nfp-a", **catcher)
    answer = add(proxy, dns, b, serviceName="nfp-b", **route)
    assert answer["Message"] == "" and shadowed(proxy) == []
    path, host, _ = request_reaching_route
    assert reached(proxy, path, host=host) == (200, b.addr)  # proof that nfp-b can match


def test_exact_path_and_destinations_of_one_service(proxy, dns, ups):
    a, b = ups
    add(proxy, dns, a, serviceName="ex-a", servicePath="/ex")
    add(proxy, dns, b, serviceName="ex-b", servicePath="/ex/exact", pathType="path")
    add(proxy, dns, b, serviceName="ex-c", **{"servicePath.1": "/yc", "port.1": b.port,
                                              "servicePath.2": "/yc/deeper", "port.2": b.port})
    found = {(f["Service"], f["Index"], f["Path"]): f["ShadowedBy"]["Service"] for f in shadowed(proxy)}
    assert found == {("ex-b", 0, "/ex/exact"): "ex-a", ("ex-c", 2, "/yc/deeper"): "ex-c"}
    assert reached(proxy, "/ex/exact") == (200, a.addr)


def test_match_says_who_wins_and_why_each_earlier_route_lost(proxy, dns, ups):
    a, b = ups
    add(proxy, dns, a, serviceName="m-hdr", servicePath="/m", serviceHeader="X-Canary:yes", aclName="01-m-hdr")
    add(proxy, dns, b, serviceName="m-dom", servicePath="/m", serviceDomain="m.test", aclName="02-m-dom")
    add(proxy, dns, a, serviceName="m-any", servicePath="/m", aclName="03-m-any")
    st, body = proxy.admin("match", host="m.test", path="/m/x")
    assert st == 200 and body["Match"]["Service"] == "m-dom", body
    lost = {c["Service"]: c["Lost"] for c in body["Candidates"]}
    assert lost["m-hdr"] == "serviceHeader x-canary:yes is not in the request"
    assert lost["m-any"].startswith("matches too, but m-dom is matched first")
    assert reached(proxy, "/m/x", host="m.test") == (200, b.addr)

    st, body = proxy.admin("match", {"host": "m.test", "path": "/m/x", "header.X-Canary": "yes"})
    assert body["Match"]["Service"] == "m-hdr"
    assert reached(proxy, "/m/x", host="m.test", headers={"X-Canary": "yes"}) == (200, a.addr)

    st, body = proxy.admin("match", host="other.test", path="/m/x")
    assert body["Match"]["Service"] == "m-any"
    assert {c["Service"]: c["Lost"] for c in body["Candidates"]}["m-dom"] == \
        "Host 'other.test' does not match serviceDomain m.test (hdr_beg)"

    st, body = proxy.admin("match", host="other.test", path="/nothing")
    assert body["Match"] is None and "503" in body["Why"]
    assert reached(proxy, "/nothing", host="other.test")[0] == 503
    assert proxy.admin("match", path="nope")[0] == 400


def test_routes_match_prints_it(proxy, dns, ups):
    a, b = ups
    add(proxy, dns, a, serviceName="cli-z", servicePath="/cliz")
    add(proxy, dns, b, serviceName="cli-z1", servicePath="/cliz1")
    result = pyroute("routes", "--admin", f"http://127.0.0.1:{proxy.admin_port}", "--match",
                     "http://any.test/cliz1/x")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "GET host any.test path /cliz1/x: cli-z (host *, path /cliz)"
    assert any(line.startswith("  cli-z1 (host *, path /cliz1): matches too, but cli-z is matched first")
               for line in lines), result.stdout


@pytest.fixture
def engine():
    from support.engine import FakeEngine
    fake = FakeEngine()
    yield fake
    fake.close()


def test_shadowing_found_when_labels_apply(engine, make_pyroute, dns, ups):
    """Label apply (the built-in Swarm listener) is checked like a reconfigure: logged and listed."""
    a, b = ups
    dns.set_service("lbl-z", a.ip)
    dns.set_service("lbl-z1", b.ip)
    engine.create("lbl-z", {"com.df.notify": "true", "com.df.servicePath": "/lblz", "com.df.port": str(a.port)})
    engine.create("lbl-z1", {"com.df.notify": "true", "com.df.servicePath": "/lblz1", "com.df.port": str(b.port)})
    p = make_pyroute(DOCKER_HOST=engine.docker_host)  # stopped before the engine closes (fixture order)
    wait_until(lambda: len(p.admin("config", type="json")[1]) == 2, what="labels applied")
    assert [(f["Service"], f["ShadowedBy"]["Service"]) for f in shadowed(p)] == [("lbl-z1", "lbl-z")]
    assert '"event":"shadowed","service":"lbl-z1"' in p.log()


# -- the shadow analysis against the real matcher (pure, hypothesis) --------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

PATHS = ["/a", "/a/b", "/ab", "/a/b/c", "/x", "/x/y", "/", "/A/B", "/a/B"]
DOMAINS = ["", "a.com", "*.a.com", "x.a.com", "b.a.com", "a.com.x"]


@st.composite
def service_params(draw, name):
    params = {"serviceName": name, "port": "80", "servicePath": draw(st.sampled_from(PATHS))}
    if domain := draw(st.sampled_from(DOMAINS)):
        params["serviceDomain"] = domain
        params["serviceDomainAlgo"] = draw(st.sampled_from(["hdr_beg", "hdr", "hdr_dom", "hdr_end"]))
    params["pathType"] = draw(st.sampled_from(["path_beg", "path_beg", "path", "path_beg -i", "path_sub",
                                               "path_end", "path_dir"]))
    if params["pathType"] in ("path_sub", "path_end"):
        params["servicePath"] = params["servicePath"].rsplit("/", 1)[-1] or "a"
    if draw(st.booleans()):
        params["aclName"] = draw(st.sampled_from(["0", "5", "9"])) + name
    if draw(st.integers(0, 9)) == 0:
        params["serviceHeader"] = "X-Seen:1"
    return params


# (service number, remove it?): mostly adds and replacements, so tables hold several services
changes = st.lists(st.tuples(st.integers(0, 10), st.integers(0, 5).map(lambda n: n == 0)), min_size=6, max_size=30)


@settings(max_examples=150, deadline=None)
@given(st.data(), changes, st.booleans())
def test_shadow_findings_are_true_and_incremental_equals_fresh(data, steps, longest):
    """Every finding holds for the real RouteTable.match (each request the shadowed route's
    own rules take goes elsewhere), and following a table change by change gives what a
    fresh analysis of the last table gives."""
    from pyroute.controlplane.routecheck import RouteCheck
    from pyroute.dataplane.explain import Shadows, _Connection, _why_not
    from pyroute.dataplane.headers import normalize_host
    from pyroute.dataplane.routing import RouteTable, _no_backend
    from pyroute.services import parse_service

    services = {}
    check = RouteCheck(longest_match=longest)
    for revision, (number, remove) in enumerate(steps):
        name = f"s{number}"
        if remove:
            services.pop(name, None)
        else:
            services[name] = parse_service(data.draw(service_params(name)))
        check.published((revision, tuple(services.values())))
    table = check.plain
    fresh = Shadows()
    fresh.update(RouteTable(tuple(services.values()), _no_backend, 0, longest))
    assert check.findings == fresh.findings

    routes = {(r.service.name, r.destination.index): r for r in table.routes}
    for finding in check.findings:
        route = routes[(finding["Service"], finding["Index"])]
        d = route.destination
        names = [h.lstrip(".") for h in d.domains] or ["any.test"]
        hosts = [h for n in names for h in (n, "q." + n, n + ".q", "q" + n, n + "q")]
        for host in hosts:
            for tail, headers in itertools.product(("", "/z", "/a", ".x"), ([], [(b"x-seen", b"1")])):
                for path in (finding["Path"] + tail, "/q/" + finding["Path"].lstrip("/") + tail):
                    for sample in {path.encode(), path.upper().encode()}:
                        raw_host = host.encode()
                        if _why_not(route, normalize_host(raw_host), sample, headers, 0) is not None:
                            continue  # not a request this route's own rules take
                        won = table.match(raw_host, sample, [(b"host", raw_host), *headers], _Connection(0))
                        assert won is not route, (finding, host, sample, headers)
