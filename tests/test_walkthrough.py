"""The Docker Flow Proxy walkthrough: reconfigure go-demo, then curl the proxy."""
import shutil
import subprocess

import pytest


def test_go_demo_walkthrough_http_client(proxy, dns, replicas):
    up = replicas[0]
    dns.set_service("go-demo", up.ip)
    body = proxy.reconfigure(serviceName="go-demo", servicePath="/demo", port=up.port)
    assert body["Status"] == "OK" and body["ServiceName"] == "go-demo"
    st, headers, data = proxy.get("/demo/hello")
    assert (st, data) == (200, b"hello, world!")
    assert headers["X-Upstream"] == up.addr
    assert up.requests("/demo/hello")[-1].method == "GET"


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_go_demo_walkthrough_curl(proxy, dns, replicas):
    up = replicas[1]
    dns.set_service("go-demo-curl", up.ip)
    proxy.reconfigure(serviceName="go-demo-curl", servicePath="/demo", port=up.port)
    out = subprocess.run(["curl", "-sS", "-i", "--max-time", "10", proxy.url("/demo/hello")],
                         capture_output=True, timeout=15)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].startswith(b"HTTP/1.1 200"), head
    assert body == b"hello, world!"
    assert f"X-Upstream: {up.addr}".lower().encode() in head.lower()


def test_unknown_path_is_503_html(proxy):
    st, headers, body = proxy.get("/nothing/here")
    assert st == 503
    assert b"503 Service Unavailable" in body
    assert "html" in (headers.get("Content-Type") or "").lower()


def test_ping(proxy):
    st, body = proxy.admin("ping")
    assert st == 200 and body["Status"] == "OK"
