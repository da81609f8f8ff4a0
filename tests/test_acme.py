"""ACME against a real ACME server (pebble): certificates ordered for labelled services,
served by SNI on every replica, challenges answered by whichever replica the CA reaches,
leases, renewal under an open TLS connection, and failures backing off."""
from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import ssl
import time

import pytest

from support.pebble import PEBBLE, Pebble
from support.proxy import API
from support.upstream import free_port, wait_until

pytestmark = pytest.mark.skipif(not shutil.which("pebble") and not PEBBLE.startswith("/usr/bin"),
                                reason="pebble is not installed (apt-get install pebble)")

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


def test_labelled_service_gets_a_certificate_served_by_sni(dns, replicas, make_pyroute, pebble_for, tmp_path):
    http_port, tls_port = free_port(), free_port()
    up = replicas[0]
    pebble = pebble_for(http_port, tls_port)
    dns.set("app1.acme.test", "127.0.0.1")
    dns.set_service("acme-app1", "127.0.0.11")
    p = make_pyroute(**acme_env(pebble, tmp_path, http_port, tls_port))
    p.reconfigure(serviceName="acme-app1", serviceDomain="app1.acme.test", port=str(up.port), servicePath="/",
                  **{"letsencrypt.host": "app1.acme.test", "letsencrypt.email": "app1@acme.test"})
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
