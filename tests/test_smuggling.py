"""Hostile framing: every known request-smuggling vector is refused (400 + close, nothing
forwarded) or normalised into one well-formed message; the limits answer 414/431/413.

Each vector hides a second request ("GET /hs/SMUGGLED") where a parser that disagrees
with pyroute's would see one; no upstream may ever receive it, and the h11 upstreams
(strict parsers) must never see a malformed message (autouse fixture)."""
import socket

import pytest

from support.rawupstream import RawUpstream
from support.upstream import wait_until

PYROUTE_ENV = {"MAX_URI_SIZE": "200", "MAX_HEADER_SIZE": "2048", "MAX_HEADERS": "20", "MAX_REQUEST_BODY": "1000"}

SMUGGLED = b"GET /hs/SMUGGLED HTTP/1.1\r\nHost: a\r\n\r\n"
H = b"Host: a\r\n"

REFUSED = {
    # CL.TE / TE.CL: both framings present
    "CL.TE": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE.CL": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    # Content-Length variants
    "CL twice, differing": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nContent-Length: 39\r\n\r\n" + SMUGGLED,
    "CL twice, same": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: 39\r\nContent-Length: 39\r\n\r\n" + SMUGGLED,
    "CL list": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: 39, 0\r\n\r\n" + SMUGGLED,
    "CL plus sign": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: +0\r\n\r\n" + SMUGGLED,
    "CL negative": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n" + SMUGGLED,
    "CL hex": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: 0x0\r\n\r\n" + SMUGGLED,
    "CL underscore": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: 0_0\r\n\r\n" + SMUGGLED,
    "CL inner space": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: 0 39\r\n\r\n" + SMUGGLED,
    "CL empty": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n" + SMUGGLED,
    "CL overflow": b"POST /hs/x HTTP/1.1\r\n" + H + b"Content-Length: 184467440737095516160\r\n\r\n" + SMUGGLED,
    # TE.TE obfuscations
    "TE identity": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n" + SMUGGLED,
    "TE xchunked": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE chunked, identity": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n" + SMUGGLED,
    "TE gzip, chunked": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE twice": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE space before colon": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE vertical tab": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE quoted": b'POST /hs/x HTTP/1.1\r\n' + H + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n' + SMUGGLED,
    "TE in HTTP/1.0": b"POST /hs/x HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE folded": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "obs-fold": b"GET /hs/x HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n",
    # header names and values
    "bad header name": b"GET /hs/x HTTP/1.1\r\n" + H + b"X(A): b\r\n\r\n",
    "space-prefixed header": b"GET /hs/x HTTP/1.1\r\n Transfer-Encoding: chunked\r\n" + H + b"\r\n",
    "NUL in value": b"GET /hs/x HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n",
    "CTL in value": b"GET /hs/x HTTP/1.1\r\n" + H + b"X-A: b\x01c\r\n\r\n",
    "DEL in value": b"GET /hs/x HTTP/1.1\r\n" + H + b"X-A: b\x7fc\r\n\r\n",
    "bare CR in value": b"GET /hs/x HTTP/1.1\r\n" + H + b"X-A: b\rContent-Length: 39\r\n\r\n" + SMUGGLED,
    "bare LF line ends": b"GET /hs/x HTTP/1.1\n" + b"Host: a\n\n",
    "bare LF before header": b"GET /hs/x HTTP/1.1\r\nHost: a\nContent-Length: 39\r\n\r\n" + SMUGGLED,
    "bare CR line end": b"GET /hs/x HTTP/1.1\rHost: a\r\n\r\n",
    # chunk framing
    "chunk size not hex": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    "chunk size overflow": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\nx\r\n0\r\n\r\n",
    "chunk size 0x": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunk size trailing space": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
    "chunk ext with bare LF": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;x\nabc\r\n0\r\n\r\n",
    "chunk ext quoted CRLF": b'POST /hs/x HTTP/1.1\r\n' + H + b'Transfer-Encoding: chunked\r\n\r\n3;x="a\r\n0"\r\nabc\r\n0\r\n\r\n',
    "chunk data overrun": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcde\r\n0\r\n\r\n",
    "chunk LF only": b"POST /hs/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    # request line and target forms
    "asterisk GET": b"GET * HTTP/1.1\r\n" + H + b"\r\n",
    "authority-form GET": b"GET a:80 HTTP/1.1\r\n" + H + b"\r\n",
    "HTTP/0.9": b"GET /hs/x\r\n\r\n",
    "HTTP/2.0 line": b"GET /hs/x HTTP/2.0\r\n" + H + b"\r\n",
    "HTTP/2.0 line, keep-alive": b"GET /hs/x HTTP/2.0\r\n" + H + b"Connection: keep-alive\r\n\r\n",
    "HTTP/2.0 line, Proxy-Connection": b"GET /hs/x HTTP/2.0\r\n" + H + b"Proxy-Connection: keep-alive\r\n\r\n",
    "HTTP/1.2": b"GET /hs/x HTTP/1.2\r\n" + H + b"\r\n",
    "space in target": b"GET /hs/x HTTP/1.1 /y HTTP/1.1\r\n" + H + b"\r\n",
    "NUL in target": b"GET /hs/\x00 HTTP/1.1\r\n" + H + b"\r\n",
    "lower-case method": b"get /hs/x HTTP/1.1\r\n" + H + b"\r\n",
    "no Host in 1.1": b"GET /hs/x HTTP/1.1\r\n\r\n",
    "two Host headers": b"GET /hs/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "upgrade with a body": b"POST /hs/x HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 39\r\n\r\n" + SMUGGLED,
}

# Accepted, and forwarded as one well-formed message (h11 upstream checks it).
NORMALISED = {
    "chunk extension dropped": (b"POST /hs/n HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;ext=\"v\"\r\nabc\r\n0\r\n\r\n", 3),
    "trailers dropped": (b"POST /hs/n HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", 3),
    "TE upper case": (b"POST /hs/n HTTP/1.1\r\n" + H + b"Transfer-Encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 3),
    "TE tab": (b"POST /hs/n HTTP/1.1\r\n" + H + b"Transfer-Encoding:\tchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 3),
    "leading empty line": (b"\r\nGET /hs/n HTTP/1.1\r\n" + H + b"\r\n", 0),
    "absolute-form": (b"GET http://a/hs/n HTTP/1.1\r\n" + H + b"\r\n", 0),
    "GET with a body": (b"GET /hs/n HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc", 3),
}


def exchange(proxy, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send `data`, read until the proxy closes -> (everything it answered, closed?)."""
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=timeout)
    try:
        s.sendall(data)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return got, True
            except (socket.timeout, TimeoutError):
                return got, False
            if not chunk:
                return got, True
            got += chunk
    finally:
        s.close()


@pytest.fixture
def hs(proxy, dns, replicas):
    up = replicas[0]
    dns.set_service("hs", up.ip)
    proxy.reconfigure(serviceName="hs", servicePath="/hs", port=up.port)
    proxy.reconfigure(serviceName="hs-small", servicePath="/small", port=up.port, maxRequestBody="10")
    proxy.reconfigure(serviceName="hs-big", servicePath="/big", port=up.port, maxRequestBody="0")
    dns.set_service("hs-small", up.ip)
    dns.set_service("hs-big", up.ip)
    return up


@pytest.mark.parametrize("name", list(REFUSED))
def test_smuggling_vector_refused(proxy, hs, name):
    got, closed = exchange(proxy, REFUSED[name])
    assert got.startswith(b"HTTP/1.1 400 "), (name, got[:200])
    assert got.count(b"HTTP/1.1 ") == 1 and closed, (name, got)
    # A head refused: nothing forwarded. A bad chunk later in a streamed body: the head may
    # have gone ahead, but the message never completes and that upstream connection is reset.
    assert not [r for r in hs.requests("/hs/") if r.complete], (name, [(r.method, r.target) for r in hs.requests()])
    assert not hs.requests("SMUGGLED")


@pytest.mark.parametrize("name", list(NORMALISED))
def test_ambiguity_normalised(proxy, hs, name):
    data, body_len = NORMALISED[name]
    with proxy.raw() as c:
        c.send_raw(data + SMUGGLED.replace(b"SMUGGLED", b"after"))
        c.expect("GET", "/", [("Host", "a")])
        resp, _ = c.read_response()
        assert resp.status_code == 200, name
        c.expect("GET", "/", [("Host", "a")])
        assert c.read_response()[0].status_code == 200   # the connection stays in step
    got = hs.requests("/hs/")
    assert [r.target for r in got] == ["/hs/n", "/hs/after"], name
    assert got[0].body_len == body_len and got[0].complete


def test_options_asterisk_is_forwarded_as_is(proxy, dns, replicas):
    up = replicas[1]
    dns.set_service("hs-root", up.ip)
    proxy.reconfigure(serviceName="hs-root", servicePath="/", port=up.port)
    with proxy.raw() as c:
        c.request("OPTIONS", "*", [("Host", "a")])
        assert c.read_response()[0].status_code == 200
    assert [(r.method, r.target) for r in up.requests("*")] == [("OPTIONS", "*")]


def test_absolute_form_authority_replaces_host(proxy, dns, replicas, hs):
    """Routing and the upstream agree on the host: the target's, not the Host header's."""
    other = replicas[2]
    dns.set_service("hs-dom", other.ip)
    proxy.reconfigure(serviceName="hs-dom", serviceDomain="inner.test", servicePath="/dom", port=other.port)
    assert proxy.get("/dom/echo", headers={"Host": "outer.test"})[0] == 503   # by Host alone: no route
    with proxy.raw() as c:
        c.send_raw(b"GET http://inner.test/dom/echo HTTP/1.1\r\nHost: outer.test\r\n\r\n")
        c.expect("GET", "/", [("Host", "a")])
        assert c.read_response()[0].status_code == 200
    rec = other.requests("/dom/echo")[-1]
    assert rec.target == "/dom/echo" and rec.header("Host") == ["inner.test"]


def test_connect_is_405(proxy, hs):
    got, closed = exchange(proxy, b"CONNECT hs:443 HTTP/1.1\r\nHost: hs:443\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 405 ") and closed


def test_uri_too_long_is_414(proxy, hs):
    got, closed = exchange(proxy, b"GET /hs/" + b"a" * 300 + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert got.startswith(b"HTTP/1.1 414 ") and closed
    got, _ = exchange(proxy, b"GET /hs/" + b"a" * 150 + b" HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ")


def test_header_block_too_large_is_431(proxy, hs):
    got, closed = exchange(proxy, b"GET /hs/x HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 3000 + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 431 ") and closed
    many = b"".join(b"X-%d: v\r\n" % i for i in range(25))
    got, closed = exchange(proxy, b"GET /hs/x HTTP/1.1\r\n" + H + many + b"\r\n")
    assert got.startswith(b"HTTP/1.1 431 ") and closed
    assert not hs.requests("/hs/")


def test_body_limit_413_global_and_per_service(proxy, hs):
    # MAX_REQUEST_BODY=1000: Content-Length over it is refused before anything is forwarded
    st, _, _ = proxy.get("/hs/upload", method="POST", body=b"x" * 1001)
    assert st == 413
    assert not hs.requests("/hs/upload")
    assert proxy.get("/hs/upload", method="POST", body=b"x" * 1000)[0] == 200
    # a chunked body is counted as it comes
    got, closed = exchange(proxy, b"POST /hs/upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                           + b"200\r\n" + b"x" * 512 + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 413 ") and closed
    # maxRequestBody=10 on one service, maxRequestBody=0 (unlimited) on another
    assert proxy.get("/small/upload", method="POST", body=b"x" * 11)[0] == 413
    assert proxy.get("/small/upload", method="POST", body=b"x" * 10)[0] == 200
    assert proxy.get("/big/upload", method="POST", body=b"x" * 5000)[0] == 200


def test_malformed_upstream_response_is_502_and_never_reaches_the_client(proxy, hs):
    with proxy.raw() as c:
        c.request("GET", "/hs/garbage", [("Host", "a")])
        resp, body = c.read_response()
        assert resp.status_code == 502 and b"Bad Gateway" in body
        c.request("GET", "/hs/hello", [("Host", "a")])
        assert c.read_response()[0].status_code == 200


def test_maxconn_waits_instead_of_refusing(make_pyroute, dns, replicas):
    up = replicas[0]
    p = make_pyroute(MAXCONN="2")
    dns.set_service("hs-mc", up.ip)
    p.reconfigure(serviceName="hs-mc", servicePath="/mc", port=up.port)
    first, second = p.raw(), p.raw()
    for c in (first, second):
        c.request("GET", "/mc/hello", [("Host", "a")])
        assert c.read_response()[0].status_code == 200
    wait_until(lambda: "MAXCONN 2 reached" in p.log(), what="the MAXCONN log line")
    third = p.raw(timeout=2)   # connects (the kernel backlog) but is not accepted yet
    third.request("GET", "/mc/hello", [("Host", "a")])
    with pytest.raises((socket.timeout, TimeoutError)):
        third.sock.recv(1, socket.MSG_PEEK)
    # the accepted connections keep being served meanwhile
    first.request("GET", "/mc/hello", [("Host", "a")])
    assert first.read_response()[0].status_code == 200
    second.close()   # room again: the waiting connection is accepted and answered
    third.sock.settimeout(10)
    assert third.read_response()[0].status_code == 200
    first.close()
    third.close()


BAD_RESPONSES = {
    "CL and TE": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two differing CL": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nhello",
    "CL not a number": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    "TE twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "HTTP/2.0 status line": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "folded header": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "status 2000": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "control char": b"HTTP/1.1 200 OK\r\nX-A: a\x01\r\nContent-Length: 0\r\n\r\n",
    "bytes after the response": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "101 unasked": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\nraw",
    "bad chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
}


@pytest.fixture(scope="module")
def raw_upstream():
    up = RawUpstream()
    yield up
    up.close()


@pytest.mark.parametrize("name", list(BAD_RESPONSES))
def test_malformed_or_ambiguous_upstream_response_is_502(proxy, dns, hs, raw_upstream, name):
    raw_upstream.answer = BAD_RESPONSES[name]
    raw_upstream.closed_by_proxy.clear()
    dns.set_service("hs-raw", "127.0.0.41")
    proxy.reconfigure(serviceName="hs-raw", servicePath="/raw", port=raw_upstream.port)
    with proxy.raw() as c:
        c.request("GET", "/raw/x", [("Host", "a")])
        resp, body = c.read_response()
        assert resp.status_code == 502, (name, resp, body)
        c.request("GET", "/hs/hello", [("Host", "a")])   # the client connection is still in step
        assert c.read_response()[0].status_code == 200
    wait_until(lambda: raw_upstream.closed_by_proxy == [True], what="pyroute to drop the upstream connection")


def test_bytes_after_a_closing_request_are_ignored_not_refused(proxy, hs):
    """A request that says close is answered; what follows it is not read, let alone forwarded."""
    got, closed = exchange(proxy, b"GET /hs/hello HTTP/1.0\r\nHost: a\r\n\r\n" + SMUGGLED)
    assert got.startswith(b"HTTP/1.1 200 ") and got.count(b"HTTP/1.1 ") == 1 and closed, got
    got, closed = exchange(proxy, b"GET /hs/hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + SMUGGLED)
    assert got.startswith(b"HTTP/1.1 200 ") and got.count(b"HTTP/1.1 ") == 1 and closed, got
    assert [r.target for r in hs.requests("/hs/")] == ["/hs/hello", "/hs/hello"]
