"""ACME against a real ACME server (pebble): certificates ordered for labelled services,
served by SNI on every replica, challenges answered by whichever replica the CA reaches,
leases, renewal under an open TLS connection, and failures backing off."""
from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import threading
import time

import pytest

from conftest import start_pyroute, stop_pyroute
from support.engine import FakeEngine
from support.pebble import PEBBLE, Pebble
from support.proxy import API
from support.upstream import free_port, wait_until

pytestmark = pytest.mark.skipif(not os.path.exists(PEBBLE), reason="pebble is not installed (apt-get install pebble)")

ADMIN = {"ADMIN_USER": "admin", "ADMIN_PASS": "s3cret"}


@pytest.fixture
def pebble_for(dns):
    started = []

    def make(http_port: int, tls_port: int, **env) -> Pebble:
        p = Pebble(dns.nameserver, http_port, tls_port, **env).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def engine():
    e = FakeEngine()
    yield e
    e.close()


def acme_env(pebble: Pebble, tmp_path, http_port: int, tls_port: int, **extra) -> dict:
    return {**ADMIN, "DEFAULT_PORTS": f"{http_port},{tls_port}:ssl", "ACME_EMAIL": "ops@acme.test",
            "ACME_DIRECTORY": pebble.directory, "ACME_CA_FILE": pebble.ca_file,
            "CERTS_DIR": str(tmp_path / "certs"), "STATE_DIR": str(tmp_path / "state"), **extra}


def certs_of(p) -> dict:
    st, body = p.admin("certs")
    assert st == 200, body
    return body


def acme_cert(p, name: str) -> dict | None:
    return next((c for c in certs_of(p)["Certs"] if c["ProxyServiceName"] == f"{name}.pem"
                 and c["Source"] == "acme"), None)


def order_status(p, name: str) -> dict | None:
    return next((o for o in certs_of(p)["Acme"] if o["Name"] == name), None)


def wait_for_certificate(p, name: str, timeout: float = 30) -> dict:
    """The ACME certificate `name` once installed; fails at once if its order failed."""
    def installed():
        status = order_status(p, name)
        assert status is None or status["Status"] != "failed", status
        return acme_cert(p, name)
    return wait_until(installed, timeout=timeout, interval=0.1, what=f"the ACME certificate {name}")


def tls_peer(address: str, port: int, name: str, roots: str) -> dict:
    """The certificate served for SNI `name`, verified against pebble's root."""
    ctx = ssl.create_default_context(cadata=roots)
    with socket.create_connection((address, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            return tls.getpeercert()


def https_get(address: str, port: int, name: str, roots: str, path: str = "/"):
    ctx = ssl.create_default_context(cadata=roots)
    c = http.client.HTTPSConnection(address, port, context=ctx, timeout=5)
    c.sock = ctx.wrap_socket(socket.create_connection((address, port), timeout=5), server_hostname=name)
    try:
        c.request("GET", path, headers={"Host": name})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def metric(p, family: str, **labels) -> float:
    c = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=5)
    auth = base64.b64encode(b"admin:s3cret").decode()
    c.request("GET", "/metrics", headers={"Authorization": f"Basic {auth}"})
    text = c.getresponse().read().decode()
    c.close()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{family}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_labelled_service_gets_a_certificate_served_by_sni(dns, replicas, engine, make_pyroute, pebble_for,
                                                           tmp_path):
    """com.df.letsencrypt.host/email labels on a Swarm service (the built-in listener, on a
    fake Engine API): the certificate is ordered from pebble, served by SNI, listed in
    /certs with its issuer and source, counted in /metrics."""
    http_port, tls_port = free_port(), free_port()
    up = replicas[0]
    pebble = pebble_for(http_port, tls_port)
    dns.set("app1.acme.test", "127.0.0.1")
    dns.set_service("acme-app1", "127.0.0.11")
    engine.create("acme-app1", {"com.df.notify": "true", "com.df.serviceDomain": "app1.acme.test",
                                "com.df.servicePath": "/", "com.df.port": str(up.port),
                                "com.df.letsencrypt.host": "app1.acme.test",
                                "com.df.letsencrypt.email": "app1@acme.test"})
    p = make_pyroute(**acme_env(pebble, tmp_path, http_port, tls_port, DOCKER_HOST=engine.docker_host))
    cert = wait_for_certificate(p, "app1.acme.test")
    assert cert["DnsNames"] == ["app1.acme.test"] and "Pebble" in cert["Issuer"], cert
    assert "PRIVATE KEY" not in json.dumps(certs_of(p)["Acme"])
    roots = pebble.roots()
    peer = tls_peer("127.0.0.1", tls_port, "app1.acme.test", roots)
    assert ("DNS", "app1.acme.test") in peer["subjectAltName"]
    status, body = https_get("127.0.0.1", tls_port, "app1.acme.test", roots, "/hello")
    assert status == 200, body
    assert order_status(p, "app1.acme.test")["Status"] == "valid"
    assert metric(p, "pyroute_acme_orders_total", result="valid") == 1
    assert metric(p, "pyroute_certificate_expiry_timestamp_seconds", name="app1.acme.test.pem") > time.time()


class AcmeCluster:
    """Replicas 127.0.0.<base+i> of one proxy service (tasks.<name> in the test DNS), one
    admin PORT, the same HTTP and TLS ports (pebble validates there), one pebble."""

    def __init__(self, dns, pebble_for, tmp_path, base: int, count: int, **env):
        self.dns, self.tmp = dns, tmp_path
        self.name = f"acme-proxy-{base}"
        self.ips = [f"127.0.0.{base + i}" for i in range(count)]
        self.port, self.http_port, self.tls_port = (free_port(self.ips[0]) for _ in range(3))
        self.pebble = pebble_for(self.http_port, self.tls_port, **env.pop("pebble_env", {}))
        self.env = {**acme_env(self.pebble, tmp_path, self.http_port, self.tls_port), "SERVICE_NAME": self.name,
                    "REPAIR_INTERVAL": "0.5", **env}
        self.members: dict[int, object] = {}
        dns.set(f"tasks.{self.name}", self.ips)

    def start(self, i: int):
        self.members[i] = start_pyroute(self.dns, **{**self.env, "PORT": self.port, "IP": self.ips[i],
                                                     "BIND_ADDRESS": self.ips[i], "STATE_DIR": str(self.tmp / f"state{i}"),
                                                     "CERTS_DIR": str(self.tmp / f"certs{i}")})
        return self.members[i]

    def close(self):
        for p in self.members.values():
            stop_pyroute(p)
        self.dns.remove(f"tasks.{self.name}")


@pytest.fixture
def acme_cluster(dns, pebble_for, tmp_path):
    made = []

    def make(base: int, count: int, **env) -> AcmeCluster:
        c = AcmeCluster(dns, pebble_for, tmp_path, base, count, **env)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def test_three_replicas_one_order_all_serve_and_any_replica_answers_the_challenge(acme_cluster, dns, replicas):
    """The lowest replica orders; the CA's validation goes (by DNS) to the highest one,
    which did not order and answers from the replicated state; all three serve it."""
    c = acme_cluster(150, 3)
    members = [c.start(i) for i in range(3)]
    dns.set("app3.acme.test", c.ips[2])
    dns.set_service("acme-app3", "127.0.0.11")
    members[1].reconfigure(serviceName="acme-app3", serviceDomain="app3.acme.test", port=str(replicas[0].port),
                           distribute="true", **{"letsencrypt.host": "app3.acme.test"})
    for p in members:
        wait_for_certificate(p, "app3.acme.test")
    roots = c.pebble.roots()
    serials = {tls_peer(ip, c.tls_port, "app3.acme.test", roots)["serialNumber"] for ip in c.ips}
    assert len(serials) == 1, serials
    for ip in c.ips:
        assert https_get(ip, c.tls_port, "app3.acme.test", roots, "/hello")[0] == 200
    orders = [metric(p, "pyroute_acme_orders_total", result="valid") for p in members]
    assert orders == [1, 0, 0], orders
    assert "ordering app3.acme.test" not in members[2].log()


class Blackhole:
    """Accepts connections on ip:port and never answers: a validation that hangs."""

    def __init__(self, ip: str, port: int):
        self.sock = socket.create_server((ip, port))
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for s in self.held:
            s.close()


def acme_records(p) -> dict:
    st, body = p.admin("state")
    assert st == 200
    return {name: entry["value"] for name, entry in body.get("acme", {}).items() if entry["value"] is not None}


def test_replica_killed_mid_renewal_does_not_block_the_renewal(acme_cluster, dns, replicas):
    """The ordering replica dies while the CA's validation of its renewal hangs; the other
    replica keeps serving the old certificate, and once the dead one's lease expires
    (ACME_LEASE) it renews itself. (ACME_RENEW_BEFORE longer than pebble's lifetime: a
    certificate is due again ACME_RETRY after it was issued.)"""
    c = acme_cluster(160, 2, ACME_LEASE="3", ACME_RETRY="2", ACME_RENEW_BEFORE=str(20 * 365 * 86400))
    members = [c.start(i) for i in range(2)]
    hole = Blackhole("127.0.0.169", c.http_port)
    try:
        dns.set("app4.acme.test", c.ips[0])
        dns.set_service("acme-app4", "127.0.0.11")
        members[1].reconfigure(serviceName="acme-app4", serviceDomain="app4.acme.test", port=str(replicas[0].port),
                               distribute="true", **{"letsencrypt.host": "app4.acme.test"})
        wait_for_certificate(members[1], "app4.acme.test")
        roots = c.pebble.roots()
        first = tls_peer(c.ips[1], c.tls_port, "app4.acme.test", roots)["serialNumber"]
        dns.set("app4.acme.test", "127.0.0.169")  # the renewal's validation hangs
        lease = wait_until(lambda: acme_records(members[1]).get("lease app4.acme.test"), timeout=15,
                           what="the first replica's renewal lease, seen by the second")
        wait_until(lambda: hole.held, timeout=15, what="the CA's validation request")
        members[0].kill()
        dns.set("app4.acme.test", c.ips[1])
        assert tls_peer(c.ips[1], c.tls_port, "app4.acme.test", roots)["serialNumber"] == first
        wait_until(lambda: tls_peer(c.ips[1], c.tls_port, "app4.acme.test", roots)["serialNumber"] != first,
                   timeout=30, interval=0.2, what="the renewed certificate")
        status = order_status(members[1], "app4.acme.test")
        assert status["Status"] == "valid" and status["Updated"] >= lease["expires"], (status, lease)
        assert metric(members[1], "pyroute_acme_orders_total", result="valid") == 1
    finally:
        hole.close()


def test_renewal_replaces_the_certificate_live_while_a_tls_connection_stays_open(dns, replicas, make_pyroute,
                                                                                 pebble_for, tmp_path):
    """ACME_RENEW_BEFORE longer than pebble's lifetime: every certificate is due again at
    once (ACME_RETRY apart). New connections get the new one; an open one keeps working."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebble_for(http_port, tls_port)
    dns.set("app5.acme.test", "127.0.0.1")
    dns.set_service("acme-app5", "127.0.0.11")
    p = make_pyroute(**acme_env(pebble, tmp_path, http_port, tls_port, ACME_RENEW_BEFORE=str(20 * 365 * 86400),
                                ACME_RETRY="1"))
    p.reconfigure(serviceName="acme-app5", serviceDomain="app5.acme.test", port=str(replicas[0].port),
                  **{"letsencrypt.host": "app5.acme.test"})
    wait_for_certificate(p, "app5.acme.test")
    roots = pebble.roots()
    ctx = ssl.create_default_context(cadata=roots)
    conn = http.client.HTTPSConnection("127.0.0.1", tls_port, context=ctx, timeout=5)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls_port), timeout=5),
                                server_hostname="app5.acme.test")
    first = conn.sock.getpeercert()["serialNumber"]
    conn.request("GET", "/hello", headers={"Host": "app5.acme.test"})
    response = conn.getresponse()
    assert response.status == 200
    response.read()
    wait_until(lambda: tls_peer("127.0.0.1", tls_port, "app5.acme.test", roots)["serialNumber"] != first,
               timeout=30, interval=0.2, what="a renewed certificate on new connections")
    conn.request("GET", "/hello", headers={"Host": "app5.acme.test"})
    response = conn.getresponse()
    assert response.status == 200 and conn.sock.getpeercert()["serialNumber"] == first
    response.read()
    conn.close()
    assert metric(p, "pyroute_acme_orders_total", result="valid") >= 2


def test_nonce_rejections_back_off_exponentially_with_a_clear_status(dns, replicas, make_pyroute, pebble_for,
                                                                      tmp_path):
    """PEBBLE_WFE_NONCEREJECT=100: every signed request is refused. The order fails, /certs
    says why, retries wait 1, 2, 4 ... seconds (ACME_RETRY=1), the proxy keeps serving."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebble_for(http_port, tls_port, PEBBLE_WFE_NONCEREJECT="100")
    dns.set("app6.acme.test", "127.0.0.1")
    dns.set_service("acme-app6", "127.0.0.11")
    p = make_pyroute(**acme_env(pebble, tmp_path, http_port, tls_port, ACME_RETRY="1"))
    p.reconfigure(serviceName="acme-app6", servicePath="/", port=str(replicas[0].port),
                  **{"letsencrypt.host": "app6.acme.test"})
    status = wait_until(lambda: (s := order_status(p, "app6.acme.test")) and s["Failures"] >= 3 and s,
                        timeout=30, interval=0.1, what="three failed orders")
    assert status["Status"] == "failed" and "badNonce" in status["Error"], status
    delays = [float(line.split("next attempt in ")[1].split(" s")[0]) for line in p.log().splitlines()
              if "ACME: order for app6.acme.test failed" in line]
    assert delays[:3] == [1, 2, 4], delays
    assert metric(p, "pyroute_acme_orders_total", result="failed") == len(delays)
    assert acme_cert(p, "app6.acme.test") is None and p.alive()
    plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
    plain.request("GET", "/hello", headers={"Host": "app6.acme.test"})
    assert plain.getresponse().status == 200
    plain.close()


def crypto_loaded(p) -> bool:
    """Whether pyroute has cryptography's extension mapped (the acme library imports it)."""
    with open(f"/proc/{p.proc.pid}/maps") as fh:
        return "cryptography" in fh.read()


def test_unresolvable_name_fails_with_the_reason_and_other_names_still_get_certificates(
        dns, replicas, make_pyroute, pebble_for, tmp_path):
    """A name the DNS does not know fails with the CA's reason and backs off; another name
    of the same proxy gets its certificate. The acme library is loaded only once an order
    runs (a proxy with ACME on and nothing to order pays no memory for it)."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebble_for(http_port, tls_port)
    dns.set("app7.acme.test", "127.0.0.1")
    dns.set_service("acme-app7", "127.0.0.11")
    p = make_pyroute(**acme_env(pebble, tmp_path, http_port, tls_port, ACME_RETRY="30"))
    assert not crypto_loaded(p)  # ACME on, nothing to order yet: the acme library is not imported
    p.reconfigure(serviceName="acme-app7", serviceDomain="app7.acme.test", port=str(replicas[0].port),
                  **{"letsencrypt.host": "app7.acme.test"})
    p.reconfigure(serviceName="acme-nowhere", serviceDomain="nowhere.acme.test", port=str(replicas[0].port),
                  **{"letsencrypt.host": "nowhere.acme.test"})
    wait_for_certificate(p, "app7.acme.test")
    status = wait_until(lambda: (s := order_status(p, "nowhere.acme.test")) and s["Status"] == "failed" and s,
                        timeout=30, interval=0.1, what="the failed order")
    assert "nowhere.acme.test: " in status["Error"] and "could not resolve" in status["Error"], status
    assert status["Failures"] == 1 and status["NextAttempt"] - status["Updated"] == pytest.approx(30, abs=1)
    assert acme_cert(p, "nowhere.acme.test") is None
    assert "ACME: order for nowhere.acme.test failed (1 in a row), next attempt in 30 s" in p.log()
    assert crypto_loaded(p)


def test_tls_alpn_01_is_answered_on_the_tls_listener_by_every_worker(dns, replicas, make_pyroute, pebble_for,
                                                                     tmp_path):
    """ACME_CHALLENGE=tls-alpn-01 with WORKERS=2: with no certificate yet, the CA's
    acme-tls/1 handshake gets the validation certificate (from every worker), and the
    issued certificate is served by SNI; no HTTP-01 route exists."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebble_for(http_port, tls_port)
    dns.set("app8.acme.test", "127.0.0.1")
    dns.set_service("acme-app8", "127.0.0.11")
    p = make_pyroute(**acme_env(pebble, tmp_path, http_port, tls_port, ACME_CHALLENGE="tls-alpn-01", WORKERS="2"))
    p.reconfigure(serviceName="acme-app8", serviceDomain="app8.acme.test", port=str(replicas[0].port),
                  **{"letsencrypt.host": "app8.acme.test"})
    wait_for_certificate(p, "app8.acme.test")
    roots = pebble.roots()
    assert https_get("127.0.0.1", tls_port, "app8.acme.test", roots, "/hello")[0] == 200
    assert "/.well-known/acme-challenge" not in json.dumps(p.admin("routes")[1])
    st, body = p.admin("state")
    assert not [n for n, e in body["acme"].items() if n.startswith("tls-alpn-01") and e["value"] is not None]


def test_acme_domains_auto_orders_for_https_services_and_survives_a_restart(dns, replicas, make_pyroute,
                                                                            pebble_for, tmp_path):
    """ACME_DOMAINS=auto (no ACME_EMAIL), WORKERS=2 (the HTTP-01 route in each worker): an
    httpsOnly service's exact serviceDomain gets a certificate without any letsencrypt label
    (a wildcard domain does not). After a restart
    the certificate and its order come back from STATE_DIR: served, not ordered again."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebble_for(http_port, tls_port)
    dns.set("app9.acme.test", "127.0.0.1")
    dns.set_service("acme-app9", "127.0.0.11")
    env = acme_env(pebble, tmp_path, http_port, tls_port, ACME_DOMAINS="auto", DEFAULT_PORTS=f"{http_port}",
                   WORKERS="2")
    env.pop("ACME_EMAIL")
    p = make_pyroute(**env)
    p.reconfigure(serviceName="acme-app9", serviceDomain="app9.acme.test,*.wild.acme.test", httpsOnly="true",
                  port=str(replicas[0].port))
    wait_for_certificate(p, "app9.acme.test")
    assert [o["Name"] for o in certs_of(p)["Acme"]] == ["app9.acme.test"]
    p.stop()
    again = make_pyroute(**env)
    assert acme_cert(again, "app9.acme.test") and order_status(again, "app9.acme.test")["Status"] == "valid"
    assert metric(again, "pyroute_acme_orders_total", result="valid") == 0
    assert "ACME: ordering" not in again.log()


def test_acme_needs_admin_credentials_and_refuses_bad_labels(dns, make_pyroute, tmp_path):
    """ACME without admin credentials does not start; a wildcard or malformed label, and a
    malformed or cross-site pushed state, are refused with NOK and change nothing."""
    from support.proxy import PyrouteDied
    with pytest.raises(PyrouteDied, match="ACME needs ADMIN_USER and ADMIN_PASS"):
        make_pyroute(ACME_EMAIL="ops@acme.test")
    p = make_pyroute(**ADMIN, ACME_EMAIL="ops@acme.test", STATE_DIR=str(tmp_path / "state"))
    for label, value, why in (("letsencrypt.host", "*.acme.test", "dns-01"),
                              ("letsencrypt.host", "bad host!", "not a valid host name"),
                              ("letsencrypt.email", "nobody", "not an email address")):
        st, body = p.admin("reconfigure", serviceName="acme-bad", servicePath="/x", port="80", **{label: value})
        assert st == 400 and body["Status"] == "NOK" and why in body["Message"], body
    assert p.admin("config", type="json")[1] == {}
    auth = {"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()}
    state = json.dumps(p.admin("state")[1]).encode()
    for body, headers, status in ((b'{"format": 2, "revision": 1, "hash": "0"}', {}, 400),
                                  (state, {"Origin": "https://elsewhere.example"}, 403)):
        c = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=5)
        c.request("POST", f"{API}/state", body=body, headers={**auth, **headers})
        r = c.getresponse()
        assert r.status == status and json.loads(r.read())["Status"] == "NOK"
        c.close()


def test_tls_alpn_01_validation_certificate_goes_only_to_acme_tls_clients(dns, replicas, make_pyroute, pebble_for,
                                                                        tmp_path):
    """While a TLS-ALPN-01 challenge is pending (the CA's validation hangs on another
    address), a ClientHello offering only acme-tls/1 gets the validation certificate
    (acmeIdentifier extension, critical); an ordinary client still gets the name's
    current certificate."""
    import trustme
    from cryptography import x509
    http_port, tls_port = free_port(), free_port()
    pebble = pebble_for(http_port, tls_port)
    hole = Blackhole("127.0.0.169", tls_port)
    try:
        dns.set("app11.acme.test", "127.0.0.169")
        dns.set_service("acme-app11", "127.0.0.11")
        p = make_pyroute(**acme_env(pebble, tmp_path, http_port, tls_port, ACME_CHALLENGE="tls-alpn-01",
                                    ACME_RENEW_BEFORE=str(1100 * 365 * 86400)))  # trustme's lasts until 3000
        ca = trustme.CA()
        current = ca.issue_cert("app11.acme.test")
        c = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=5)
        c.request("PUT", f"{API}/cert?certName=app11.acme.test.pem",
                  body=b"".join(b.bytes() for b in current.cert_chain_pems) + current.private_key_pem.bytes(),
                  headers={"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()})
        assert c.getresponse().status == 200
        c.close()
        p.reconfigure(serviceName="acme-app11", serviceDomain="app11.acme.test", port=str(replicas[0].port),
                      **{"letsencrypt.host": "app11.acme.test"})
        wait_until(lambda: hole.held, timeout=15, what="the CA's validation request")

        acme_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        acme_client.check_hostname, acme_client.verify_mode = False, ssl.CERT_NONE
        acme_client.set_alpn_protocols(["acme-tls/1"])
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
            with acme_client.wrap_socket(raw, server_hostname="app11.acme.test") as tls:
                assert tls.selected_alpn_protocol() == "acme-tls/1"
                validation = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        extension = validation.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"))
        assert extension.critical and len(extension.value.value) == 34

        ordinary = ssl.create_default_context()
        ca.configure_trust(ordinary)
        ordinary.set_alpn_protocols(["http/1.1"])
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
            with ordinary.wrap_socket(raw, server_hostname="app11.acme.test") as tls:
                assert ("DNS", "app11.acme.test") in tls.getpeercert()["subjectAltName"]
        assert p.stop() == 0  # SIGTERM does not wait for the order still polling the CA
    finally:
        hole.close()
