"""L4 modes and PROXY protocol: reqMode=tcp tunnels, reqMode=sni passthrough to a real
TLS server behind the proxy, and PROXY v1/v2 headers on accept-proxy listeners (HTTP
and TLS) reaching X-Forwarded-For."""
from __future__ import annotations

import hashlib
import socket
import ssl
import struct

import pytest
import trustme

from support.upstream import ThreadedTlsServer, free_port, generated_sha256, wait_until
from test_tls import TlsClient, client_context, pem

BACKEND_IP = "127.0.0.21"


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _closed_by_peer(sock: socket.socket, timeout: float = 10) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except (socket.timeout, TimeoutError):
        return False


def _read_hello(sock: socket.socket) -> bytes:
    """One keep-alive /hello response (its head and body may arrive in separate reads)."""
    data = b""
    while not data.endswith(b"hello, world!"):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def raw_http(sock: socket.socket, path: str, host: str = "l4.test") -> tuple[bytes, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body


# -- reqMode=tcp ---------------------------------------------------------------------------
def test_tcp_mode_forwards_raw_bytes_and_follows_services(proxy, dns, replicas):
    up = replicas[0]
    src = free_port()
    dns.set_service("l4-tcp", up.ip)
    proxy.reconfigure(serviceName="l4-tcp", reqMode="tcp", srcPort=src, port=up.port)
    wait_until(lambda: _connects(src), what="tcp listener open")
    with socket.create_connection(("127.0.0.1", src), timeout=10) as s:
        head, body = raw_http(s, "/hello")
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello, world!"
    rec = up.requests("/hello")[-1]
    assert rec.header("X-Forwarded-For") == []  # bytes pass untouched: no HTTP rewriting

    # 20 MB down through the tunnel, read in small steps (backpressure both ways)
    with socket.create_connection(("127.0.0.1", src), timeout=10) as s:
        s.sendall(b"GET /bytes/20000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        digest, seen, buf = hashlib.sha256(), 0, b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        buf = buf.partition(b"\r\n\r\n")[2]
        digest.update(buf)
        seen = len(buf)
        while chunk := s.recv(16384):
            digest.update(chunk)
            seen += len(chunk)
    assert seen == 20000000 and digest.hexdigest() == generated_sha256(20000000)

    st, body = proxy.admin("config", type="json")
    assert body["l4-tcp"]["ServiceDest"][0]["ReqMode"] == "tcp"
    proxy.remove("l4-tcp")
    wait_until(lambda: not _connects(src), what="tcp listener closed")


def test_tcp_mode_requires_src_port_and_port(proxy):
    st, body = proxy.admin("reconfigure", serviceName="l4-bad", reqMode="tcp", port="80")
    assert (st, body["Status"]) == (400, "NOK")
    st, body = proxy.admin("reconfigure", serviceName="l4-bad", reqMode="tcp", srcPort="9999")
    assert (st, body["Status"]) == (400, "NOK")
    st, body = proxy.admin("reconfigure", serviceName="l4-bad", reqMode="udp", srcPort="1", port="2")
    assert (st, body["Status"]) == (400, "NOK")


def test_unreachable_tcp_service_closes_only_its_connections(proxy, dns, replicas):
    up = replicas[1]
    good_src, dead_src = free_port(), free_port()
    dns.set_service("l4-good", up.ip)
    dns.set_service("l4-dead", "127.0.0.99")
    proxy.reconfigure(serviceName="l4-good", reqMode="tcp", srcPort=good_src, port=up.port)
    proxy.reconfigure(serviceName="l4-dead", reqMode="tcp", srcPort=dead_src, port=up.port)
    wait_until(lambda: _connects(good_src) and _connects(dead_src), what="tcp listeners open")
    with socket.create_connection(("127.0.0.1", good_src), timeout=10) as kept:
        kept.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_hello(kept).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", dead_src), timeout=10) as dead:
            assert _closed_by_peer(dead)  # closed as soon as the connect to the service fails
        kept.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")  # same tunnel still works
        assert _read_hello(kept).startswith(b"HTTP/1.1 200")


def test_idle_tunnel_closes_after_timeout_tunnel(proxy, dns, replicas):
    up = replicas[2]
    src = free_port()
    dns.set_service("l4-idle", up.ip)
    proxy.reconfigure(serviceName="l4-idle", reqMode="tcp", srcPort=src, port=up.port, timeoutTunnel="0.3")
    wait_until(lambda: _connects(src), what="tcp listener open")
    with socket.create_connection(("127.0.0.1", src), timeout=10) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_hello(s).startswith(b"HTTP/1.1 200")
        assert _closed_by_peer(s)


# -- reqMode=sni: a real TLS server behind ------------------------------------------------------
class TlsBackend(ThreadedTlsServer):
    """A TLS echo server with its own CA: a client that verifies against that CA proves the
    proxy passed the stream through instead of terminating it."""

    def __init__(self, names: list[str]):
        self.ca = trustme.CA()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*names).configure_cert(ctx)

        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(b"backend:" + data)
                await writer.drain()
            writer.close()

        super().__init__(echo, BACKEND_IP, ctx)


@pytest.fixture(scope="module")
def tls_backend():
    b = TlsBackend(["pass.test", "x.wild.test"])
    yield b
    b.close()


def _sni_roundtrip(port: int, name: str, ca: trustme.CA) -> bytes:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"ping")
            return tls.recv(100)


def test_sni_passthrough_routes_on_the_client_hello(proxy, dns, tls_backend):
    src = free_port()
    dns.set_service("l4-sni", BACKEND_IP)
    proxy.reconfigure(serviceName="l4-sni", reqMode="sni", srcPort=src, port=tls_backend.port,
                      servicePath="pass.test,*.wild.test")
    wait_until(lambda: _connects(src), what="sni listener open")
    assert _sni_roundtrip(src, "pass.test", tls_backend.ca) == b"backend:ping"
    assert _sni_roundtrip(src, "x.wild.test", tls_backend.ca) == b"backend:ping"
    # no matching service: closed without a byte
    ctx = client_context(tls_backend.ca)
    with socket.create_connection(("127.0.0.1", src), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            ctx.wrap_socket(raw, server_hostname="other.test")
    # not TLS at all: closed
    with socket.create_connection(("127.0.0.1", src), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: pass.test\r\n\r\n")
        assert s.recv(100) == b""


def test_service_domain_algo_req_ssl_sni_routes_tcp_by_the_client_hello(proxy, dns, tls_backend):
    """DFP's serviceDomainAlgo=req.ssl_sni on a tcp service: serviceDomain is matched against
    the ClientHello's name, as an sni service's servicePath is (issue 17)."""
    src = free_port()
    dns.set_service("l4-sslsni", BACKEND_IP)
    proxy.reconfigure(serviceName="l4-sslsni", reqMode="tcp", srcPort=src, port=tls_backend.port,
                      serviceDomain="pass.test", serviceDomainAlgo="req.ssl_sni")
    wait_until(lambda: _connects(src), what="sni listener open")
    assert _sni_roundtrip(src, "pass.test", tls_backend.ca) == b"backend:ping"
    ctx = client_context(tls_backend.ca)
    with socket.create_connection(("127.0.0.1", src), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            ctx.wrap_socket(raw, server_hostname="other.test")
    status, body = proxy.admin("config", {"type": "json"})
    assert body["l4-sslsni"]["ServiceDomainAlgo"] == "req.ssl_sni"
    # an http service never sees a ClientHello: refused, naming what to use instead
    status, body = proxy.admin("reconfigure", {"serviceName": "l4-sslsni-http", "port": "80",
                                               "serviceDomain": "pass.test", "serviceDomainAlgo": "req.ssl_sni"})
    assert status == 400 and "req.ssl_sni" in body["Message"] and "hdr(host)" in body["Message"], body


def test_client_hello_parser_needs_whole_hello():
    from pyroute.dataplane.l4 import NotTls, client_hello_sni

    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="split.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    for cut in (1, 4, 5, 40, len(hello) - 1):
        assert client_hello_sni(hello[:cut]) is None
    assert client_hello_sni(hello) == "split.example.test"
    # the same hello split across two TLS records
    body = hello[5:]
    split = hello[:1] + hello[1:3] + struct.pack("!H", 50) + body[:50] + hello[:1] + hello[1:3] \
        + struct.pack("!H", len(body) - 50) + body[50:]
    assert client_hello_sni(split) == "split.example.test"
    with pytest.raises(NotTls):
        client_hello_sni(b"GET / HTTP/1.1\r\n\r\n")


def test_client_hello_alpn_lists_the_offered_protocols():
    """What the TLS acceptor checks for ACME's TLS-ALPN-01 (exactly acme-tls/1 offered)."""
    from pyroute.dataplane.l4 import client_hello_alpn

    def hello(protocols):
        ctx = ssl.create_default_context()
        if protocols:
            ctx.set_alpn_protocols(protocols)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname="alpn.example.test")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        return outgoing.read()

    assert client_hello_alpn(hello(["acme-tls/1"])) == (b"acme-tls/1",)
    assert client_hello_alpn(hello(["h2", "http/1.1"])) == (b"h2", b"http/1.1")
    assert client_hello_alpn(hello([])) == ()
    assert client_hello_alpn(hello(["acme-tls/1"])[:40]) == ()  # incomplete: nothing offered yet


# -- PROXY protocol ----------------------------------------------------------------------------
TRUSTED_SOURCE = "127.0.0.2"


@pytest.fixture
def pp_proxy(make_pyroute, dns, replicas, tmp_path):
    ca = trustme.CA()
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "pp.pem").write_bytes(pem(ca.issue_cert("pp.test")))
    http_port, tls_port = free_port(), free_port()
    p = make_pyroute(DEFAULT_PORTS=f"{http_port} accept-proxy,{tls_port}:ssl accept-proxy",
                     PROXY_PROTOCOL_TRUSTED=f"{TRUSTED_SOURCE}/32", CERTS_DIR=str(tmp_path / "certs"))
    p.http_port, p.tls_port, p.ca = http_port, tls_port, ca
    up = replicas[0]
    dns.set_service("pp-svc", up.ip)
    p.reconfigure(serviceName="pp-svc", servicePath="/pp", port=up.port)
    return p, up


def v2_header(src: str, dst: str, sport: int = 5555, dport: int = 443) -> bytes:
    import ipaddress
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if a.version == 4 else 0x21
    addrs = a.packed + b.packed + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(addrs)) + addrs


def test_proxy_protocol_v1_and_v2_on_http(pp_proxy):
    p, up = pp_proxy
    for header, expected in ((b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n", "203.0.113.7"),
                             (v2_header("2001:db8::5", "2001:db8::1"), "2001:db8::5"),
                             (v2_header("198.51.100.9", "10.0.0.1"), "198.51.100.9")):
        with socket.create_connection(("127.0.0.1", p.http_port), timeout=10,
                                      source_address=(TRUSTED_SOURCE, 0)) as s:
            s.sendall(header)
            head, body = raw_http(s, f"/pp/{expected}")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert up.requests(f"/pp/{expected}")[-1].header("X-Forwarded-For") == [expected]


def test_proxy_protocol_on_tls(pp_proxy):
    p, up = pp_proxy
    raw = socket.create_connection(("127.0.0.1", p.tls_port), timeout=10, source_address=(TRUSTED_SOURCE, 0))
    raw.sendall(v2_header("192.0.2.33", "10.0.0.1"))
    tls = client_context(p.ca).wrap_socket(raw, server_hostname="pp.test")
    head, body = raw_http(tls, "/pp/tls")
    tls.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    rec = up.requests("/pp/tls")[-1]
    assert rec.header("X-Forwarded-For") == ["192.0.2.33"]
    assert rec.header("X-Forwarded-Proto") == ["https"]


def test_proxy_protocol_only_from_trusted_peers(pp_proxy):
    p, up = pp_proxy
    # an untrusted peer is served with its own address (its requests need no header) ...
    st, _, _ = p.get("/pp/untrusted")
    assert st == 200
    assert up.requests("/pp/untrusted")[-1].header("X-Forwarded-For") == ["127.0.0.1"]
    # ... and a header from it is not believed: it is a bad request
    with socket.create_connection(("127.0.0.1", p.http_port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 203.0.113.8 10.0.0.1 5555 80\r\n")
        head, _ = raw_http(s, "/pp/spoofed")
    assert head.startswith(b"HTTP/1.1 400")
    assert not up.requests("/pp/spoofed")
    # a trusted peer must send a valid header
    with socket.create_connection(("127.0.0.1", p.http_port), timeout=10,
                                  source_address=(TRUSTED_SOURCE, 0)) as s:
        s.sendall(b"GET /pp/noheader HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed_by_peer(s)
    assert not up.requests("/pp/noheader")
    # keep-alive TLS from an untrusted peer works as usual
    client = TlsClient(p.tls_port, "pp.test", p.ca)
    assert client.get("/pp/tls-untrusted")[0] == 200
    client.close()


def test_proxy_header_parser():
    from pyroute.dataplane.proxyproto import BadHeader, parse_header

    v1 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\nGET"
    assert parse_header(v1) == (len(v1) - 3, "2001:db8::1")
    assert parse_header(v1[:10]) is None
    assert parse_header(b"PROXY UNKNOWN\r\n") == (15, None)
    v2 = v2_header("192.0.2.1", "192.0.2.2")
    assert parse_header(v2[:15]) is None and parse_header(v2) == (len(v2), "192.0.2.1")
    local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + b"\x00\x00"
    assert parse_header(local) == (16, None)
    for bad in (b"PROXY TCP4 not-an-ip 1.2.3.4 1 2\r\n", b"PROXY TCP4 ::1 ::1 1 2\r\n", b"HELLO",
                b"PROXY " + b"x" * 120):
        with pytest.raises(BadHeader):
            parse_header(bad)


def _handshake_in_pieces(port: int, name: str, ca: trustme.CA) -> bytes:
    """A TLS client whose ClientHello leaves in two writes; returns the echo of b"ping"."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        first = True
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = outgoing.read()
                if first:
                    s.sendall(data[:60])
                    s.sendall(data[60:])
                    first = False
                elif data:
                    s.sendall(data)
                incoming.write(s.recv(65536) or b"")
        obj.write(b"ping")
        s.sendall(outgoing.read())
        while True:
            try:
                return obj.read(100)
            except ssl.SSLWantReadError:
                incoming.write(s.recv(65536))


def test_sni_services_share_the_proxy_tls_port(make_pyroute, dns, tls_backend, tmp_path):
    """An sni service on one of the proxy's own TLS ports: its names pass through, every
    other name is terminated by the proxy with its own certificate."""
    own_ca = trustme.CA()
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "own.pem").write_bytes(pem(own_ca.issue_cert("own.test")))
    http_port, tls_port = free_port(), free_port()
    p = make_pyroute(DEFAULT_PORTS=f"{http_port},{tls_port}:ssl", CERTS_DIR=str(tmp_path / "certs"))
    dns.set_service("l4-shared", BACKEND_IP)
    p.reconfigure(serviceName="l4-shared", reqMode="sni", srcPort=tls_port, port=tls_backend.port,
                  servicePath="pass.test")
    assert _sni_roundtrip(tls_port, "pass.test", tls_backend.ca) == b"backend:ping"
    assert _handshake_in_pieces(tls_port, "pass.test", tls_backend.ca) == b"backend:ping"
    ctx = client_context(own_ca)
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="own.test") as tls:  # verified against the proxy's CA
            head, _ = raw_http(tls, "/nothing-routed", host="own.test")
    assert head.startswith(b"HTTP/1.1 503")  # terminated here: no http route -> our 503
    p.remove("l4-shared")
    ctx = client_context(own_ca)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="pass.test") as tls:  # now the proxy's certificate
            assert tls.getpeercert()["subjectAltName"] == (("DNS", "own.test"),)


def test_silent_sni_client_closes_after_timeout_client(proxy, dns, tls_backend):
    src = free_port()
    dns.set_service("l4-silent", BACKEND_IP)
    proxy.reconfigure(serviceName="l4-silent", reqMode="sni", srcPort=src, port=tls_backend.port,
                      servicePath="pass.test", timeoutClient="0.3")
    wait_until(lambda: _connects(src), what="sni listener open")
    with socket.create_connection(("127.0.0.1", src), timeout=10) as s:
        s.sendall(b"\x16\x03\x01")  # the start of a record, never finished
        assert _closed_by_peer(s)


# -- MAXCONN and MAXCONN_PER_IP count every tunnel ---------------------------------------------
def _tcp_tunnel(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A tcp tunnel proven open (accepted and connected): one keep-alive /hello through it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_hello(s).startswith(b"HTTP/1.1 200")
    return s


def _unanswered(sock: socket.socket) -> bool:
    """Nothing comes back on `sock` for 2 s: it waits in the kernel's backlog, not accepted."""
    sock.settimeout(2)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (socket.timeout, TimeoutError):
        return True
    return False


def test_maxconn_counts_tcp_tunnels_and_pauses_the_tcp_listener(make_pyroute, dns, replicas):
    """MAXCONN counts client sockets "tunnels included" (ARCHITECTURE.md): reqMode=tcp
    tunnels fill it for HTTP clients, HTTP clients fill it for tcp tunnels, and at the
    limit the srcPort listener waits like the HTTP port; a close lets the waiting one in."""
    up = replicas[0]
    p = make_pyroute(MAXCONN="2")
    src = free_port()
    dns.set_service("l4-mc", up.ip)
    dns.set_service("l4-mc-http", up.ip)
    p.reconfigure(serviceName="l4-mc", reqMode="tcp", srcPort=src, port=up.port)
    p.reconfigure(serviceName="l4-mc-http", servicePath="/hello", port=up.port)
    wait_until(lambda: _connects(src), what="tcp listener open")  # (each probe closes again)

    first, second = _tcp_tunnel(src), _tcp_tunnel(src)
    wait_until(lambda: "MAXCONN 2 reached" in p.log(), what="the MAXCONN log line")
    waiting = p.raw(timeout=10)  # two tunnels fill it: an HTTP client waits in the backlog
    waiting.request("GET", "/hello", [("Host", "a")])
    assert _unanswered(waiting.sock)
    first.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")  # the open tunnels keep working
    assert _read_hello(first).startswith(b"HTTP/1.1 200")
    first.close()  # room again: the waiting client is accepted and answered
    waiting.sock.settimeout(10)
    assert waiting.read_response()[0].status_code == 200

    # now one tunnel and one HTTP client fill it: a new tcp connection waits too
    tcp_waiting = socket.create_connection(("127.0.0.1", src), timeout=10)
    tcp_waiting.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _unanswered(tcp_waiting)
    waiting.close()
    tcp_waiting.settimeout(10)
    assert _read_hello(tcp_waiting).startswith(b"HTTP/1.1 200")
    second.close()
    tcp_waiting.close()


def test_maxconn_counts_sni_tunnels_and_pauses_the_sni_listener(make_pyroute, dns, replicas, tls_backend):
    up = replicas[0]
    p = make_pyroute(MAXCONN="1")
    src = free_port()
    dns.set_service("l4-mc-sni", BACKEND_IP)
    dns.set_service("l4-mc-sni-http", up.ip)
    p.reconfigure(serviceName="l4-mc-sni", reqMode="sni", srcPort=src, port=tls_backend.port,
                  servicePath="pass.test")
    p.reconfigure(serviceName="l4-mc-sni-http", servicePath="/hello", port=up.port)
    wait_until(lambda: _connects(src), what="sni listener open")

    ctx = client_context(tls_backend.ca)
    tunnel = ctx.wrap_socket(socket.create_connection(("127.0.0.1", src), timeout=10), server_hostname="pass.test")
    tunnel.sendall(b"ping")
    assert tunnel.recv(100) == b"backend:ping"
    waiting = p.raw(timeout=10)  # the sni tunnel fills MAXCONN=1: an HTTP client waits
    waiting.request("GET", "/hello", [("Host", "a")])
    assert _unanswered(waiting.sock)
    tunnel.close()
    waiting.sock.settimeout(10)
    assert waiting.read_response()[0].status_code == 200

    sni_waiting = socket.create_connection(("127.0.0.1", src), timeout=10)  # the HTTP client fills it now
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="pass.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sni_waiting.sendall(outgoing.read())  # the ClientHello: no ServerHello while it waits
    assert _unanswered(sni_waiting)
    waiting.close()
    sni_waiting.settimeout(10)
    assert sni_waiting.recv(100)  # accepted: the backend's ServerHello comes through
    sni_waiting.close()


def test_maxconn_per_ip_counts_tcp_tunnels(make_pyroute, dns, replicas):
    """MAXCONN_PER_IP counts one address's tunnels with its HTTP connections: over the cap
    a new connection of either kind is closed at once; other addresses are not affected."""
    up = replicas[0]
    p = make_pyroute(MAXCONN_PER_IP="2")
    src = free_port()
    dns.set_service("l4-ip", up.ip)
    dns.set_service("l4-ip-http", up.ip)
    p.reconfigure(serviceName="l4-ip", reqMode="tcp", srcPort=src, port=up.port)
    p.reconfigure(serviceName="l4-ip-http", servicePath="/hello", port=up.port)
    wait_until(lambda: _connects(src), what="tcp listener open")
    first, second = _tcp_tunnel(src), _tcp_tunnel(src)
    with socket.create_connection(("127.0.0.1", src), timeout=10) as third:
        assert _closed_by_peer(third)  # a third tunnel from 127.0.0.1: closed at once
    assert not up.requests("/hello/over-the-cap")
    with socket.create_connection(("127.0.0.1", p.http_port), timeout=10) as http:
        http.sendall(b"GET /hello/over-the-cap HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _closed_by_peer(http)  # and so is an HTTP connection from it
    assert not up.requests("/hello/over-the-cap")
    _tcp_tunnel(src, "127.0.0.2").close()  # another address is not affected
    first.close()  # room again for 127.0.0.1 once pyroute saw the close

    def admitted() -> bool:
        with socket.create_connection(("127.0.0.1", src), timeout=10) as s:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            try:
                return s.recv(100).startswith(b"HTTP/1.1 200")
            except ConnectionResetError:  # refused: pyroute has not seen the close yet
                return False

    wait_until(admitted, timeout=5, what="a tunnel from 127.0.0.1 once one of its two closed")
    second.close()
