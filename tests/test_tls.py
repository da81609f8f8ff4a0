"""TLS termination: certificates from CERTS_DIR, secrets and the API, SNI choice,
hot replace under traffic, bad PEM, and the TLS policy, with trustme certificates
and real ssl clients."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import trustme

from support.proxy import API
from support.upstream import ThreadedTlsServer, free_port, wait_until


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def pem(cert: trustme.LeafCert) -> bytes:
    return b"".join(b.bytes() for b in cert.cert_chain_pems) + cert.private_key_pem.bytes()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def put_cert(p, name: str, body: bytes, method: str = "PUT"):
    c = http.client.HTTPConnection("127.0.0.1", p.admin_port, timeout=10)
    try:
        c.request(method, f"{API}/cert?certName={name}", body=body)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def served_names(port: int, server_name: str | None, ca: trustme.CA) -> list[str]:
    """The DNS names of the certificate the proxy presents for `server_name`."""
    ctx = client_context(ca)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            cert = tls.getpeercert()
    return [v for k, v in cert["subjectAltName"] if k == "DNS"]


class TlsClient:
    """A keep-alive HTTPS client verifying the certificate for `host`."""

    def __init__(self, port: int, host: str, ca: trustme.CA, source: str = "127.0.0.1"):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.sock = client_context(ca).wrap_socket(raw, server_hostname=host)
        self.conn = http.client.HTTPConnection(host)
        self.conn.sock = self.sock
        self.host = host

    def get(self, path: str):
        self.conn.request("GET", path, headers={"Host": self.host})
        r = self.conn.getresponse()
        return r.status, r.headers, r.read()

    def close(self):
        self.conn.close()


@pytest.fixture
def tls_proxy(make_pyroute, tmp_path):
    """A private pyroute with an HTTP port and a TLS port and an empty CERTS_DIR."""
    def make(**env):
        http_port, tls_port = free_port(), free_port()
        env.setdefault("CERTS_DIR", str(tmp_path / "certs"))
        env.setdefault("SECRETS_DIR", str(tmp_path / "secrets"))
        p = make_pyroute(DEFAULT_PORTS=f"{http_port},{tls_port}:ssl", **env)
        p.http_port, p.tls_port = http_port, tls_port
        return p
    return make


def route(p, dns, up, name: str):
    dns.set_service(name, up.ip)
    p.reconfigure(serviceName=name, servicePath="/", port=up.port)


def test_tls_port_serves_from_the_first_certificate(tls_proxy, dns, replicas, ca, tmp_path):
    """The TLS port is open from the start (sni services need no certificate): before the first
    certificate a handshake gets an unrecognized_name alert at once, after it succeeds."""
    p = tls_proxy()
    up = replicas[0]
    route(p, dns, up, "tls-first")
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        TlsClient(p.tls_port, "site.test", ca)
    assert "no certificate yet" in p.log()

    site_cert = ca.issue_cert("site.test")
    site = pem(site_cert)
    st, body = put_cert(p, "site", site)
    assert (st, body["Status"]) == (200, "OK"), body

    client = TlsClient(p.tls_port, "site.test", ca)
    st, headers, data = client.get("/hello")
    assert (st, data) == (200, b"hello, world!")
    assert client.sock.selected_alpn_protocol() == "http/1.1"
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    rec = up.requests("/hello")[-1]
    assert rec.header("X-Forwarded-Proto") == ["https"]
    assert rec.header("X-Forwarded-For") == ["127.0.0.1"]
    assert client.get("/again")[0] == 200  # keep-alive over TLS
    client.close()
    # plain HTTP still says http
    p.get("/plain")
    assert up.requests("/plain")[-1].header("X-Forwarded-Proto") == ["http"]

    st, body = p.admin("certs")
    assert st == 200 and [c["ProxyServiceName"] for c in body["Certs"]] == ["site.pem"]
    assert body["Certs"][0]["DnsNames"] == ["site.test"]
    # no admin credentials set: the list never hands out the private key
    assert body["Certs"][0]["CertContent"] == b"".join(b.bytes() for b in site_cert.cert_chain_pems).decode()
    assert "PRIVATE KEY" not in body["Certs"][0]["CertContent"]
    saved = (tmp_path / "certs" / "site.pem").read_bytes()
    assert saved == site
    assert not [f for f in os.listdir(tmp_path / "certs") if f.startswith(".tmp")]


def test_certificates_survive_a_restart_and_secrets_load(tls_proxy, dns, replicas, ca, tmp_path):
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "disk.pem").write_bytes(pem(ca.issue_cert("disk.test")))
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "cert-secret").write_bytes(pem(ca.issue_cert("secret.test")))
    (tmp_path / "secrets" / "other").write_bytes(pem(ca.issue_cert("ignored.test")))
    p = tls_proxy()
    assert served_names(p.tls_port, "disk.test", ca) == ["disk.test"]
    assert served_names(p.tls_port, "secret.test", ca) == ["secret.test"]
    assert served_names(p.tls_port, "ignored.test", ca) != ["ignored.test"]
    st, body = p.admin("certs")  # secrets are not listed (peers must not copy them)
    assert [c["ProxyServiceName"] for c in body["Certs"]] == ["disk.pem"]


def test_sni_exact_then_wildcard_then_default(tls_proxy, ca):
    p = tls_proxy(PREFERRED_CERTIFICATE="preferred")
    for name, dns_names in (("exact", ["a.example.test"]), ("wild", ["*.example.test"]),
                            ("preferred", ["default.test"])):
        st, body = put_cert(p, name, pem(ca.issue_cert(*dns_names)))
        assert st == 200, body
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    assert served_names(p.tls_port, "a.example.test", ca) == ["a.example.test"]
    assert served_names(p.tls_port, "b.example.test", ca) == ["*.example.test"]
    assert served_names(p.tls_port, "A.Example.Test", ca) == ["a.example.test"]
    assert served_names(p.tls_port, "deep.b.example.test", ca) == ["default.test"]  # wildcard = one label
    assert served_names(p.tls_port, "other.test", ca) == ["default.test"]
    assert served_names(p.tls_port, None, ca) == ["default.test"]


def test_first_certificate_is_the_default_without_preference(tls_proxy, ca):
    p = tls_proxy()
    put_cert(p, "one", pem(ca.issue_cert("one.test")))
    put_cert(p, "two", pem(ca.issue_cert("two.test")))
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    assert served_names(p.tls_port, "nothing.test", ca) == ["one.test"]


def test_bad_certificates_are_refused_and_change_nothing(tls_proxy, ca, tmp_path):
    p = tls_proxy()
    good = ca.issue_cert("good.test")
    assert put_cert(p, "good", pem(good))[0] == 200
    other = ca.issue_cert("good.test")
    cases = {
        "garbage": b"this is not PEM",
        "no key": b"".join(b.bytes() for b in good.cert_chain_pems),
        "wrong key": b"".join(b.bytes() for b in good.cert_chain_pems) + other.private_key_pem.bytes(),
        "broken cert": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
                       + good.private_key_pem.bytes(),
    }
    before = (tmp_path / "certs" / "good.pem").read_bytes()
    for why, body in cases.items():
        st, answer = put_cert(p, "good", body)
        assert (st, answer["Status"]) == (400, "NOK"), (why, answer)
        assert answer["Message"], why
    assert "does not match" in put_cert(p, "good", cases["wrong key"])[1]["Message"]
    assert put_cert(p, "", pem(good))[0] == 400
    assert put_cert(p, "x", b"")[0] == 400
    assert put_cert(p, "../escape", pem(good))[0] == 400
    st, answer = put_cert(p, "good", pem(good), method="GET")
    assert (st, answer["Status"]) == (405, "NOK")
    assert (tmp_path / "certs" / "good.pem").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "certs")) == ["good.pem"]
    assert [c["ProxyServiceName"] for c in p.admin("certs")[1]["Certs"]] == ["good.pem"]
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    assert served_names(p.tls_port, "good.test", ca) == ["good.test"]


def test_hot_replace_under_traffic(tls_proxy, dns, replicas, ca):
    p = tls_proxy()
    up = replicas[1]
    route(p, dns, up, "tls-hot")
    first = ca.issue_cert("hot.test")
    assert put_cert(p, "hot", pem(first))[0] == 200
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    old_client = TlsClient(p.tls_port, "hot.test", ca)
    old_serial = old_client.sock.getpeercert()["serialNumber"]
    assert old_client.get("/hello")[0] == 200

    failures: list[str] = []
    done = threading.Event()
    counts = [0, 0]

    def traffic(slot: int):
        try:
            while not done.is_set():
                client = TlsClient(p.tls_port, "hot.test", ca)  # new handshakes
                for _ in range(5):  # and keep-alive requests on each
                    st, _, _ = client.get("/hello")
                    if st != 200:
                        failures.append(f"status {st}")
                    counts[slot] += 1
                client.close()
        except Exception as exc:  # noqa: BLE001 - any error is a failure to report
            failures.append(repr(exc))

    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    serials = {old_serial}
    assert put_cert(p, "added", pem(ca.issue_cert("added.test")))[0] == 200  # a new name, mid-traffic
    assert served_names(p.tls_port, "added.test", ca) == ["added.test"]
    for _ in range(5):
        wait_until(lambda: min(counts) > 0, what="traffic flowing")
        cert = ca.issue_cert("hot.test")
        assert put_cert(p, "hot", pem(cert))[0] == 200
        serial = _serial(p.tls_port, "hot.test", ca)
        assert serial not in serials  # new handshakes see the new certificate at once
        serials.add(serial)
        counts[:] = [0, 0]
    done.set()
    for t in threads:
        t.join(20)
    assert not failures, failures[:5]
    # the connection opened before every replacement is still served
    assert old_client.get("/still") [0] == 200
    assert old_client.sock.getpeercert()["serialNumber"] == old_serial
    old_client.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_tls_versions_are_refused(tls_proxy, ca):
    p = tls_proxy()
    put_cert(p, "v", pem(ca.issue_cert("v.test")))
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    ctx = client_context(ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with socket.create_connection(("127.0.0.1", p.tls_port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            ctx.wrap_socket(raw, server_hostname="v.test")


def test_service_cert_on_reconfigure(tls_proxy, dns, replicas, ca):
    p = tls_proxy()
    up = replicas[2]
    dns.set_service("svc-cert", up.ip)
    body = pem(ca.issue_cert("svc.test")).decode().replace("\n", "\\n")
    p.reconfigure(serviceName="svc-cert", serviceDomain="svc.test", port=up.port, serviceCert=body)
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    client = TlsClient(p.tls_port, "svc.test", ca)
    assert client.get("/hello")[0] == 200
    client.close()
    assert [c["ProxyServiceName"] for c in p.admin("certs")[1]["Certs"]] == ["svc.test.pem"]
    st, answer = p.admin("reconfigure", serviceName="svc-bad", serviceDomain="bad.test", port=up.port,
                         serviceCert="not a pem")
    assert (st, answer["Status"]) == (400, "NOK")
    p.services.add("svc-bad")
    assert "svc-bad" not in p.admin("config", type="json")[1]


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _serial(port: int, name: str, ca) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_context(ca).wrap_socket(raw, server_hostname=name) as tls:
            return tls.getpeercert()["serialNumber"]


def test_workers_get_certificates(tls_proxy, dns, replicas, ca, tmp_path):
    """WORKERS=2: each worker binds the TLS port itself and serves certificates the
    control process installed, including ones added after the start."""
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "boot.pem").write_bytes(pem(ca.issue_cert("boot.test")))
    p = tls_proxy(WORKERS="2")
    up = replicas[0]
    route(p, dns, up, "tls-workers")
    assert put_cert(p, "later", pem(ca.issue_cert("later.test")))[0] == 200
    for _ in range(12):  # new connections: the kernel spreads them over both workers
        for name in ("boot.test", "later.test"):
            client = TlsClient(p.tls_port, name, ca)
            assert client.get("/hello")[0] == 200
            client.close()
    src = free_port()  # tcp listeners too are bound by every worker
    dns.set_service("tls-workers-tcp", up.ip)
    p.reconfigure(serviceName="tls-workers-tcp", reqMode="tcp", srcPort=src, port=up.port)
    wait_until(lambda: _connects(src), what="tcp listener open")
    for _ in range(12):
        with socket.create_connection(("127.0.0.1", src), timeout=10) as s:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello, world!")


def test_client_certificates(tls_proxy, dns, replicas, ca, tmp_path):
    client_ca = trustme.CA()
    ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_file))
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "mtls.pem").write_bytes(pem(ca.issue_cert("mtls.test")))
    p = tls_proxy(CA_FILE=str(ca_file))
    up = replicas[1]
    dns.set_service("mtls-secure", up.ip)
    dns.set_service("mtls-open", up.ip)
    p.reconfigure(serviceName="mtls-secure", servicePath="/secure", port=up.port, verifyClientSsl="true")
    p.reconfigure(serviceName="mtls-open", servicePath="/open", port=up.port)

    anonymous = TlsClient(p.tls_port, "mtls.test", ca)
    assert anonymous.get("/open/hello")[0] == 200
    st, _, body = anonymous.get("/secure/hello")
    assert st == 403 and b"403" in body
    assert not up.requests("/secure/hello")
    anonymous.close()
    anonymous = TlsClient(p.tls_port, "mtls.test", ca)  # absolute-form cannot sneak past
    assert anonymous.get("https://mtls.test/secure/abs")[0] == 403
    anonymous.close()
    assert p.get("/secure/plain")[0] == 503  # plain HTTP cannot carry a client certificate: no route
    assert not up.requests("/secure/plain")
    assert p.get("/open/plain")[0] == 200

    def with_cert(issuer: trustme.CA):
        ctx = client_context(ca)
        issuer.issue_cert("client@example.test").configure_cert(ctx)
        raw = socket.create_connection(("127.0.0.1", p.tls_port), timeout=10)
        tls = ctx.wrap_socket(raw, server_hostname="mtls.test")
        conn = http.client.HTTPConnection("mtls.test")
        conn.sock = tls
        conn.request("GET", "/secure/hello", headers={"Host": "mtls.test"})
        return conn.getresponse().status

    assert with_cert(client_ca) == 200
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        with_cert(trustme.CA())  # a certificate from an unknown CA fails the handshake


class HttpsUpstream(ThreadedTlsServer):
    """A minimal keep-alive HTTPS server with a certificate nobody trusts: it answers
    "tls:<request line>" and counts its TLS connections."""

    def __init__(self, ip: str):
        import asyncio
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("upstream.internal").configure_cert(ctx)
        self.connections = 0

        async def handle(reader, writer):
            self.connections += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    body = b"tls:" + head.split(b"\r\n")[0]
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        super().__init__(handle, ip, ctx)


def test_tls_to_upstream_with_ssl_verify_none(proxy, dns):
    backend = HttpsUpstream("127.0.0.22")
    try:
        dns.set_service("tls-upstream", backend.ip)
        proxy.reconfigure(serviceName="tls-upstream", servicePath="/secure-up", port=backend.port,
                          sslVerifyNone="true")
        c = proxy.conn()
        for n in range(3):
            c.request("GET", f"/secure-up/{n}")
            r = c.getresponse()
            assert (r.status, r.read()) == (200, f"tls:GET /secure-up/{n} HTTP/1.1".encode())
        c.close()
        assert backend.connections == 1  # pooled and reused like plain upstreams
        # without sslVerifyNone the same port is spoken to in plain HTTP: the TLS server refuses it
        proxy.reconfigure(serviceName="tls-upstream", servicePath="/secure-up", port=backend.port)
        assert proxy.get("/secure-up/plain")[0] in (502, 503)
    finally:
        backend.close()


def test_https_port_routes_tls_traffic(tls_proxy, dns, replicas, alt, ca):
    plain_up, tls_up = replicas[0], alt[0]
    assert plain_up.ip == tls_up.ip and plain_up.port != tls_up.port
    p = tls_proxy()
    put_cert(p, "hp", pem(ca.issue_cert("hp.test")))
    dns.set_service("https-port", plain_up.ip)
    p.reconfigure(serviceName="https-port", servicePath="/hp", port=plain_up.port, httpsPort=tls_up.port)
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    client = TlsClient(p.tls_port, "hp.test", ca)
    assert client.get("/hp/hello")[1]["X-Upstream"] == tls_up.addr
    client.close()
    assert p.get("/hp/hello")[1]["X-Upstream"] == plain_up.addr


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_over_tls(tls_proxy, dns, replicas, ca, tmp_path):
    p = tls_proxy()
    up = replicas[2]
    route(p, dns, up, "tls-curl")
    put_cert(p, "curl", pem(ca.issue_cert("curl.test")))
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    out = subprocess.run(["curl", "-sS", "-i", "--http1.1", "--max-time", "10", "--cacert", str(tmp_path / "ca.pem"),
                          "--resolve", f"curl.test:{p.tls_port}:127.0.0.1", f"https://curl.test:{p.tls_port}/hello"],
                         capture_output=True, timeout=15)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello, world!"


def test_closed_tls_connections_free_their_memory(tls_proxy, dns, replicas, ca):
    """Each TLS connection holds OpenSSL buffers; a closed one must release them at once,
    not when the cyclic collector next runs (RSS tripled under new-connection load)."""
    p = tls_proxy()
    route(p, dns, replicas[0], "tls-churn")  # every path; /hello answers "hello, world!"
    put_cert(p, "churn", pem(ca.issue_cert("churn.test")))
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    ctx = client_context(ca)
    request = b"GET /hello HTTP/1.1\r\nHost: churn.test\r\nConnection: close\r\n\r\n"

    def one_connection(_):
        with socket.create_connection(("127.0.0.1", p.tls_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="churn.test") as tls:
                tls.sendall(request)
                answer = b""
                while data := tls.recv(65536):
                    answer += data
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello, world!"), answer[:100]

    with ThreadPoolExecutor(16) as clients:  # connections overlap, as under real load
        list(clients.map(one_connection, range(500)))  # allocator arenas reach their working size
        before = p.rss_kib()
        list(clients.map(one_connection, range(3000)))
    # measured: +1 MiB when each closed connection is freed, +9.5 MiB when they wait for the collector
    assert p.rss_kib() - before < 4096, "closed TLS connections were kept in memory"


def test_maxconn_counts_https_clients_and_pauses_the_tls_port(tls_proxy, dns, replicas, ca):
    """MAXCONN is one limit for the process, as HAProxy's maxconn: HTTPS clients fill it
    too, and at the limit the TLS port stops accepting like the HTTP port."""
    p = tls_proxy(MAXCONN="2")
    route(p, dns, replicas[0], "tls-mc")
    put_cert(p, "mc", pem(ca.issue_cert("mc.test")))
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    first, second = TlsClient(p.tls_port, "mc.test", ca), TlsClient(p.tls_port, "mc.test", ca)
    assert first.get("/hello")[0] == 200 and second.get("/hello")[0] == 200
    wait_until(lambda: "MAXCONN 2 reached" in p.log(), what="the MAXCONN log line")

    plain = p.raw(timeout=2)  # two HTTPS clients fill it for HTTP too
    plain.request("GET", "/hello", [("Host", "a")])
    with pytest.raises((socket.timeout, TimeoutError)):
        plain.sock.recv(1, socket.MSG_PEEK)
    with ThreadPoolExecutor(1) as waiting:  # a third HTTPS client: its handshake is not answered
        third = waiting.submit(lambda: TlsClient(p.tls_port, "mc.test", ca).get("/hello")[0])
        with pytest.raises(TimeoutError):
            third.result(timeout=2)
        assert first.get("/hello")[0] == 200  # the accepted ones keep being served
        first.close()
        second.close()  # room again: both waiting connections are accepted and answered
        assert third.result(timeout=10) == 200
    plain.sock.settimeout(10)
    assert plain.read_response()[0].status_code == 200
    plain.close()


def test_timeout_server_applies_to_https_clients(tls_proxy, dns, replicas, ca):
    """The upstream pool, and its TIMEOUT_SERVER check, is shared by the HTTP and HTTPS servers."""
    p = tls_proxy(TIMEOUT_SERVER="1")
    route(p, dns, replicas[0], "tls-slow")
    put_cert(p, "slow", pem(ca.issue_cert("slow.test")))
    wait_until(lambda: _connects(p.tls_port), what="TLS port open")
    client = TlsClient(p.tls_port, "slow.test", ca)
    assert client.get("/slow/3")[0] == 504
    client.close()
