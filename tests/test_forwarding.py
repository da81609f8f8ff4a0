"""HTTP/1.x forwarding semantics, checked on both wires: the client side parsed strictly
by h11 (H11Client) or http.client, the upstream side recorded by the h11 upstreams."""
import hashlib
import json
import socket

import pytest

from support.proxy import hdr
from support.upstream import generated_sha256


@pytest.fixture
def up(proxy, dns, replicas):
    u = replicas[0]
    dns.set_service("fw", u.ip)
    proxy.reconfigure(serviceName="fw", servicePath="/fw", port=u.port)
    return u


H = [("Host", "fw.test")]


def test_keep_alive_many_requests_one_connection(proxy, up):
    with proxy.raw() as c:
        for i in range(50):
            c.request("GET", f"/fw/echo?i={i}", H)
            resp, body = c.read_response()
            assert resp.status_code == 200
            assert json.loads(body)["target"] == f"/fw/echo?i={i}"
    got = up.requests("/fw/echo?i=")
    assert len(got) == 50
    # upstream connections are kept alive and reused too
    assert len({r.conn_id for r in got}) <= 2, sorted({r.conn_id for r in got})


def test_pipelined_requests_answered_in_order(proxy, up):
    with proxy.raw() as c:
        reqs = [("GET", "/fw/echo?n=1", b""), ("POST", "/fw/upload", b"x" * 1000),
                ("HEAD", "/fw/bytes/77", b""), ("GET", "/fw/hello", b"")]
        wire = b""
        for m, t, b in reqs:
            hs = H + ([("Content-Length", str(len(b)))] if b else [])
            wire += c.request_bytes(m, t, hs, b)
        c.send_raw(wire)  # all requests in a single write
        out = []
        for m, t, b in reqs:
            hs = H + ([("Content-Length", str(len(b)))] if b else [])
            c.expect(m, t, hs, b)
            out.append(c.read_response())
    assert [r.status_code for r, _ in out] == [200, 200, 200, 200]
    assert json.loads(out[0][1])["target"] == "/fw/echo?n=1"
    assert json.loads(out[1][1])["len"] == 1000
    assert out[2][1] == b"" and hdr(out[2][0], "content-length") == "77"
    assert out[3][1] == b"hello, world!"


def _http10(proxy, request: bytes) -> bytes:
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10)
    try:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):   # HTTP/1.0 without keep-alive: the proxy closes
            data += chunk
    finally:
        s.close()
    return data


@pytest.mark.parametrize("host", [b"Host: fw.test\r\n", b""], ids=["with-host", "without-host"])
def test_http10_client(proxy, up, host):
    # HTTP/1.0 does not require Host; whatever pyroute sends upstream must still be valid
    data = _http10(proxy, b"GET /fw/hello HTTP/1.0\r\n" + host + b"\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0]
    assert status.startswith(b"HTTP/1.") and b" 200 " in status + b" ", head
    assert b"transfer-encoding: chunked" not in head.lower()   # not allowed to a 1.0 client
    assert body == b"hello, world!"


def test_http10_client_keep_alive(proxy, up):
    with proxy.raw() as c:
        for _ in range(3):
            c.send_raw(b"GET /fw/hello HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            c.expect("GET", "/fw/hello", [("Host", "x"), ("Connection", "keep-alive")])
            resp, body = c.read_response()
            assert resp.status_code == 200 and body == b"hello, world!"


@pytest.mark.parametrize("target,status", [("/fw/bytes/1000", 200), ("/fw/status/204", 204),
                                           ("/fw/status/304", 304)])
def test_bodyless_responses_then_keep_alive(proxy, up, target, status):
    method = "HEAD" if "bytes" in target else "GET"
    with proxy.raw() as c:
        c.request(method, target, H)
        resp, body = c.read_response()
        assert resp.status_code == status and body == b""
        # any stray body byte would corrupt the next response on this connection
        c.request("GET", "/fw/hello", H)
        resp, body = c.read_response()
        assert resp.status_code == 200 and body == b"hello, world!"


def test_status_codes_passed_through(proxy, up):
    for code in (201, 404, 418, 500, 503):
        st, h, body = proxy.get(f"/fw/status/{code}")
        assert st == code and body == f"status {code}".encode()
        assert h["X-Upstream"] == up.addr


def test_expect_100_continue(proxy, up):
    body = b"z" * 5000
    headers = H + [("Content-Length", str(len(body))), ("Expect", "100-continue")]
    with proxy.raw() as c:
        c.send_raw(c.request_bytes("POST", "/fw/upload", headers))   # head only
        c.expect("POST", "/fw/upload", headers, body)
        info = []
        ev = c.next_event()   # must be the 100 before we send anything more (socket timeout 10 s)
        info.append(ev)
        assert type(ev).__name__ == "InformationalResponse" and ev.status_code == 100, ev
        c.send_raw(body)
        resp, data = c.read_response()
    assert resp.status_code == 200
    assert json.loads(data) == {"len": 5000, "sha256": hashlib.sha256(body).hexdigest(), "upstream": up.addr}


def test_hop_by_hop_removed_and_forwarded_headers(proxy, up):
    headers = [
        ("Host", "my.host.test:1234"),
        ("Connection", "keep-alive, X-Drop-Me"),
        ("X-Drop-Me", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Whatever"),
        ("Upgrade", "foo/1"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Custom", "kept"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
        ("Authorization", "Bearer end-to-end"),
    ]
    with proxy.raw() as c:
        c.request("GET", "/fw/echo?q=1&r=%20x", headers)
        resp, body = c.read_response()
    assert resp.status_code == 200
    rec = up.requests("/fw/echo?q=1")[-1]
    names = rec.header_names()
    for gone in ("x-drop-me", "keep-alive", "te", "trailer", "upgrade", "proxy-connection",
                 "proxy-authorization"):
        assert gone not in names, (gone, rec.headers)
    for v in rec.header("connection"):
        assert "x-drop-me" not in v.lower()
    assert rec.target == "/fw/echo?q=1&r=%20x"
    assert rec.header("host") == ["my.host.test:1234"]
    assert rec.header("x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    assert rec.header("x-forwarded-proto") == ["http"]
    assert rec.header("x-custom") == ["kept"]
    assert rec.header("x-multi") == ["a", "b"]
    assert rec.header("authorization") == ["Bearer end-to-end"]


def test_x_forwarded_for_added_when_absent(proxy, up):
    st, _, body = proxy.get("/fw/echo")
    assert st == 200
    rec = up.requests("/fw/echo")[-1]
    assert rec.header("x-forwarded-for") == ["127.0.0.1"]
    assert rec.header("x-forwarded-proto") == ["http"]


def test_client_forwarded_proto_passes_on_plain_http_as_in_dfp(proxy, up):
    """DFP sets X-Forwarded-Proto only over TLS (`add-header ... https if { ssl_fc }`) and passes a
    plain-HTTP client's value on (TLS ended by a balancer in front); TRUSTED_PROXIES narrows who
    may (test_dfp_parity.py)."""
    st, _, _ = proxy.get("/fw/echo?lb", headers={"X-Forwarded-Proto": "https"})
    assert st == 200
    assert up.requests("/fw/echo?lb")[-1].header("x-forwarded-proto") == ["https"]


def test_post_content_length_body(proxy, up):
    body = bytes(range(256)) * 1000
    st, _, data = proxy.get("/fw/upload", method="POST", body=body,
                            headers={"Content-Type": "application/octet-stream"})
    assert st == 200
    assert json.loads(data)["sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body(proxy, up):
    parts = [b"a" * 10, b"b" * 4096, b"c" * 1, b"d" * 70000]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    headers = H + [("Transfer-Encoding", "chunked")]
    with proxy.raw() as c:
        c.send_raw(c.request_bytes("POST", "/fw/upload", headers) + wire)
        c.expect("POST", "/fw/upload", headers, b"".join(parts))
        resp, data = c.read_response()
        assert resp.status_code == 200
        assert json.loads(data) == {"len": sum(map(len, parts)),
                                    "sha256": hashlib.sha256(b"".join(parts)).hexdigest(),
                                    "upstream": up.addr}
        # the connection is still usable afterwards
        c.request("GET", "/fw/hello", H)
        assert c.read_response()[1] == b"hello, world!"


@pytest.mark.parametrize("kind", ["chunked", "close", "bytes"])
def test_response_framings(proxy, up, kind):
    n = 300_001
    c = proxy.conn()
    try:
        c.request("GET", f"/fw/{kind}/{n}")
        r = c.getresponse()
        assert r.status == 200, (r.read(), [(x.target, x.conn_id, x.index_on_conn, x.dropped, x.complete)
                                            for x in up.received])
        h = hashlib.sha256()
        total = 0
        while chunk := r.read(65536):
            h.update(chunk)
            total += len(chunk)
    finally:
        c.close()
    assert total == n and h.hexdigest() == generated_sha256(n)


def test_close_delimited_response_with_h11_client(proxy, up):
    # strict client-side parse: a close-delimited upstream response must be re-framed
    # correctly (chunked, or close-delimited with the connection closed after it)
    with proxy.raw() as c:
        c.request("GET", "/fw/close/12345", H)
        resp, body = c.read_response()
    assert resp.status_code == 200 and len(body) == 12345
