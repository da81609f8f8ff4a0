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
from support.proxy import API, Pyroute, PyrouteDied
from support.upstream import free_port, wait_until

PYROUTE_ENV = {"HEADER_ENV_ALLOW": "PYROUTE_F6_REGION", "PYROUTE_F6_REGION": "eu-west",
               "PYROUTE_F6_UNLISTED": "not-for-clients"}


@pytest.fixture
def up(replicas):
    return replicas[0]


def register(proxy, dns, up, **params):
    dns.set_service(params["serviceName"], up.ip)
    params.setdefault("port", up.port)
    params.setdefault("servicePath", "/" + params["serviceName"])
    return proxy.reconfigure(params)


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


