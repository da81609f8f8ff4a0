"""HTTP/2 from clients (issue 18): ALPN h2 on the TLS port, h2c with prior knowledge on the
plain port, streams forwarded to HTTP/1.1 upstreams through the same route table,
features, limits and pool; curl and the h2 library as clients."""
from __future__ import annotations

import json
import socket
import ssl
import subprocess

import h2.config
import h2.connection
import h2.events
import pytest
import trustme

from support.proxy import register
from support.upstream import free_port, wait_until
from conftest import start_pyroute, stop_pyroute


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def h2proxy(dns, ca, tmp_path_factory):
    """One pyroute with a plain port (H2C=true) and a TLS port holding a certificate for *.test."""
    certs = tmp_path_factory.mktemp("certs")
    leaf = ca.issue_cert("site.test", "*.test")
    (certs / "site.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes())
    http_port, tls_port = free_port(), free_port()
    p = start_pyroute(dns, DEFAULT_PORTS=f"{http_port},{tls_port}:ssl", CERTS_DIR=str(certs),
                      SECRETS_DIR=str(tmp_path_factory.mktemp("secrets")), H2C="true", TIMEOUT_CLIENT="2")
    p.http_port, p.tls_port = http_port, tls_port
    yield p
    stop_pyroute(p)


@pytest.fixture
def proxy(h2proxy):
    yield h2proxy
    alive = h2proxy.alive()
    h2proxy.remove_all()
    assert alive, f"pyroute died during the test:\n{h2proxy.log()}"


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "15", *args], capture_output=True, timeout=timeout)


class H2Client:
    """A raw HTTP/2 client on the h2 library: TLS with ALPN h2, or h2c (prior knowledge)."""

    def __init__(self, port: int, tls: bool = True, ca: trustme.CA | None = None, host: str = "site.test",
                 settings: dict | None = None):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls:
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            raw = ctx.wrap_socket(raw, server_hostname=host)
            assert raw.selected_alpn_protocol() == "h2"
        self.sock = raw
        self.host = host
        self.scheme = "https" if tls else "http"
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.events: list = []
        self.closed = False
        self.flush()

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, method: str = "GET", headers: list | None = None, body: bytes | None = None,
                end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", self.scheme), (":authority", self.host), (":path", path),
                  *(headers or [])]
        self.h2.send_headers(sid, [(k.encode(), v.encode()) for k, v in fields], end_stream=end and body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def pump(self) -> bool:
        """One read; False when the server closed the connection."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, socket.timeout):
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.h2.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()
        return True

    def response(self, sid: int) -> dict:
        """Read until stream `sid` ends or is reset: status, headers, body, trailers, reset code."""
        while True:
            result = self.collected(sid)
            if result["ended"] or result["reset"] is not None:
                return result
            if not self.pump():
                result["closed"] = True
                return result

    def collected(self, sid: int) -> dict:
        result = {"status": None, "headers": {}, "body": b"", "trailers": {}, "ended": False, "reset": None,
                  "informational": []}
        for event in self.events:
            if getattr(event, "stream_id", None) != sid:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                fields = dict(event.headers)
                result["status"] = int(fields[b":status"])
                result["headers"] = fields
            elif isinstance(event, h2.events.InformationalResponseReceived):
                result["informational"].append(int(dict(event.headers)[b":status"]))
            elif isinstance(event, h2.events.DataReceived):
                result["body"] += event.data
            elif isinstance(event, h2.events.TrailersReceived):
                result["trailers"] = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                result["ended"] = True
            elif isinstance(event, h2.events.StreamReset):
                result["reset"] = event.error_code
        return result

    def goaway(self):
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def close(self):
        self.sock.close()


def test_curl_http2_over_tls_gets_http2_200_from_an_http11_upstream(proxy, dns, replicas, ca, tmp_path):
    up = replicas[0]
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    register(proxy, dns, up, serviceName="h2curl")
    r = curl("--http2", "--cacert", str(bundle), "-i", "--resolve", f"site.test:{proxy.tls_port}:127.0.0.1",
             f"https://site.test:{proxy.tls_port}/h2curl/hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"HTTP/2 200"), r.stdout[:200]
    assert r.stdout.endswith(b"hello, world!")
    rec = up.requests("/h2curl/hello")[-1]
    assert rec.header("X-Forwarded-Proto") == ["https"]
    assert rec.header("Host") == [f"site.test:{proxy.tls_port}"]
