"""Issue 14, operator input: header values and names (F2, F6), operator regexes (F4),
certName / aclName / srcPort and log lines (F15). Each bad value goes through a real
pyroute's admin API (or Swarm labels) and must be a 400 NOK naming the parameter with
nothing changed; the request-time ones send real requests through the proxy."""
import http.client
import json
import os
import re
import socket

import pytest
import trustme

from support.engine import FakeEngine
from support.proxy import API, Pyroute, PyrouteDied, register
from support.upstream import free_port, wait_until

PYROUTE_ENV = {"HEADER_ENV_ALLOW": "PYROUTE_F6_REGION", "PYROUTE_F6_REGION": "eu-west",
               "PYROUTE_F6_UNLISTED": "not-for-clients"}


@pytest.fixture
def up(replicas):
    return replicas[0]


def refused(proxy, dns, up, *words, **params):
    """The reconfigure is a 400 NOK whose message holds every word; /config and routing unchanged."""
    dns.set_service(params["serviceName"], up.ip)
    params.setdefault("port", up.port)
    params.setdefault("servicePath", "/" + params["serviceName"])
    before = proxy.admin("config", type="json")
    text_before = proxy.admin("config")
    proxy.services.add(params["serviceName"])  # (removed after the test even if accepted)
    st, body = proxy.admin("reconfigure", params)
    assert st == 400, (st, body)
    assert body["Status"] == "NOK", body
    for word in words:
        assert word in body["Message"], (word, body["Message"])
    assert proxy.admin("config", type="json") == before
    assert proxy.admin("config") == text_before
    if params["servicePath"].startswith("/"):
        assert proxy.get(params["servicePath"].split(",")[0] + "/echo")[0] == 503
    return body["Message"]


def echo(proxy, path, headers=None):
    st, h, body = proxy.get(path, headers=headers)
    assert st == 200, (st, body)
    return json.loads(body), h


def received(data, name):
    return [v for k, v in data["headers"] if k.lower() == name.lower()]


def still_serving(proxy, dns, up, name):
    """The data plane still takes changes and answers (F2: one bad call took it down)."""
    register(proxy, dns, up, serviceName=name)
    assert echo(proxy, f"/{name}/x")[0]["target"] == f"/{name}/x"


# -- F2: header values the data plane cannot encode are refused at validation ---------------
@pytest.mark.parametrize("param", ["addReqHeader", "setReqHeader", "addResHeader", "setResHeader"])
def test_F2_non_ascii_header_value_is_refused(proxy, dns, up, param):
    message = refused(proxy, dns, up, param, "ASCII", serviceName="f2-euro", **{param: "X-Euro \u20ac"})
    assert "X-Euro" in message
    still_serving(proxy, dns, up, "f2-after")


@pytest.mark.parametrize("value,problem", [
    ("X-Ctl a\x01b", "control"),
    ("X-Del a\x7fb", "control"),
    ("X-Vt a\x0bb", "control"),
    ("X-Long " + "a" * 9000, "longer"),
])
def test_F2_header_values_with_controls_or_unbounded_length_are_refused(proxy, dns, up, value, problem):
    refused(proxy, dns, up, "addResHeader", problem, serviceName="f2-ctl", addResHeader=value)


@pytest.mark.parametrize("param,value", [
    ("delReqHeader", "X-\u20ac"),
    ("delResHeader", "X Space"),
    ("addReqHeader", "X-\u00e9t\u00e9 v"),
    ("serviceHeader", "X-\u20ac:v"),
    ("serviceHeader", "X-Key:\u20ac"),
])
def test_F2_every_header_parameter_is_checked(proxy, dns, up, param, value):
    refused(proxy, dns, up, param, serviceName="f2-names", **{param: value})


def test_F2_header_values_keep_tabs_and_visible_ascii(proxy, dns, up):
    register(proxy, dns, up, serviceName="f2-ok", addReqHeader="X-Ok a\tb ~!#$%&'*+-.^_`|",
             setResHeader='X-Quote "q" (c) <x>')
    data, h = echo(proxy, "/f2-ok/x")
    assert received(data, "X-Ok") == ["a\tb ~!#$%&'*+-.^_`|"]
    assert h["X-Quote"] == '"q" (c) <x>'


@pytest.fixture
def engine():
    e = FakeEngine()
    yield e
    e.close()


def test_F2_swarm_labels_get_the_same_check(engine, make_pyroute, dns, replicas):
    up = replicas[0]
    for name in ("f2-label-bad", "f2-label-good"):
        dns.set_service(name, up.ip)
    engine.create("f2-label-bad", {"com.df.notify": "true", "com.df.servicePath": "/f2-label-bad",
                                   "com.df.port": str(up.port), "com.df.addReqHeader": "X-Euro \u20ac"})
    engine.create("f2-label-good", {"com.df.notify": "true", "com.df.servicePath": "/f2-label-good",
                                    "com.df.port": str(up.port)})
    p = make_pyroute(DOCKER_HOST=engine.docker_host, SWARM_POLL_INTERVAL="0.2")
    wait_until(lambda: p.admin("successfulinitreload")[0] == 200, what="initial listing applied")
    wait_until(lambda: "labels rejected" in p.log(), what="the bad labels logged")
    assert re.search(r"f2-label-bad: labels rejected \(400\): addReqHeader.*ASCII", p.log()), p.log()
    assert set(p.admin("config", type="json")[1]) == {"f2-label-good"}
    assert echo(p, "/f2-label-good/x")[0]["target"] == "/f2-label-good/x"
    assert p.get("/f2-label-bad/x")[0] == 503


# -- F4: operator regexes run in linear time --------------------------------------------------
def answer_of(proxy, target: str, timeout: float = 5.0) -> int:
    """The status pyroute answers `target` with; a stalled loop hits the socket timeout."""
    with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=timeout) as s:
        s.sendall(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: f4\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_F4_path_reg_that_backtracks_answers_promptly(proxy, dns, up):
    register(proxy, dns, up, serviceName="f4-redos", pathType="path_reg", servicePath="^/redos/(a+)+$")
    assert answer_of(proxy, "/redos/" + "a" * 40 + "!") == 503
    assert answer_of(proxy, "/redos/" + "a" * 40) == 200


def test_F4_rewrite_that_backtracks_answers_promptly(proxy, dns, up):
    register(proxy, dns, up, serviceName="f4-rw", servicePath="/rw", reqPathSearchReplace="/rw/(x+x+)+y,/z")
    assert answer_of(proxy, "/rw/" + "x" * 40) == 200
    assert echo(proxy, "/rw/xxy/tail")[0]["target"] == "/z/tail"


@pytest.mark.parametrize("params,words", [
    ({"pathType": "path_reg", "servicePath": r"^/f4-bad/(a)\1$"}, ["servicePath", "RE2"]),
    ({"pathType": "path_reg", "servicePath": "^/f4-bad/(?=x)"}, ["servicePath", "RE2"]),
    ({"servicePath": "/f4-bad", "reqPathSearchReplace": "/f4-bad/(?!x),/y/"}, ["reqPathSearchReplace", "RE2"]),
    ({"servicePath": "/f4-bad", "reqPathSearch": r"/f4-bad/(a)\1", "reqPathReplace": "/y"}, ["reqPathSearch", "RE2"]),
    ({"pathType": "path_reg", "servicePath": "^/f4-bad/", "servicePathExclude": "/f4-bad/(?<=x)y"},
     ["servicePathExclude", "RE2"]),
])
def test_F4_patterns_that_need_backtracking_are_refused(proxy, dns, up, params, words):
    refused(proxy, dns, up, *words, serviceName="f4-bad", **params)


def test_F4_path_reg_excludes_use_the_linear_engine_too(proxy, dns, up):
    register(proxy, dns, up, serviceName="f4-ex", pathType="path_reg", servicePath="^/f4-ex/",
             servicePathExclude="/f4-ex/(a+)+$")
    assert answer_of(proxy, "/f4-ex/" + "a" * 40 + "!") == 200
    assert answer_of(proxy, "/f4-ex/" + "a" * 40) == 503


def test_F4_replacement_group_references_as_haproxy_regsub(proxy, dns, up):
    register(proxy, dns, up, serviceName="f4-groups",
             reqPathSearchReplace=r"/f4-groups/([a-z]+)/([0-9]+),/v\2/\1/\0/\g<1>")
    assert echo(proxy, "/f4-groups/item/42/x?q=1")[0]["target"] == "/v42/item//f4-groups/item/42/item/x?q=1"


# -- F6: header edits and rewrites that would break framing or leak secrets ------------------
@pytest.mark.parametrize("param,value", [
    ("setResHeader", "Content-Length 1"),
    ("addResHeader", "Transfer-Encoding chunked"),
    ("setReqHeader", "Content-Length 0"),
    ("addReqHeader", "transfer-encoding chunked"),
    ("addReqHeader", "Connection close"),
    ("setResHeader", "Keep-Alive timeout=1"),
    ("addReqHeader", "Proxy-Connection x"),
    ("setReqHeader", "TE trailers"),
    ("addResHeader", "Trailer X"),
    ("setReqHeader", "Upgrade websocket"),
    ("delResHeader", "Content-Length"),
    ("delReqHeader", "Transfer-Encoding"),
    ("addReqHeader", "Host second.example"),
    ("delReqHeader", "Host"),
])
def test_F6_framing_and_hop_by_hop_edits_are_refused(proxy, dns, up, param, value):
    message = refused(proxy, dns, up, param, serviceName="f6-frame", **{param: value})
    assert value.split()[0].lower() in message.lower()


def test_F6_set_req_host_stays_a_feature(proxy, dns, up):
    register(proxy, dns, up, serviceName="f6-host", setReqHeader="Host backend.example")
    data, _ = echo(proxy, "/f6-host/x", {"Host": "public.example"})
    assert received(data, "Host") == ["backend.example"]


def test_F6_env_fetch_needs_header_env_allow(proxy, dns, up):
    message = refused(proxy, dns, up, "addResHeader", "PYROUTE_F6_UNLISTED", "HEADER_ENV_ALLOW",
                      serviceName="f6-env", addResHeader="X-Leak %[env(PYROUTE_F6_UNLISTED)]")
    assert "not-for-clients" not in message
    register(proxy, dns, up, serviceName="f6-env-ok", addResHeader="X-Region %[env(PYROUTE_F6_REGION)]")
    assert echo(proxy, "/f6-env-ok/x")[1]["X-Region"] == "eu-west"


def test_F6_admin_password_is_never_sent_to_clients(make_pyroute, dns, replicas):
    p = make_pyroute(ADMIN_USER="f6-admin", ADMIN_PASS="f6-s3cret")
    message = refused(p, dns, replicas[0], "addResHeader", "ADMIN_PASS", serviceName="f6-leak",
                      addResHeader="X-Leak %[env(ADMIN_PASS)]")
    assert "f6-s3cret" not in message


@pytest.mark.parametrize("listed", ["ADMIN_PASS", "STATS_USER", "PYROUTE_PEER_TOKEN", "MY_API_KEY", "DB_PASSWORD",
                                    "APP_SECRET"])
def test_F6_secrets_in_header_env_allow_stop_the_start(dns, listed):
    p = Pyroute(dns.nameserver, HEADER_ENV_ALLOW=f"PYROUTE_F6_REGION,{listed}")
    try:
        with pytest.raises(PyrouteDied) as died:
            p.start(timeout=10)
    finally:
        p.stop()
    assert "HEADER_ENV_ALLOW" in str(died.value) and listed in str(died.value)
    assert p.proc.returncode not in (None, 0)


@pytest.mark.parametrize("rule,words", [
    ("/f6-rw/,/a b/", ["reqPathSearchReplace", "space"]),
    ("/f6-rw/,/a\r\nX-Injected=1\r\n/", ["reqPathSearchReplace"]),
    ("/f6-rw/,/a\tb/", ["reqPathSearchReplace"]),
    (r"/f6-rw/,/a\r\nX-Injected=1/", ["reqPathSearchReplace", "escape"]),
    ("/f6-rw/(.*)," + r"\g<0>" * 2000, ["reqPathSearchReplace", "group references"]),
    ("/f6-rw/(.*),/" + "a" * 2000, ["reqPathSearchReplace", "longer"]),
    (r"/f6-rw/(.*),/\3", ["reqPathSearchReplace", "group"]),
])
def test_F6_rewrite_replacements_that_could_split_or_amplify_are_refused(proxy, dns, up, rule, words):
    refused(proxy, dns, up, *words, serviceName="f6-rw", reqPathSearchReplace=rule)


def test_F6_rewritten_target_past_max_uri_size_is_never_forwarded(proxy, dns, up):
    register(proxy, dns, up, serviceName="f6-amp", reqPathSearchReplace=r"/f6-amp/(.*),/f6-amp/\1\1\1\1\1\1\1\1")
    assert echo(proxy, "/f6-amp/ab")[0]["target"] == "/f6-amp/abababababababab"
    up.received.clear()
    st, _, body = proxy.get("/f6-amp/" + "x" * 2000)
    assert st == 500, (st, body)
    assert not [r for r in up.received if r.target.startswith("/f6-amp")]
    assert echo(proxy, "/f6-amp/cd")[0]["target"] == "/f6-amp/cdcdcdcdcdcdcdcd"


# -- F15: names that reach files, /config and listeners; log lines -----------------------------
def put_cert(p, name: str, body: bytes):
    c = http.client.HTTPConnection("127.0.0.1", p.admin_port, timeout=10)
    try:
        c.request("PUT", f"{API}/cert?certName={name}", body=body)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


@pytest.mark.parametrize("name", ["x%0D%0Ay", "x%0Ay", "..", "..%2Fescape", "a%2Fb", "x%00y", "x%20y", "x%3Bid"])
def test_F15_cert_name_outside_a_safe_file_name_is_refused(make_pyroute, tmp_path, name):
    certs = tmp_path / "certs"
    p = make_pyroute(DEFAULT_PORTS=f"{free_port()},{free_port()}:ssl", CERTS_DIR=str(certs))
    leaf = trustme.CA().issue_cert("f15.test")
    body = b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes()
    st, answer = put_cert(p, name, body)
    assert st == 400 and answer["Status"] == "NOK" and "certName" in answer["Message"], (st, answer)
    assert not certs.exists() or os.listdir(certs) == []
    assert not (tmp_path / "escape.pem").exists()
    assert put_cert(p, "f15-good.example", body)[0] == 200
    assert os.listdir(certs) == ["f15-good.example.pem"]


@pytest.mark.parametrize("acl", ["f15\nacl injected path_beg /", "f15 acl", "f15;x", "f15\x00x"])
def test_F15_acl_name_outside_a_safe_token_is_refused(proxy, dns, up, acl):
    refused(proxy, dns, up, "aclName", serviceName="f15-acl", aclName=acl)


def test_F15_acl_names_dfp_users_write_still_work(proxy, dns, up):
    register(proxy, dns, up, serviceName="f15-acl-ok", aclName="01-first_acl.v2")
    assert "01-first_acl.v2" in proxy.admin("config")[1]


@pytest.mark.parametrize("mode,conflict,words", [
    ("tcp", "admin", ["srcPort", "PORT"]),
    ("tcp", "http", ["srcPort", "DEFAULT_PORTS"]),
    ("sni", "admin", ["srcPort", "PORT"]),
    ("sni", "http", ["srcPort", "DEFAULT_PORTS"]),
    ("http", "admin", ["srcPort", "PORT"]),
])
def test_F15_src_port_on_a_proxy_port_is_refused(proxy, dns, up, mode, conflict, words):
    port = proxy.admin_port if conflict == "admin" else proxy.http_port
    params = {"reqMode": mode, "srcPort": port}
    if mode == "sni":
        params["servicePath"] = "f15.example"
    message = refused(proxy, dns, up, *words, serviceName="f15-src", **params)
    assert str(port) in message
    assert proxy.admin("ping")[0] == 200  # the admin port still answers the admin API


def test_F15_log_lines_escape_control_characters(make_pyroute, dns, replicas):
    p = make_pyroute(FILTER_PROXY_INSTANCE_NAME="true", PROXY_INSTANCE_NAME="f15")
    st, body = p.admin("reconfigure", serviceName="f15-log\nERROR forged line", servicePath="/f15-log",
                       port=replicas[0].port, proxyInstanceName="other")
    assert st == 200, body
    wait_until(lambda: "f15-log" in p.log(), what="the ignored service logged")
    lines = p.log().splitlines()
    assert not any(line.startswith("ERROR forged line") for line in lines), lines
    assert any("f15-log\\nERROR forged line" in line for line in lines), lines
