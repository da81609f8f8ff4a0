"""Issue 14's data-plane framing findings, each sent as its reproduction through real
sockets to a real pyroute: F1 (Connection naming framing headers in a request), F5 (the
same in a response), F3 (unterminated header lines and trailers), F10 (nothing after a
local refusal reaches an upstream), F11 (a forwarded request keeps its response when
garbage follows), F13 (oversized response heads, unknown transfer codings, framed 1xx,
a reset mid close-delimited body), F14 (a client that half-closes gets its answer)."""
import itertools
import select
import socket
import threading
import time

import pytest

from support.rawupstream import RawUpstream, reset
from support.upstream import wait_until
from test_smuggling import SMUGGLED, exchange

MAX_URI_SIZE = 8192
MAX_HEADER_SIZE = 65536
TIMEOUT_HTTP_REQUEST = 2
PYROUTE_ENV = {"MAX_URI_SIZE": str(MAX_URI_SIZE), "MAX_HEADER_SIZE": str(MAX_HEADER_SIZE),
               "TIMEOUT_HTTP_REQUEST": str(TIMEOUT_HTTP_REQUEST), "TIMEOUT_CLIENT": "30",
               "DNS_TTL_CAP": "60"}  # addresses stay cached: a request can go out within the read that brought it
HEAD_BOUND = MAX_URI_SIZE + MAX_HEADER_SIZE + 64 * 1024  # what a client may send before a 431
H = b"Host: a\r\n"

_names = itertools.count(1)


@pytest.fixture
def fr(proxy, dns, replicas):
    """/fr on an h11 upstream (strict parser, records every request)."""
    up = replicas[0]
    dns.set_service("fr", up.ip)
    proxy.reconfigure(serviceName="fr", servicePath="/fr", port=up.port)
    return up


@pytest.fixture
def raw_route(proxy, dns, fr):
    """A RawUpstream behind a fresh service -> (upstream, path prefix)."""
    up = RawUpstream("127.0.0.42")
    name = f"rawfr{next(_names)}x"  # a path no other route's prefix matches
    dns.set_service(name, up.ip)
    proxy.reconfigure(serviceName=name, servicePath=f"/{name}", port=up.port)
    yield up, f"/{name}"
    up.close()


def read_until_closed(s: socket.socket) -> tuple[bytes, str]:
    """Everything the proxy sends until it ends the connection -> (bytes, "eof" | "reset" | "timeout")."""
    got = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return got, "reset"
        except (socket.timeout, TimeoutError):
            return got, "timeout"
        if not chunk:
            return got, "eof"
        got += chunk


def assert_victim_served(proxy, fr):
    """A request on a fresh connection gets its own response (no response left queued upstream)."""
    with proxy.raw() as c:
        c.request("GET", "/fr/hello", [("Host", "a")])
        resp, body = c.read_response()
        assert resp.status_code == 200 and body == b"hello, world!", (resp, body)
    assert not fr.requests("SMUGGLED")


# -- F1: Connection naming Content-Length, Transfer-Encoding or Host --------------------------

F1_REQUESTS = {
    "Connection: Content-Length": b"POST /fr/echo HTTP/1.1\r\n" + H + b"Connection: Content-Length\r\n"
                                  b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "Connection: Transfer-Encoding": b"POST /fr/echo HTTP/1.1\r\n" + H + b"Connection: Transfer-Encoding\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    "upper case, in a list": b"POST /fr/echo HTTP/1.1\r\n" + H + b"Connection: keep-alive,CONTENT-LENGTH\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "second Connection line": b"POST /fr/echo HTTP/1.1\r\n" + H + b"Connection: keep-alive\r\n"
                              b"Content-Length: %d\r\nConnection: x-a , content-length\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "tab before the token": b"POST /fr/echo HTTP/1.1\r\n" + H + b"Connection: x-a,\ttransfer-encoding\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "Connection: Host": b"GET /fr/echo HTTP/1.1\r\n" + H + b"Connection: host\r\n\r\n",
    "HTTP/1.0": b"POST /fr/echo HTTP/1.0\r\n" + H + b"Connection: keep-alive, Content-Length\r\n"
                b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
}


@pytest.mark.parametrize("name", list(F1_REQUESTS))
def test_F1_connection_naming_framing_or_host_is_refused(proxy, fr, name):
    got, closed = exchange(proxy, F1_REQUESTS[name])
    assert got.startswith(b"HTTP/1.1 400 ") and got.count(b"HTTP/1.") == 1, (name, got[:300])
    assert closed, name
    assert not fr.requests(), (name, [(r.method, r.target) for r in fr.requests()])
    assert_victim_served(proxy, fr)
    assert [r.target for r in fr.requests()] == ["/fr/hello"]


def test_F1_other_connection_tokens_still_forwarded(proxy, fr):
    """Naming ordinary headers stays allowed: they are dropped as hop-by-hop, as before."""
    with proxy.raw() as c:
        c.send_raw(b"GET /fr/echo HTTP/1.1\r\n" + H + b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Kept: 2\r\n\r\n")
        c.expect("GET", "/", [("Host", "a")])
        assert c.read_response()[0].status_code == 200
    rec = fr.requests("/fr/echo")[-1]
    assert rec.header("X-Kept") == ["2"] and not rec.header("X-Hop") and not rec.header("Connection")


# -- F5 and F13 (a-c): malformed upstream responses are 502, the connection discarded -------------

BAD_RESPONSES = {
    "F5 Connection: Content-Length": b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok",
    "F5 Connection: transfer-encoding in a list": b"HTTP/1.1 200 OK\r\nConnection: keep-alive, transfer-encoding\r\n"
                                                  b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "F5 second Connection line": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
                                 b"Connection: CONTENT-LENGTH\r\n\r\nok",
    "F5 HTTP/1.0 status line": b"HTTP/1.0 200 OK\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 2\r\n\r\nok",
    "F13 head over 64 KiB in one read": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\nContent-Length: 2\r\n\r\nok",
    "F13 Transfer-Encoding: xchunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "F13 Transfer-Encoding: gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nok",
    "F13 100 with Content-Length": b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n"
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "F13 103 with Transfer-Encoding": b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("name", list(BAD_RESPONSES))
def test_F5_F13_malformed_upstream_framing_is_502(proxy, fr, raw_route, name):
    up, prefix = raw_route
    up.answer = BAD_RESPONSES[name]
    with proxy.raw(timeout=5) as c:
        c.request("GET", prefix + "/x", [("Host", "a")])
        resp, body = c.read_response()
        assert resp.status_code == 502 and b"Bad Gateway" in body, (name, resp, body[:200])
        c.request("GET", "/fr/hello", [("Host", "a")])  # the client connection is still in step
        resp, body = c.read_response()
        assert resp.status_code == 200 and body == b"hello, world!", (name, resp, body)
    wait_until(lambda: up.closed_by_proxy == [True], what="pyroute to discard the upstream connection")


def test_F13_upstream_reset_mid_close_delimited_body_resets_the_client(proxy, fr, raw_route):
    up, prefix = raw_route
    up.answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart-of-the-body"
    go = threading.Event()
    up.after = lambda conn: (go.wait(10), reset(conn))
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10)
    try:
        s.sendall(b"GET " + prefix.encode() + b"/x HTTP/1.1\r\n" + H + b"\r\n")
        got = b""
        while b"part-of-the-body" not in got:  # the body has started reaching the client
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200 "), got
        go.set()  # now the upstream resets its connection
        rest, ending = read_until_closed(s)
    finally:
        go.set()
        s.close()
    assert ending == "reset", (ending, rest)


def test_F13_clean_close_still_ends_a_close_delimited_body(proxy, fr):
    status, _, body = proxy.get("/fr/close/1000")
    assert status == 200 and len(body) == 1000


# -- F3: unterminated header lines and trailers -------------------------------------------------

def stream_bounded(socks: list[socket.socket], piece: bytes, bound: int) -> None:
    """Send `piece` round-robin on every socket, `bound` bytes at most on each (less once the
    proxy has answered or closed it); then the client waits for the answer."""
    sent = {s: 0 for s in socks}
    live = list(socks)
    while live:
        readable, _, _ = select.select(live, [], [], 0)
        for s in list(live):
            if s in readable or sent[s] + len(piece) > bound:
                live.remove(s)
                continue
            try:
                s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                live.remove(s)
                continue
            sent[s] += len(piece)


def test_F3_endless_header_value_gets_431_and_memory_stays_bounded(proxy, fr):
    before = proxy.rss_kib()
    socks = [socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10) for _ in range(8)]
    try:
        for s in socks:
            s.sendall(b"GET /fr/hello HTTP/1.1\r\n" + H + b"X-Endless: ")
        stream_bounded(socks, b"a" * 4096, HEAD_BOUND)
        answers = [read_until_closed(s) for s in socks]  # the head never ends: only a refusal answers
    finally:
        for s in socks:
            s.close()
    for got, ending in answers:
        assert got.startswith(b"HTTP/1.1 431 "), (got[:200], ending)
        assert ending in ("eof", "reset")
    grown = proxy.rss_kib() - before
    assert grown < 4 * 1024, f"RSS grew by {grown} KiB"
    assert not fr.requests()


def test_F3_endless_trailer_gets_400_and_memory_stays_bounded(proxy, fr):
    before = proxy.rss_kib()
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10)
    try:
        s.sendall(b"POST /fr/upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
        # pyroute counts a trailer from the read after the one with the last chunk (the limit
        # holds to within one read): that read is over once the upstream has the head.
        wait_until(lambda: fr.requests("/fr/upload"), what="the request head upstream")
        s.sendall(b"X-Endless-Trailer: ")
        stream_bounded([s], b"t" * 4096, HEAD_BOUND)
        got, ending = read_until_closed(s)  # the trailer never ends: only a refusal answers
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 400 ") and ending in ("eof", "reset"), (got[:200], ending)
    grown = proxy.rss_kib() - before
    assert grown < 4 * 1024, f"RSS grew by {grown} KiB"
    assert not [r for r in fr.requests() if r.complete]


def test_F3_trailer_has_the_head_deadline(proxy, fr):
    """A trailer trickling in one byte at a time (TIMEOUT_CLIENT never expires) is cut at
    TIMEOUT_HTTP_REQUEST after the last chunk."""
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10)
    start = time.monotonic()
    got = b""
    try:
        s.sendall(b"POST /fr/upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: ")
        s.settimeout(0.25)
        while time.monotonic() - start < 5 * TIMEOUT_HTTP_REQUEST:  # the attack: one byte every 0.25 s
            try:
                s.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                got = s.recv(65536)
                break
            except (socket.timeout, TimeoutError):
                continue
        s.settimeout(5)
        rest, _ = read_until_closed(s)
        got += rest
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert not [r for r in fr.requests() if r.complete]


def test_F3_trailer_fields_never_reach_the_next_request(proxy, fr):
    """Trailers are dropped by re-framing; none of them leaks into the next head."""
    with proxy.raw() as c:
        c.send_raw(b"POST /fr/upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
                   b"Host: evil\r\nX-Trailer: 1\r\n\r\n"
                   b"GET /fr/echo HTTP/1.1\r\n" + H + b"\r\n")
        c.expect("POST", "/", [("Host", "a"), ("Transfer-Encoding", "chunked")])
        assert c.read_response()[0].status_code == 200
        c.expect("GET", "/", [("Host", "a")])
        assert c.read_response()[0].status_code == 200
    echoed = fr.requests("/fr/echo")[-1]
    assert echoed.header("Host") == ["a"] and not echoed.header("X-Trailer"), echoed.headers
    assert echoed.body_len == 0 and echoed.complete


# -- F10: nothing after a local refusal reaches an upstream ---------------------------------------

F10_REFUSED_FIRST = {
    "no Host": b"GET /fr/hello HTTP/1.1\r\n\r\n",
    "GET *": b"GET * HTTP/1.1\r\n" + H + b"\r\n",
    "body over maxRequestBody (413)": b"POST /small-fr/upload HTTP/1.1\r\n" + H + b"Content-Length: 20\r\n\r\n" + b"x" * 20,
    "chunked HTTP/1.0 keep-alive": b"POST /fr/upload HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", list(F10_REFUSED_FIRST))
def test_F10_pipelined_request_after_a_local_refusal_is_not_forwarded(proxy, dns, fr, name):
    dns.set_service("small-fr", fr.ip)
    proxy.reconfigure(serviceName="small-fr", servicePath="/small-fr", port=fr.port, maxRequestBody="10")
    assert proxy.get("/fr/hello")[0] == 200  # a pooled upstream connection: forwarding would be immediate
    got, closed = exchange(proxy, F10_REFUSED_FIRST[name] + b"GET /fr/echo/pipelined HTTP/1.1\r\n" + H + b"\r\n")
    assert got.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 413 ")) and got.count(b"HTTP/1.1 ") == 1 and closed, (name, got)
    assert_victim_served(proxy, fr)  # recorded after anything forwarded before it
    assert [r.target for r in fr.requests()] == ["/fr/hello", "/fr/hello"], name


# -- F11: a forwarded request keeps its response when garbage follows it ----------------------

def test_F11_garbage_after_a_forwarded_post_closes_after_its_response(proxy, fr):
    body = b"hello"
    got, closed = exchange(proxy, b"POST /fr/upload HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\n" + body
                           + b"\x00this is not HTTP\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ") and got.count(b"HTTP/1.1 ") == 1, got
    assert b'"len":5' in got, got
    assert closed
    assert [(r.method, r.target, r.body_len) for r in fr.requests()] == [("POST", "/fr/upload", 5)]


def test_F11_pipelined_requests_before_a_broken_one_keep_their_responses(proxy, fr):
    got, closed = exchange(proxy, b"GET /fr/hello HTTP/1.1\r\n" + H + b"\r\n" + b"GET /fr/hello HTTP/1.1\r\n" + H + b"\r\n"
                           + b"GET /fr/x HTTP/1.1\r\nX(bad): 1\r\n\r\n")
    assert got.count(b"HTTP/1.1 200 ") == 2 and got.count(b"HTTP/1.1 ") == 2, got
    assert closed
    assert [r.target for r in fr.requests()] == ["/fr/hello", "/fr/hello"]


def test_F11_broken_body_behind_a_request_in_flight_is_dropped_after_its_response(proxy, fr):
    got, closed = exchange(proxy, b"GET /fr/slow/0.2 HTTP/1.1\r\n" + H + b"\r\n"
                           + b"POST /fr/upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert got.startswith(b"HTTP/1.1 200 ") and got.count(b"HTTP/1.1 ") == 1 and got.endswith(b"slow done"), got
    assert closed
    assert [r.target for r in fr.requests()] == ["/fr/slow/0.2"]


# -- F14: a half-closed client gets its response --------------------------------------------------

def test_F14_half_closed_client_gets_its_response_then_close(proxy, fr):
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10)
    try:
        s.sendall(b"GET /fr/hello HTTP/1.1\r\n" + H + b"\r\n")
        s.shutdown(socket.SHUT_WR)
        got, ending = read_until_closed(s)
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"hello, world!"), got
    assert ending == "eof"


def test_F14_half_closed_client_gets_every_pipelined_response(proxy, fr):
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10)
    try:
        s.sendall(b"POST /fr/upload HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
                  + b"GET /fr/hello HTTP/1.1\r\n" + H + b"\r\n")
        s.shutdown(socket.SHUT_WR)
        got, ending = read_until_closed(s)
    finally:
        s.close()
    assert got.count(b"HTTP/1.1 200 ") == 2 and b'"len":3' in got and got.endswith(b"hello, world!"), got
    assert ending == "eof"


def test_F14_half_close_in_the_middle_of_a_body_closes(proxy, fr):
    """A request that can never complete is not answered: the connection just closes."""
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10)
    try:
        s.sendall(b"POST /fr/upload HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nabc")
        s.shutdown(socket.SHUT_WR)
        got, ending = read_until_closed(s)
    finally:
        s.close()
    assert ending in ("eof", "reset") and not got.startswith(b"HTTP/1.1 200"), got
