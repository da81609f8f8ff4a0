"""HTTP/2 from clients (issue 18): ALPN h2 on the TLS port, h2c with prior knowledge on the
plain port, streams forwarded to HTTP/1.1 upstreams through the same route table,
features, limits and pool; curl and the h2 library as clients."""
from __future__ import annotations

import json
import shutil
import signal
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
        self.flush()
        if body is not None:
            self.send_body(sid, body, end)
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True):
        """DATA as the server's windows allow (reading its WINDOW_UPDATEs while blocked)."""
        while body:
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(body))
            if room <= 0:
                assert self.pump(), "closed while sending a body"
                continue
            self.h2.send_data(sid, body[:room])
            body = body[room:]
            self.flush()
        if end:
            self.h2.end_stream(sid)
            self.flush()

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


def test_h2c_with_prior_knowledge_on_the_plain_port(proxy, dns, replicas):
    register(proxy, dns, replicas[0], serviceName="h2cplain")
    r = curl("--http2-prior-knowledge", "-i", f"http://127.0.0.1:{proxy.http_port}/h2cplain/hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"HTTP/2 200"), r.stdout[:200]
    assert r.stdout.endswith(b"hello, world!")
    assert replicas[0].requests("/h2cplain/hello")[-1].header("X-Forwarded-Proto") == ["http"]
    # HTTP/1.1 on the same port is untouched, a request starting with P included
    st, _, body = proxy.get("/h2cplain/upload", method="POST", body=b"abc")
    assert st == 200 and json.loads(body)["len"] == 3


def test_streams_multiplex_bodies_both_ways_and_share_the_upstream_pool(proxy, dns, replicas, ca):
    up = replicas[0]
    register(proxy, dns, up, serviceName="h2mux")
    c = H2Client(proxy.tls_port, ca=ca)
    body = bytes(range(256)) * 1024  # 256 KiB: several windows' worth, flow control both ways
    sids = [c.request("/h2mux/upload", "POST", body=body) for _ in range(3)]
    sids += [c.request("/h2mux/bytes/300000"), c.request("/h2mux/chunked/100000")]
    results = [c.response(sid) for sid in sids]
    for r in results[:3]:
        assert r["status"] == 200 and json.loads(r["body"])["len"] == len(body)
    assert results[3]["status"] == 200 and len(results[3]["body"]) == 300000
    assert results[4]["status"] == 200 and len(results[4]["body"]) == 100000
    # no chunked body without content-length reached the upstream unframed: h11 parsed each
    uploads = up.requests("/h2mux/upload")
    assert [r.header("Transfer-Encoding") for r in uploads] == [["chunked"]] * 3
    c.close()


def test_fields_map_to_http11_and_back(proxy, dns, replicas, ca):
    up = replicas[0]
    register(proxy, dns, up, serviceName="h2fields")
    c = H2Client(proxy.tls_port, ca=ca)
    sid = c.request("/h2fields/echo?q=1", headers=[("cookie", "a=1"), ("cookie", "b=2"), ("x-one", "1"),
                                                   ("te", "trailers")])
    r = c.response(sid)
    assert r["status"] == 200
    rec = up.requests("/h2fields/echo")[-1]
    assert rec.target == "/h2fields/echo?q=1"
    assert rec.header("Cookie") == ["a=1; b=2"]  # crumbs joined (RFC 9113 §8.2.3)
    assert rec.header("Host") == [c.host]  # :authority
    assert rec.header("X-One") == ["1"]
    assert not rec.header("TE")
    # the response carries no connection-specific field
    assert b"connection" not in r["headers"] and b"keep-alive" not in r["headers"]
    for path, status in (("/h2fields/status/204", 204), ("/h2fields/status/304", 304)):
        r = c.response(c.request(path))
        assert (r["status"], r["body"], r["ended"]) == (status, b"", True)
    r = c.response(c.request("/h2fields/bytes/1000", method="HEAD"))
    assert (r["status"], r["body"], r["headers"][b"content-length"]) == (200, b"", b"1000")
    c.close()


def test_connection_specific_fields_are_refused(proxy, dns, replicas, ca):
    register(proxy, dns, replicas[0], serviceName="h2conn")
    for field in (("connection", "keep-alive"), ("transfer-encoding", "chunked"), ("upgrade", "websocket")):
        c = H2Client(proxy.tls_port, ca=ca)
        c.h2.config.validate_outbound_headers = c.h2.config.normalize_outbound_headers = False
        sid = c.request("/h2conn/hello", headers=[field])
        r = c.response(sid)
        assert r["status"] is None and (r["reset"] is not None or c.goaway() is not None), field
        c.close()
    assert not replicas[0].requests("/h2conn/")


def test_features_and_limits_apply_per_stream(proxy, dns, replicas, ca):
    up = replicas[0]
    register(proxy, dns, up, serviceName="h2feat", users="alice:secret", addResHeader="X-Via h2")
    c = H2Client(proxy.tls_port, ca=ca)
    assert c.response(c.request("/h2feat/hello"))["status"] == 401
    auth = [("authorization", "Basic YWxpY2U6c2VjcmV0")]
    r = c.response(c.request("/h2feat/hello", headers=auth))
    assert (r["status"], r["headers"].get(b"x-via"), r["body"]) == (200, b"h2", b"hello, world!")
    assert c.response(c.request("/nowhere"))["status"] == 503
    assert c.response(c.request("/h2feat/" + "a" * 9000, headers=auth))["status"] == 414  # MAX_URI_SIZE
    big = [(f"x-h{i}", "v") for i in range(120)]
    assert c.response(c.request("/h2feat/hello", headers=auth + big))["status"] == 431  # MAX_HEADERS
    assert c.response(c.request("/h2feat/hello", headers=auth))["status"] == 200  # the connection lives on
    c.close()


def test_trailers_from_an_http11_upstream_reach_the_client(proxy, dns, ca):
    from support.rawupstream import RawUpstream
    raw = RawUpstream("127.0.0.43", answer=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                           b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n")
    try:
        register(proxy, dns, raw, serviceName="h2trail")
        c = H2Client(proxy.tls_port, ca=ca)
        r = c.response(c.request("/h2trail/x"))
        assert (r["status"], r["body"], r["trailers"]) == (200, b"hello", {b"x-checksum": b"abc"})
        c.close()
    finally:
        raw.close()


def test_a_close_delimited_body_ends_the_stream_cleanly_and_a_reset_one_resets_it(proxy, dns, ca):
    from support.rawupstream import RawUpstream, reset
    clean = RawUpstream("127.0.0.47", answer=b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    clean.after = lambda conn: None  # (the handler closes the socket: a clean FIN ends the body)
    cut = RawUpstream("127.0.0.48", answer=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
    cut.after = reset
    try:
        register(proxy, dns, clean, serviceName="h2eof")
        register(proxy, dns, cut, serviceName="h2cut")
        c = H2Client(proxy.tls_port, ca=ca)
        r = c.response(c.request("/h2eof/x"))
        assert (r["status"], r["body"], r["ended"]) == (200, b"until the end", True)
        r = c.response(c.request("/h2cut/x"))
        assert r["status"] == 200 and r["reset"] is not None and not r["ended"]  # never a clean end
        assert c.response(c.request("/h2eof/again"))["ended"]  # the connection serves on
        c.close()
    finally:
        clean.close()
        cut.close()


def test_websocket_over_http11_on_the_same_tls_port(proxy, dns, ca):
    import asyncio
    import websockets

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def run():
        server = await websockets.serve(echo, "127.0.0.44", 0)
        port = server.sockets[0].getsockname()[1]
        dns.set_service("h2ws", "127.0.0.44")
        await asyncio.to_thread(proxy.reconfigure, serviceName="h2ws", servicePath="/h2ws", port=port)
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        async with websockets.connect(f"wss://site.test:{proxy.tls_port}/h2ws", ssl=ctx,
                                      host="127.0.0.1", port=proxy.tls_port) as ws:
            await ws.send("over http/1.1")
            assert await ws.recv() == "over http/1.1"
        server.close()
    asyncio.run(run())


def test_enable_h2_false_offers_http11_only(make_pyroute, ca, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    leaf = ca.issue_cert("site.test")
    (certs / "s.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes())
    tls_port = free_port()
    make_pyroute(DEFAULT_PORTS=f"{free_port()},{tls_port}:ssl", CERTS_DIR=str(certs), ENABLE_H2="false")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls_port), timeout=5), server_hostname="site.test") as s:
        assert s.selected_alpn_protocol() == "http/1.1"


@pytest.mark.skipif(not shutil.which("nghttp"), reason="nghttp (nghttp2-client) not installed")
def test_sigterm_sends_goaway_and_lets_streams_in_flight_finish(make_pyroute, dns, replicas):
    p = make_pyroute(H2C="true", DRAIN_GRACE="10")
    register(p, dns, replicas[0], serviceName="h2drain")
    client = subprocess.Popen(["nghttp", "-nv", f"http://127.0.0.1:{p.http_port}/h2drain/slow/1.5"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(lambda: replicas[0].requests("/h2drain/slow"), what="request upstream")
    p.proc.send_signal(signal.SIGTERM)
    out, _ = client.communicate(timeout=15)
    text = out.decode()
    assert client.returncode == 0, text
    import re
    sent = re.search(r"send HEADERS frame <[^>]*stream_id=(\d+)>", text).group(1)
    assert re.search(rf"recv GOAWAY frame .*\n.*last_stream_id={sent}, error_code=NO_ERROR", text), text
    assert ":status: 200" in text  # the stream in flight finished after the GOAWAY
    assert text.index("recv GOAWAY frame") < text.index(":status: 200")
    assert p.proc.wait(10) == 0


def test_upstream_proto_survives_a_restart(make_pyroute, dns, replicas, tmp_path):
    state = tmp_path / "state"
    p = make_pyroute(STATE_DIR=str(state))
    p.reconfigure(serviceName="h2kept", servicePath="/h2kept", port="50051", upstreamProto="h2c")
    p.stop()
    p = make_pyroute(STATE_DIR=str(state))
    st, body = p.admin("config", {"type": "json"})
    assert st == 200 and '"UpstreamProto": "h2c"' in json.dumps(body)


def test_http2_with_two_workers(make_pyroute, dns, replicas, ca, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    leaf = ca.issue_cert("site.test")
    (certs / "s.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes())
    tls_port, http_port = free_port(), free_port()
    p = make_pyroute(DEFAULT_PORTS=f"{http_port},{tls_port}:ssl", CERTS_DIR=str(certs), WORKERS="2", H2C="true")
    register(p, dns, replicas[1], serviceName="h2workers")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for url, flag in ((f"https://site.test:{tls_port}/h2workers/hello", "--http2"),
                      (f"http://127.0.0.1:{http_port}/h2workers/hello", "--http2-prior-knowledge")):
        for _ in range(4):  # (connections land on either worker)
            r = curl(flag, "--cacert", str(tmp_path / "ca.pem"), "-i", "--resolve", f"site.test:{tls_port}:127.0.0.1",
                     url)
            assert r.returncode == 0 and r.stdout.startswith(b"HTTP/2 200"), (r.stdout[:100], r.stderr)
