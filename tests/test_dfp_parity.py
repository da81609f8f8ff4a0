"""Docker Flow Proxy's own documented examples (docs/usage.md, docs/sni-routing.md,
docs/config.md), sent to pyroute as written (issue 17): header conditions on `ssl_fc`,
X-Forwarded-Proto/-For and TRUSTED_PROXIES, SNI routing with `req_ssl_sni -i -m ...`,
and the TLS settings (SSL_BIND_*, PREFERRED_CERTIFICATE, srcHttpsPort, STATS_PORT).
Real clients (http.client over ssl, curl, openssl s_client) against a real pyroute with
an HTTP and a TLS port and trustme certificates."""
from __future__ import annotations

import http.client
import json
import socket
import ssl

import pytest
import trustme

from conftest import start_pyroute, stop_pyroute
from support.proxy import register
from support.upstream import free_port


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def pem(cert: trustme.LeafCert) -> bytes:
    return b"".join(b.bytes() for b in cert.cert_chain_pems) + cert.private_key_pem.bytes()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="module")
def _dfp(dns, ca, tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    (certs / "foobar.pem").write_bytes(pem(ca.issue_cert("foobar.net", "*.foobar.net", "localhost")))
    http_port, tls_port = free_port(), free_port()
    p = start_pyroute(dns, DEFAULT_PORTS=f"{http_port},{tls_port}:ssl", CERTS_DIR=str(certs),
                      SECRETS_DIR=str(tmp_path_factory.mktemp("secrets")))
    p.http_port, p.tls_port = http_port, tls_port
    yield p
    stop_pyroute(p)


@pytest.fixture
def dfp(_dfp):
    """The module's pyroute (HTTP and TLS ports, a certificate for foobar.net and *.foobar.net)."""
    yield _dfp
    _dfp.remove_all()


def https_get(p, ca, path: str, host: str = "localhost", headers: dict | None = None):
    """One HTTPS request on a fresh connection -> (status, headers, body)."""
    c = http.client.HTTPSConnection("127.0.0.1", p.tls_port, timeout=10, context=client_context(ca))
    c._tunnel_host = None
    try:
        sock = socket.create_connection(("127.0.0.1", p.tls_port), timeout=10)
        c.sock = client_context(ca).wrap_socket(sock, server_hostname=host)
        c.request("GET", path, headers={"Host": host, **(headers or {})})
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def echoed(response) -> dict:
    status, _, body = response
    assert status == 200, (status, body)
    return json.loads(body)


def received(data: dict, name: str) -> list[str]:
    return [v for k, v in data["headers"] if k.lower() == name.lower()]


# -- 1. header conditions ---------------------------------------------------------------------
def test_add_req_header_if_ssl_fc_as_dfp_usage_writes_it(dfp, dns, replicas, ca):
    """DFP usage.md: `addReqHeader=X-Forwarded-Ssl on if { ssl_fc }` -- the header only over TLS,
    never the literal condition text."""
    register(dfp, dns, replicas[0], serviceName="c-ssl", addReqHeader="X-Forwarded-Ssl on if { ssl_fc }",
             setReqHeader="X-Plain yes unless { ssl_fc }")
    over_http = echoed(dfp.get("/c-ssl"))
    over_tls = echoed(https_get(dfp, ca, "/c-ssl"))
    assert received(over_http, "X-Forwarded-Ssl") == [] and received(over_tls, "X-Forwarded-Ssl") == ["on"]
    assert received(over_http, "X-Plain") == ["yes"] and received(over_tls, "X-Plain") == []


def test_set_req_header_if_not_ssl_fc_keeps_the_clients_header_over_tls(dfp, dns, replicas, ca):
    """`if !{ ssl_fc }` is `unless { ssl_fc }`: over TLS the set-header does nothing (the client's
    value stays); over HTTP it replaces it."""
    register(dfp, dns, replicas[0], serviceName="c-notssl", setReqHeader="X-Proto-Hint http if !{ ssl_fc }")
    assert received(echoed(dfp.get("/c-notssl", {"X-Proto-Hint": "client"})), "X-Proto-Hint") == ["http"]
    assert received(echoed(https_get(dfp, ca, "/c-notssl", headers={"X-Proto-Hint": "client"})),
                    "X-Proto-Hint") == ["client"]


def test_response_header_conditions(dfp, dns, replicas, ca):
    register(dfp, dns, replicas[0], serviceName="c-res",
             addResHeader="Strict-Transport-Security max-age=31536000 if { ssl_fc }",
             setResHeader="X-Served-By plain unless { ssl_fc }")
    _, h_http, _ = dfp.get("/c-res/hello")
    _, h_tls, _ = https_get(dfp, ca, "/c-res/hello")
    assert h_http.get("Strict-Transport-Security") is None and h_http["X-Served-By"] == "plain"
    assert h_tls["Strict-Transport-Security"] == "max-age=31536000" and h_tls.get("X-Served-By") is None


@pytest.mark.parametrize("param, value, named", [
    ("addReqHeader", "X-Forwarded-Ssl on if { hdr(host) -m beg a }", "if { hdr(host) -m beg a }"),
    ("setResHeader", "X-A b if is_ssl", "if is_ssl"),
    ("addResHeader", "X-A b unless { ssl_fc } || { src 10.0.0.0/8 }", "unless { ssl_fc } || { src 10.0.0.0/8 }"),
    ("setReqHeader", "X-A if { ssl_fc }", "no value before the condition"),
])
def test_other_conditions_are_400_naming_them(dfp, replicas, param, value, named):
    st, body = dfp.admin("reconfigure", serviceName="c-bad", servicePath="/c-bad", port=replicas[0].port,
                         **{param: value})
    assert st == 400 and body["Status"] == "NOK" and named in body["Message"] and param in body["Message"], body
    assert dfp.admin("config", type="json")[1].get("c-bad") is None
