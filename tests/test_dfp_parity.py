"""Docker Flow Proxy's own documented examples (docs/usage.md, docs/sni-routing.md,
docs/config.md), sent to pyroute as written (issue 17): header conditions on `ssl_fc`,
X-Forwarded-Proto/-For and TRUSTED_PROXIES, SNI routing with `req_ssl_sni -i -m ...`,
and the TLS settings (SSL_BIND_*, PREFERRED_CERTIFICATE, srcHttpsPort, STATS_PORT).
Real clients (http.client over ssl, curl, openssl s_client) against a real pyroute with
an HTTP and a TLS port and trustme certificates."""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys

import pytest
import trustme

from conftest import start_pyroute, stop_pyroute
from support.proxy import REPO, register
from support.upstream import ThreadedTlsServer, free_port
from test_tls import client_context, pem, served_names


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


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
    """One HTTPS request on a fresh connection to p.tls_port -> (status, headers, body)."""
    raw = socket.create_connection(("127.0.0.1", p.tls_port), timeout=10)
    c = http.client.HTTPConnection(host)
    c.sock = client_context(ca).wrap_socket(raw, server_hostname=host)
    try:
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


# -- 2. X-Forwarded-Proto / -For and TRUSTED_PROXIES ------------------------------------------------
def get_from(p, source: str, path: str, headers: dict | None = None):
    """One plain-HTTP request from the client address `source` (127.0.0.N)."""
    c = http.client.HTTPConnection("127.0.0.1", p.http_port, timeout=10, source_address=(source, 0))
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def test_x_forwarded_proto_from_a_balancer_in_front_passes_as_in_dfp(dfp, dns, replicas, ca):
    """DFP's redirectWhenHttpProto scenario: TLS ends at a load balancer, which sends plain HTTP
    with `X-Forwarded-Proto: https`. The backend sees https (an app forcing HTTPS from the header
    does not loop) and the redirect does not fire; over pyroute's own TLS the header is https
    whatever the client wrote; absent, it is http."""
    register(dfp, dns, replicas[0], serviceName="x-proto", redirectWhenHttpProto="true")
    data = echoed(dfp.get("/x-proto", {"X-Forwarded-Proto": "https", "Host": "app.example"}))
    assert received(data, "X-Forwarded-Proto") == ["https"]
    st, h, _ = dfp.get("/x-proto", {"X-Forwarded-Proto": "http", "Host": "app.example"})
    assert st == 302 and h["Location"] == "https://app.example/x-proto"
    assert received(echoed(https_get(dfp, ca, "/x-proto", headers={"X-Forwarded-Proto": "http"})),
                    "X-Forwarded-Proto") == ["https"]
    register(dfp, dns, replicas[0], serviceName="x-proto-plain")
    assert received(echoed(dfp.get("/x-proto-plain")), "X-Forwarded-Proto") == ["http"]


def test_without_trusted_proxies_the_tcp_peer_is_the_client(dfp, dns, replicas):
    """DFP's allowedIPs/logs use `src`: a client writing X-Forwarded-For gets no other address."""
    register(dfp, dns, replicas[0], serviceName="x-peer", allowedIPs="9.9.9.9", addReqHeader="X-Src %[src]")
    st, _, _ = dfp.get("/x-peer", {"X-Forwarded-For": "9.9.9.9"})
    assert st == 403
    register(dfp, dns, replicas[0], serviceName="x-peer", addReqHeader="X-Src %[src]")
    data = echoed(dfp.get("/x-peer", {"X-Forwarded-For": "9.9.9.9"}))
    assert received(data, "X-Src") == ["127.0.0.1"]
    assert received(data, "X-Forwarded-For") == ["9.9.9.9, 127.0.0.1"]


@pytest.fixture(scope="module")
def behind_balancer(dns):
    """A pyroute whose balancers are 127.0.0.2 and 127.0.0.3 (TRUSTED_PROXIES), access log on."""
    p = start_pyroute(dns, TRUSTED_PROXIES="127.0.0.2/32,127.0.0.3", DEBUG="true")
    yield p
    stop_pyroute(p)


def test_trusted_proxies_decide_who_sets_the_forwarded_headers(behind_balancer, dns, replicas):
    p = behind_balancer
    register(p, dns, replicas[0], serviceName="x-lb", addReqHeader="X-Src %[src]")
    try:
        # the balancer: its X-Forwarded-Proto passes, the client is the rightmost untrusted address
        data = echoed(get_from(p, "127.0.0.2", "/x-lb?from=lb", {
            "X-Forwarded-For": "6.6.6.6, 9.9.9.9, 127.0.0.3", "X-Forwarded-Proto": "https"}))
        assert received(data, "X-Forwarded-Proto") == ["https"]
        assert received(data, "X-Src") == ["9.9.9.9"]
        assert received(data, "X-Forwarded-For") == ["6.6.6.6, 9.9.9.9, 127.0.0.3, 127.0.0.2"]
        # anyone else: both headers replaced, the peer is the client
        data = echoed(get_from(p, "127.0.0.1", "/x-lb?from=client", {
            "X-Forwarded-For": "9.9.9.9", "X-Forwarded-Proto": "https"}))
        assert received(data, "X-Forwarded-Proto") == ["http"]
        assert received(data, "X-Src") == ["127.0.0.1"]
        assert received(data, "X-Forwarded-For") == ["127.0.0.1"]
        log = [json.loads(line[line.index("{"):]) for line in p.log().splitlines() if '"path":"/x-lb?from=' in line]
        assert [(entry["path"], entry["client"]) for entry in log] == [
            ("/x-lb?from=lb", "9.9.9.9"), ("/x-lb?from=client", "127.0.0.1")]
    finally:
        p.remove_all()


def test_allowed_ips_use_the_client_behind_a_trusted_balancer(behind_balancer, dns, replicas):
    p = behind_balancer
    register(p, dns, replicas[0], serviceName="x-allow", allowedIPs="9.9.9.0/24")
    try:
        assert get_from(p, "127.0.0.2", "/x-allow", {"X-Forwarded-For": "9.9.9.9"})[0] == 200
        assert get_from(p, "127.0.0.2", "/x-allow", {"X-Forwarded-For": "9.9.9.9, 8.8.8.8"})[0] == 403
        assert get_from(p, "127.0.0.1", "/x-allow", {"X-Forwarded-For": "9.9.9.9"})[0] == 403  # not a balancer
    finally:
        p.remove_all()


# -- 3. SNI routing as DFP's tutorial writes it -------------------------------------------------------
SNI_BACKEND_IP = "127.0.0.22"


@pytest.fixture(scope="module")
def sni_backend():
    """A TLS echo server for *.foobar.net with a CA of its own: a client verifying against that CA
    proves the proxy passed the stream through instead of terminating it."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("test.foobar.net", "api.foobar.net", "www.foobar.net").configure_cert(ctx)

    async def echo_once(reader, writer):  # one answer, then close (s_client waits for the close)
        writer.write(b"backend:" + await reader.read(65536))
        await writer.drain()
        writer.close()

    server = ThreadedTlsServer(echo_once, SNI_BACKEND_IP, ctx)
    server.ca = ca
    yield server
    server.close()


def s_client(port: int, name: str, ca: trustme.CA, tmp_path) -> subprocess.CompletedProcess:
    """`openssl s_client` sending "ping" with SNI `name`, verifying against `ca`."""
    ca_file = tmp_path / "sni-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name, "-CAfile", str(ca_file),
         "-verify_return_error", "-quiet", "-ign_eof"],
        input=b"ping\n", capture_output=True, timeout=20)


def sni_handshake_error(port: int, name: str) -> ssl.SSLError:
    """The error a Python ssl client gets for `name` (it must get one, and not hang)."""
    ctx = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError) as caught:
            ctx.wrap_socket(raw, server_hostname=name)
    return caught.value


def test_sni_tutorial_beg_and_reg_on_an_sni_port(dfp, dns, sni_backend, tmp_path):
    """DFP sni-routing.md: `pathType=req_ssl_sni -i -m beg` with `servicePath=test.` and
    `pathType=req_ssl_sni -i -m reg` with `servicePath=^(api\\.)`, both on one srcPort."""
    src = free_port()
    dns.set_service("sni-test", SNI_BACKEND_IP)
    dns.set_service("sni-api", SNI_BACKEND_IP)
    dfp.reconfigure(serviceName="sni-test", reqMode="sni", srcPort=src, port=sni_backend.port,
                    servicePath="test.", pathType="req_ssl_sni -i -m beg")
    dfp.reconfigure(serviceName="sni-api", reqMode="sni", srcPort=src, port=sni_backend.port,
                    servicePath=r"^(api\.)", pathType="req_ssl_sni -i -m reg")
    result = s_client(src, "test.foobar.net", sni_backend.ca, tmp_path)
    assert result.stdout == b"backend:ping\n", result.stderr
    result = s_client(src, "API.foobar.net", sni_backend.ca, tmp_path)  # -i
    assert result.stdout == b"backend:ping\n", result.stderr
    # a name no service takes: a TLS alert at once (openssl names it), not a hang or a bare close
    result = s_client(src, "www.foobar.net", sni_backend.ca, tmp_path)
    assert b"unrecognized name" in result.stderr and result.stdout == b"", result.stderr
    assert "UNRECOGNIZED_NAME" in str(sni_handshake_error(src, "www.foobar.net"))


@pytest.mark.parametrize("path_type, pattern, matching, other", [
    ("req_ssl_sni -i -m end", ".foobar.net", "test.foobar.net", "test.foobar.org"),
    ("req.ssl_sni -m sub", "bar.n", "test.foobar.net", "test.foobaz.net"),
    ("req_ssl_sni -m dom", "foobar.net", "api.foobar.net", "api.xfoobar.net"),
    ("req_ssl_sni -m str -i", "WWW.foobar.net", "www.foobar.net", "www.foobar.net.evil"),
    ("req_ssl_sni -i", "test.foobar.net", "test.foobar.net", "xtest.foobar.net"),
])
def test_sni_match_methods(dfp, dns, sni_backend, path_type, pattern, matching, other):
    src = free_port()
    dns.set_service("sni-m", SNI_BACKEND_IP)
    dfp.reconfigure(serviceName="sni-m", reqMode="sni", srcPort=src, port=sni_backend.port,
                    servicePath=pattern, pathType=path_type)
    ctx = client_context(sni_backend.ca)
    ctx.check_hostname = False  # `other` is not in the backend's certificate; it must not get that far
    with socket.create_connection(("127.0.0.1", src), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=matching) as tls:
            tls.sendall(b"ping")
            assert tls.recv(100) == b"backend:ping"
    assert "UNRECOGNIZED_NAME" in str(sni_handshake_error(src, other))


@pytest.mark.parametrize("path_type, named", [
    ("req_ssl_sni -i -m len", "'-m len'"),
    ("req_ssl_sni -i -x", "'-x'"),
    ("path_beg", "is not an SNI match"),
    ("hdr(host)", "is not an SNI match"),
])
def test_sni_path_type_never_dropped_silently(dfp, path_type, named):
    st, body = dfp.admin("reconfigure", serviceName="sni-bad", reqMode="sni", srcPort=free_port(), port=443,
                         servicePath="test.", pathType=path_type)
    assert st == 400 and "pathType" in body["Message"] and named in body["Message"], body


def test_sni_regex_refused_by_re2_is_400(dfp):
    st, body = dfp.admin("reconfigure", serviceName="sni-bad", reqMode="sni", srcPort=free_port(), port=443,
                         servicePath=r"^(a)\1", pathType="req_ssl_sni -m reg")
    assert st == 400 and "servicePath" in body["Message"], body


def test_sni_on_the_tls_port_without_any_certificate(make_pyroute, dns, sni_backend, tmp_path):
    """The tutorial has no certificate in the proxy (TLS ends in the services): the TLS port is
    open from the start, its sni names pass through, any other name gets an alert."""
    http_port, tls_port = free_port(), free_port()
    p = make_pyroute(DEFAULT_PORTS=f"{http_port},{tls_port}:ssl", CERTS_DIR=str(tmp_path / "none"),
                     SECRETS_DIR=str(tmp_path / "secrets"))
    dns.set_service("sni-nocert", SNI_BACKEND_IP)
    p.reconfigure(serviceName="sni-nocert", reqMode="sni", srcPort=tls_port, port=sni_backend.port,
                  servicePath="test.", pathType="req_ssl_sni -i -m beg")
    result = s_client(tls_port, "test.foobar.net", sni_backend.ca, tmp_path)
    assert result.stdout == b"backend:ping\n", result.stderr
    result = s_client(tls_port, "www.foobar.net", sni_backend.ca, tmp_path)
    assert b"unrecognized name" in result.stderr, result.stderr
    assert "UNRECOGNIZED_NAME" in str(sni_handshake_error(tls_port, "www.foobar.net"))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:  # no SNI at all
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            ctx.wrap_socket(raw)


# -- 7. TLS settings DFP had --------------------------------------------------------------------------
@pytest.fixture
def tls_pyroute(make_pyroute, ca, tmp_path):
    """A private pyroute with one HTTP and `tls_ports` TLS ports, a certificate for localhost."""
    def make(tls_ports: int = 1, **env):
        certs = tmp_path / "tls-certs"
        certs.mkdir(exist_ok=True)
        (certs / "localhost.pem").write_bytes(pem(ca.issue_cert("localhost", "foobar.net")))
        http_port, tls = free_port(), [free_port() for _ in range(tls_ports)]
        p = make_pyroute(DEFAULT_PORTS=",".join([str(http_port), *(f"{t}:ssl" for t in tls)]), CERTS_DIR=str(certs),
                         SECRETS_DIR=str(tmp_path / "secrets"), **env)
        p.http_port, p.tls_port, p.tls_ports = http_port, tls[0], tls
        return p
    return make


def handshake(port: int, ca: trustme.CA, name: str = "localhost", **versions) -> tuple[str, str]:
    """(TLS version, cipher) a Python client gets; `versions`: minimum_version/maximum_version."""
    ctx = client_context(ca)
    for key, value in versions.items():
        setattr(ctx, key, value)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            return tls.version(), tls.cipher()[0]


def start_error(tmp_path, **env) -> str:
    """What `python -m pyroute` prints when it refuses to start with these settings (exit 2)."""
    base = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "PORT": str(free_port()), "IP": "127.0.0.1",
            "DEFAULT_PORTS": str(free_port()), "BIND_ADDRESS": "127.0.0.1", "WORKERS": "1",
            "DNS_NAMESERVERS": "127.0.0.1:53", "CERTS_DIR": str(tmp_path / "c"), "SECRETS_DIR": str(tmp_path / "s")}
    result = subprocess.run([sys.executable, "-m", "pyroute"], env={**base, **env}, capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, (result.returncode, result.stderr)
    return result.stderr


def test_ssl_bind_options_no_tlsv10_no_tlsv11_as_dfp_writes_them(tls_pyroute, ca):
    """DFP config.md's SSL_BIND_OPTIONS words as written: `no-tlsv10 no-tlsv11` (already pyroute's
    floor), plus `no-tlsv13` to see the options reach the listener: TLS 1.2 only."""
    p = tls_pyroute(SSL_BIND_OPTIONS="no-sslv3 no-tlsv10 no-tlsv11 no-tlsv13")
    assert handshake(p.tls_port, ca)[0] == "TLSv1.2"
    with pytest.raises(ssl.SSLError):
        handshake(p.tls_port, ca, minimum_version=ssl.TLSVersion.TLSv1_3)


def test_ssl_bind_options_force_tlsv13(tls_pyroute, ca):
    p = tls_pyroute(SSL_BIND_OPTIONS="force-tlsv13")
    assert handshake(p.tls_port, ca)[0] == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(p.tls_port, ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{p.tls_port}", "-tls1_2",
                             "-servername", "localhost"], input=b"", capture_output=True, timeout=20)
    # refused (uvloop's TLS transport closes a failed handshake without flushing its alert: openssl sees EOF)
    assert result.returncode != 0 and b"no peer certificate available" in result.stdout, result.stdout


def test_ssl_bind_ciphers_apply_to_tls12(tls_pyroute, ca):
    p = tls_pyroute(SSL_BIND_OPTIONS="force-tlsv12", SSL_BIND_CIPHERS="ECDHE+CHACHA20")
    version, cipher = handshake(p.tls_port, ca)
    assert version == "TLSv1.2" and "CHACHA20" in cipher


@pytest.mark.parametrize("env, named", [
    ({"SSL_BIND_OPTIONS": "force-tlsv11"}, "SSL_BIND_OPTIONS: force-tlsv11: pyroute offers TLS 1.2 and 1.3 only"),
    ({"SSL_BIND_OPTIONS": "no-tlsv10 strict-sni"}, "SSL_BIND_OPTIONS: 'strict-sni' is not supported"),
    ({"SSL_BIND_OPTIONS": "no-tlsv12 no-tlsv13"}, "leaves no TLS version to offer"),
    ({"SSL_BIND_CIPHERS": "NOT-A-CIPHER"}, "SSL_BIND_CIPHERS: expected an OpenSSL cipher list"),
    ({"SSL_BIND_CIPHERSUITES": "TLS_AES_128_GCM_SHA256"}, "point OPENSSL_CONF at it"),
])
def test_tls_settings_pyroute_cannot_honour_stop_the_start_naming_them(tmp_path, env, named):
    assert named in start_error(tmp_path, **env)


def test_ssl_bind_ciphersuites_through_openssl_conf(tls_pyroute, ca, tmp_path):
    """TLS 1.3 suites: Python's ssl cannot set them; an OpenSSL config (OPENSSL_CONF) does, and
    pyroute starts once OpenSSL offers exactly SSL_BIND_CIPHERSUITES."""
    conf = tmp_path / "openssl.cnf"
    conf.write_text("openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\n"
                    "system_default = system_default_sect\n[system_default_sect]\n"
                    "Ciphersuites = TLS_CHACHA20_POLY1305_SHA256\n")
    p = tls_pyroute(OPENSSL_CONF=str(conf), SSL_BIND_CIPHERSUITES="TLS_CHACHA20_POLY1305_SHA256",
                    SSL_BIND_OPTIONS="force-tlsv13")
    assert handshake(p.tls_port, ca) == ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256")


def test_preferred_certificate_as_dfps_glob_list(make_pyroute, ca, tmp_path):
    """DFP: a glob list ordering the crt-list, the first entry the default certificate. Here
    `nothing*` matches none, `site-*` comes next and beats a.pem (loaded first) for the name both serve."""
    certs = tmp_path / "pref-certs"
    certs.mkdir()
    (certs / "a.pem").write_bytes(pem(ca.issue_cert("a.test", "shared.test")))
    (certs / "b.pem").write_bytes(pem(ca.issue_cert("b.test")))
    (certs / "site-main.pem").write_bytes(pem(ca.issue_cert("main.test", "shared.test")))
    http_port, tls_port = free_port(), free_port()
    make_pyroute(DEFAULT_PORTS=f"{http_port},{tls_port}:ssl", CERTS_DIR=str(certs),
                     SECRETS_DIR=str(tmp_path / "secrets"), PREFERRED_CERTIFICATE="nothing*,site-*,b")
    assert served_names(tls_port, "unknown.test", ca) == ["main.test", "shared.test"]  # the default
    assert served_names(tls_port, None, ca) == ["main.test", "shared.test"]
    assert served_names(tls_port, "shared.test", ca) == ["main.test", "shared.test"]
    assert served_names(tls_port, "a.test", ca) == ["a.test", "shared.test"]
    assert served_names(tls_port, "b.test", ca) == ["b.test"]


def test_src_https_port_takes_the_https_port_route_on_that_tls_port_only(tls_pyroute, dns, replicas, alt, ca):
    """DFP: srcHttpsPort is the entry port of the httpsPort destination."""
    p = tls_pyroute(tls_ports=2)
    dns.set_service("s-https", replicas[0].ip)
    p.reconfigure(serviceName="s-https", servicePath="/s-https", port=replicas[0].port, httpsPort=alt[0].port,
                  srcHttpsPort=p.tls_ports[1])
    plain = p.get("/s-https/hello")
    assert plain[0] == 200 and plain[1]["X-Upstream"].endswith(f":{replicas[0].port}")
    p.tls_port = p.tls_ports[1]
    st, h, _ = https_get(p, ca, "/s-https/hello")
    assert st == 200 and h["X-Upstream"].endswith(f":{alt[0].port}")
    p.tls_port = p.tls_ports[0]
    assert https_get(p, ca, "/s-https/hello")[0] == 503  # TLS on the other port: not this route


@pytest.mark.parametrize("params, named", [
    ({"srcHttpsPort": "9443", "httpsPort": "8443"}, "is not one of the proxy's TLS ports"),
    ({"srcHttpsPort": "TLS"}, "srcHttpsPort needs httpsPort"),
])
def test_src_https_port_refused_with_a_reason(tls_pyroute, replicas, params, named):
    p = tls_pyroute()
    if params["srcHttpsPort"] == "TLS":
        params = {"srcHttpsPort": str(p.tls_port)}
    st, body = p.admin("reconfigure", serviceName="s-bad", servicePath="/s-bad", port=replicas[0].port, **params)
    assert st == 400 and named in body["Message"], body


def test_stats_port_serves_the_stats_page_there_only(make_pyroute):
    stats_port = free_port()
    p = make_pyroute(STATS_USER="none", STATS_PASS="none", STATS_PORT=str(stats_port))
    c = http.client.HTTPConnection("127.0.0.1", stats_port, timeout=10)
    c.request("GET", "/admin?stats")
    r = c.getresponse()
    assert r.status == 200 and b"<html" in r.read().lower()
    c.close()
    assert p.get("/admin?stats")[0] == 503  # not on the other public ports


def test_stats_port_on_the_admin_port_stops_the_start(tmp_path):
    port = free_port()
    assert "STATS_PORT: %d is the admin PORT" % port in start_error(tmp_path, PORT=str(port), STATS_PORT=str(port))
