"""DFP matching parity: pathType, servicePathExclude, serviceDomain algorithms, serviceHeader,
userAgent, isDefaultBackend, srcPort (BIND_PORTS and runtime listeners), indexed defaults,
and the two precedence orders -- each sent as DFP users send it, observed through real requests."""
import http.client
import socket

import pytest

from support.upstream import free_port, wait_until


def who(proxy, path, headers=None, port=None):
    c = proxy.conn() if port is None else http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        r.read()
        return r.status, r.headers.get("X-Upstream")
    finally:
        c.close()


@pytest.fixture
def two(dns, replicas):
    """Two single-replica services' upstreams, .11 and .12 (same port)."""
    return replicas[0], replicas[1]


def register(proxy, dns, upstream, **params):
    dns.set_service(params["serviceName"], upstream.ip)
    params.setdefault("port", upstream.port)
    proxy.reconfigure(params)


@pytest.mark.parametrize("path_type,pattern,hits,misses", [
    ("path", "/m-exact", ["/m-exact"], ["/m-exact/x", "/m-exac"]),
    ("path_beg", "/m-beg", ["/m-beg", "/m-beginning"], ["/m-be"]),
    ("path_end", ".m-end", ["/a/b.m-end"], ["/a/b.m-end/x"]),
    ("path_reg", "^/m-reg/[0-9]+$", ["/m-reg/42"], ["/m-reg/4x", "/x/m-reg/42"]),
    ("path_dir", "/m-dir", ["/m-dir", "/x/m-dir/y", "/m-dir/"], ["/m-dirx", "/x/m-dirx/y"]),
    # issue 17: the rest of HAProxy's path fetches DFP users write, as written in DFP's docs
    ("path_sub", "m-sub", ["/a/m-sub/b", "/xm-subx"], ["/m-su/b", "/M-SUB"]),
    ("path_dom", "m-dom", ["/a/m-dom/b", "/a/m-dom", "/x.m-dom.y"], ["/a/m-domx", "/am-dom/"]),
    ("path_len", "13:14", ["/m-len-abcdef", "/m-len-abcdefg"], ["/m-len-abcde", "/m-len-abcdefgh"]),
    ("path_reg -i", "^/m-rgi/[a-z]+$", ["/m-rgi/abc", "/M-RGI/ABC"], ["/m-rgi/42"]),
    ("path_beg -i", "/M-Begi", ["/m-begi/x", "/M-BEGI"], ["/m-beg"]),
    ("path -i", "/m-Exi", ["/m-exi", "/M-EXI"], ["/m-exi/x"]),
    ("path -m sub", "m-msub", ["/a/m-msub/b"], ["/m-ms/b"]),
    ("url_beg", "/m-url", ["/m-url/x"], ["/a/m-url"]),
])
def test_path_types(proxy, dns, two, path_type, pattern, hits, misses):
    name = "pt-" + "".join(c if c.isalnum() else "-" for c in path_type)
    register(proxy, dns, two[0], serviceName=name, servicePath=pattern, pathType=path_type)
    for path in hits:
        assert who(proxy, path) == (200, two[0].addr), path
    for path in misses:
        assert who(proxy, path)[0] == 503, path


def test_bad_path_type_and_regex_are_400(proxy, two):
    for params in ({"pathType": "path_nope"}, {"pathType": "path_reg", "servicePath": "/(unclosed"}):
        q = {"serviceName": "pt-bad", "servicePath": "/pt-bad", "port": two[0].port, **params}
        st, body = proxy.admin("reconfigure", q)
        assert st == 400 and body["Status"] == "NOK", body
    assert who(proxy, "/pt-bad")[0] == 503


@pytest.mark.parametrize("path_type,service_path,named,instead", [
    ("url_sub", "/pt-url", "url_sub", "use path_sub"),
    ("url_reg", "^/pt-url", "url_reg", "use path_reg"),
    ("url", "/pt-url", "url", "use path"),
    ("url_beg", "/pt-url?a=1", "url_beg", "drop the query"),
    ("hdr_beg(host)", "/pt-url", "hdr_beg(host)", "serviceDomainAlgo"),
    ("req_ssl_sni -i -m beg", "test.", "req_ssl_sni -i -m beg", "reqMode=sni"),
    ("path_beg -x", "/pt-url", "path_beg -x", "-i"),
    ("path_len", "long", "long", "N:M"),
])
def test_path_types_pyroute_cannot_match_are_400_naming_them_and_what_to_use(proxy, two, path_type, service_path,
                                                                            named, instead):
    st, body = proxy.admin("reconfigure", {"serviceName": "pt-refused", "servicePath": service_path,
                                           "pathType": path_type, "port": two[0].port})
    assert st == 400 and body["Status"] == "NOK", body
    assert named in body["Message"] and instead in body["Message"], body["Message"]
    assert who(proxy, "/pt-url")[0] == 503


def test_service_path_exclude(proxy, dns, two):
    register(proxy, dns, two[0], serviceName="ex-svc", servicePath="/m-ex", servicePathExclude="/m-ex/private,/m-ex/admin")
    assert who(proxy, "/m-ex/public") == (200, two[0].addr)
    assert who(proxy, "/m-ex/private/x")[0] == 503
    assert who(proxy, "/m-ex/admin")[0] == 503


def test_excluded_path_falls_through_to_next_service(proxy, dns, two):
    register(proxy, dns, two[0], serviceName="ex-a", servicePath="/m-ex2", servicePathExclude="/m-ex2/b")
    register(proxy, dns, two[1], serviceName="ex-b", servicePath="/m-ex2/b")
    assert who(proxy, "/m-ex2/a") == (200, two[0].addr)
    assert who(proxy, "/m-ex2/b/c") == (200, two[1].addr)


@pytest.mark.parametrize("algo,domain,hits,misses", [
    ("hdr", "da.example", ["da.example", "DA.Example:80"], ["da.example.evil", "x.da.example"]),
    ("hdr(host)", "db.example", ["db.example"], ["db.example.evil"]),
    ("hdr_beg", "dc.example", ["dc.example", "dc.example.evil"], ["x.dc.example"]),
    ("hdr_dom", "dd.example", ["dd.example", "x.dd.example", "dd.example.x"], ["xdd.example", "dd.examplex"]),  # HAProxy -m dom: a dot-delimited run
    ("hdr_end", "de.example", ["x.de.example", "xde.example"], ["de.example.evil"]),
])
def test_domain_algorithms(proxy, dns, two, algo, domain, hits, misses):
    name = "dom-" + domain.split(".")[0]
    register(proxy, dns, two[0], serviceName=name, serviceDomain=domain, serviceDomainAlgo=algo)
    for host in hits:
        assert who(proxy, "/x", {"Host": host}) == (200, two[0].addr), host
    for host in misses:
        assert who(proxy, "/x", {"Host": host})[0] == 503, host


def test_service_domain_match_all_is_hdr_dom(proxy, dns, two):
    """DFP's deprecated serviceDomainMatchAll=true: the domain or any subdomain (hdr_dom)."""
    register(proxy, dns, two[0], serviceName="dom-all", serviceDomain="all.example", serviceDomainMatchAll="true")
    for host in ("all.example", "x.all.example"):
        assert who(proxy, "/x", {"Host": host}) == (200, two[0].addr), host
    assert who(proxy, "/x", {"Host": "xall.example"})[0] == 503


def test_parameter_names_are_case_insensitive(proxy, dns, two):
    """DFP reads its parameters case-insensitively: SERVICENAME, ServicePath, PORT work."""
    dns.set_service("ci-svc", two[0].ip)
    status, body = proxy.admin("reconfigure", {"SERVICENAME": "ci-svc", "ServicePath": "/ci-a,/ci-b",
                                               "PORT": two[0].port, "PathType": "path_beg"})
    try:
        assert status == 200 and body["ServiceName"] == "ci-svc", body
        assert who(proxy, "/ci-a/x") == who(proxy, "/ci-b/x") == (200, two[0].addr)
    finally:
        proxy.remove("ci-svc")


def test_separator_setting_splits_lists(make_pyroute, dns, replicas):
    """SEPARATOR (DFP's, default ","): the character lists are split on."""
    p = make_pyroute(SEPARATOR=";")
    dns.set_service("sep-svc", replicas[0].ip)
    p.reconfigure(serviceName="sep-svc", servicePath="/sep-a;/sep-b", port=replicas[0].port)
    assert who(p, "/sep-a/x") == who(p, "/sep-b/x") == (200, replicas[0].addr)


def test_wildcard_domain_is_suffix_match(proxy, dns, two):
    register(proxy, dns, two[0], serviceName="dom-wild", serviceDomain="*.wild.example")
    assert who(proxy, "/", {"Host": "a.b.wild.example"}) == (200, two[0].addr)
    assert who(proxy, "/", {"Host": "wild.example.evil"})[0] == 503


def test_service_domain_algo_env_default(make_pyroute, dns, replicas):
    p = make_pyroute(SERVICE_DOMAIN_ALGO="hdr(host)")
    dns.set_service("dom-env", replicas[0].ip)
    p.reconfigure(serviceName="dom-env", serviceDomain="env.example", port=replicas[0].port)
    assert who(p, "/", {"Host": "env.example"}) == (200, replicas[0].addr)
    assert who(p, "/", {"Host": "env.example.evil"})[0] == 503  # hdr_beg would have matched


def test_service_header(proxy, dns, two):
    # aclName order puts the header-matching service first; without the header it does not match
    register(proxy, dns, two[1], serviceName="hdr-v2", aclName="00-hdr-v2", servicePath="/m-hdr",
             serviceHeader="X-Version:2,X-Env:prod")
    register(proxy, dns, two[0], serviceName="hdr-v1", servicePath="/m-hdr")
    assert who(proxy, "/m-hdr") == (200, two[0].addr)
    assert who(proxy, "/m-hdr", {"X-Version": "2"}) == (200, two[0].addr)  # all must match
    assert who(proxy, "/m-hdr", {"X-Version": "2", "X-Env": "prod"}) == (200, two[1].addr)


def test_user_agent_indexed_with_catch_all(proxy, dns, replicas, alt):
    # DFP's documented pattern: the last index has no userAgent and catches the rest
    dns.set_service("ua-svc", "127.0.0.11")
    proxy.reconfigure({"serviceName": "ua-svc", "servicePath": "/m-ua", "userAgent.1": "iPhone,Android",
                       "port.1": alt[0].port, "port.2": replicas[0].port})
    mobile = f"127.0.0.11:{alt[0].port}"
    desktop = f"127.0.0.11:{replicas[0].port}"
    assert who(proxy, "/m-ua", {"User-Agent": "Mozilla/5.0 (iphone; CPU)"}) == (200, mobile)
    assert who(proxy, "/m-ua", {"User-Agent": "Dalvik (Linux; Android 14)"}) == (200, mobile)
    assert who(proxy, "/m-ua", {"User-Agent": "Mozilla/5.0 (X11; Linux)"}) == (200, desktop)


def test_bare_values_default_every_index(proxy, dns, replicas, alt):
    dns.set_service("idx-svc", "127.0.0.11")
    proxy.reconfigure({"serviceName": "idx-svc", "pathType": "path", "servicePath.1": "/m-idx/a",
                       "port.1": alt[0].port, "servicePath.2": "/m-idx/b", "port.2": replicas[0].port,
                       "pathType.2": "path_beg"})
    assert who(proxy, "/m-idx/a") == (200, f"127.0.0.11:{alt[0].port}")
    assert who(proxy, "/m-idx/a/x")[0] == 503  # bare pathType=path applies to .1
    assert who(proxy, "/m-idx/b/x") == (200, f"127.0.0.11:{replicas[0].port}")  # .2 overrides it


def test_is_default_backend(proxy, dns, two):
    register(proxy, dns, two[0], serviceName="def-svc", servicePath="/m-def", isDefaultBackend="true")
    register(proxy, dns, two[1], serviceName="def-other", servicePath="/m-def-other")
    assert who(proxy, "/m-def-other/x") == (200, two[1].addr)
    assert who(proxy, "/nothing/else/matches") == (200, two[0].addr)
    proxy.remove("def-svc")
    assert who(proxy, "/nothing/else/matches")[0] == 503


def test_src_port_with_bind_ports(make_pyroute, dns, replicas):
    extra = free_port()
    p = make_pyroute(BIND_PORTS=str(extra))
    dns.set_service("sp-a", replicas[0].ip)
    dns.set_service("sp-b", replicas[1].ip)
    p.reconfigure({"serviceName": "sp-a", "servicePath.1": "/m-sp", "srcPort.1": extra, "port.1": replicas[0].port})
    p.reconfigure(serviceName="sp-b", servicePath="/m-sp", port=replicas[1].port)
    assert who(p, "/m-sp", port=extra) == (200, replicas[0].addr)
    assert who(p, "/m-sp") == (200, replicas[1].addr)  # the default port does not match srcPort
    p.remove("sp-b")
    assert who(p, "/m-sp")[0] == 503


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_src_port_listener_opened_and_closed_at_runtime(proxy, dns, replicas):
    port = free_port()
    assert _refused(port)
    dns.set_service("sp-rt", replicas[0].ip)
    proxy.reconfigure(serviceName="sp-rt", servicePath="/m-sprt", srcPort=port, port=replicas[0].port)
    wait_until(lambda: not _refused(port), what="srcPort listener opened")
    assert who(proxy, "/m-sprt", port=port) == (200, replicas[0].addr)
    assert who(proxy, "/m-sprt")[0] == 503
    proxy.remove("sp-rt")
    wait_until(lambda: _refused(port), what="srcPort listener closed")


# -- precedence -----------------------------------------------------------------------------
# DFP: "/.well-known" first, "/" last, the rest by aclName -- so "a-short" (/m-prec) shadows
# "b-long" (/m-prec/deep). With LONGEST_MATCH the longest matching path wins instead.
PREC = [("prec-a-short", "/m-prec", 0), ("prec-b-long", "/m-prec/deep", 1), ("prec-z-root", "/", 2)]


def _precedence(p, dns, replicas):
    for name, path, i in PREC:
        dns.set_service(name, replicas[i].ip)
        p.reconfigure(serviceName=name, servicePath=path, port=replicas[i].port)


def test_precedence_dfp_order(proxy, dns, replicas):
    _precedence(proxy, dns, replicas)
    assert who(proxy, "/m-prec/deep/x") == (200, replicas[0].addr)  # aclName order, not length
    assert who(proxy, "/other") == (200, replicas[2].addr)


def test_precedence_longest_match(make_pyroute, dns, replicas):
    p = make_pyroute(LONGEST_MATCH="true")
    _precedence(p, dns, replicas)
    assert who(p, "/m-prec/deep/x") == (200, replicas[1].addr)
    assert who(p, "/m-prec/x") == (200, replicas[0].addr)
    assert who(p, "/other") == (200, replicas[2].addr)
    # conditional routes take part in the same order: a longer exact path beats the prefix
    dns.set_service("prec-exact", replicas[2].ip)
    p.reconfigure(serviceName="prec-exact", servicePath="/m-prec/deep/exact", pathType="path", port=replicas[2].port)
    assert who(p, "/m-prec/deep/exact") == (200, replicas[2].addr)
    assert who(p, "/m-prec/deep/exact2") == (200, replicas[1].addr)


def test_exclude_uses_the_path_type(proxy, dns, two):
    # DFP writes the exclude ACL with the destination's pathType
    register(proxy, dns, two[0], serviceName="ex-type", servicePath="/m-ext", pathType="path_beg",
             servicePathExclude="/m-ext/hidden")
    register(proxy, dns, two[0], serviceName="ex-end", servicePath=".m-jpg", pathType="path_end",
             servicePathExclude="/secret.m-jpg")
    assert who(proxy, "/m-ext/hidden/x")[0] == 503
    assert who(proxy, "/a/b.m-jpg") == (200, two[0].addr)
    assert who(proxy, "/a/secret.m-jpg")[0] == 503


def test_regex_engine_loads_with_the_first_path_reg_route(make_pyroute, dns, two):
    """RE2 (~1.5 MiB resident) is mapped into the process by the first route that needs it,
    not at start (issue 16: RSS after start)."""
    proxy = make_pyroute()

    def re2_mapped() -> bool:
        with open(f"/proc/{proxy.proc.pid}/maps") as maps:
            return "_re2" in maps.read()

    register(proxy, dns, two[0], serviceName="lazy-plain", servicePath="/lazy-plain")
    assert who(proxy, "/lazy-plain")[0] == 200
    assert not re2_mapped()
    register(proxy, dns, two[0], serviceName="lazy-reg", servicePath="^/lazy-reg/[0-9]+$", pathType="path_reg")
    assert who(proxy, "/lazy-reg/42")[0] == 200
    assert re2_mapped()
