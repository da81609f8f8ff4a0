"""A request head with nothing to edit goes upstream as the client sent it (client.py
_route's `raw`), plus the request ID and X-Forwarded-* lines; anything else is rebuilt.

The upstream here records the exact bytes it receives, one request per connection (it
answers `Connection: close`), so each test sees every head pyroute wrote. The cases are
the ones where "the bytes as sent" could differ from the head llhttp parsed: empty lines
before the request line, extra spaces, a header without a space after its colon, several
requests or a body in one read, and headers pyroute must drop or extend.
"""
import re
import socket

import pytest

from support.rawupstream import RawUpstream
from support.upstream import wait_until

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
ID_LINE = re.compile(rb"\r\nX-Request-ID: [0-9a-f]{12}-[0-9a-f]+\r\n")


@pytest.fixture(scope="module")
def recorder():
    up = RawUpstream(ip="127.0.0.42", answer=ANSWER)
    up.after = lambda conn: conn.close()
    yield up
    up.close()


@pytest.fixture
def route(proxy, dns, recorder):
    recorder.heads.clear()
    dns.set_service("pass", recorder.ip)
    proxy.reconfigure(serviceName="pass", servicePath="/p", port=recorder.port)
    return recorder


def send(proxy, data: bytes, responses: int) -> bytes:
    """Write `data` in one send; read until `responses` answers came (or the proxy closed)."""
    with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while got.count(b"HTTP/1.1 ") < responses or not got.endswith(b"ok"):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def heads(recorder, count: int) -> list[bytes]:
    wait_until(lambda: len(recorder.heads) >= count, what=f"{count} request(s) upstream")
    return list(recorder.heads)


def one_head(received: bytes) -> bytes:
    """The head in what the upstream received: exactly one, ending at its one blank line."""
    head, sep, _ = received.partition(b"\r\n\r\n")
    assert sep and head.count(b"\r\n\r\n") == 0
    return head + sep


def test_a_plain_head_goes_upstream_as_sent(proxy, route):
    sent = b"GET /p/a?q=1 HTTP/1.1\r\nHost: pass.test\r\nUser-Agent:  curl/8  \r\nAccept: */*\r\n\r\n"
    assert send(proxy, sent, 1).startswith(b"HTTP/1.1 200 ")
    [got] = heads(route, 1)
    # The client's bytes (its spacing too), then the ID line and the X-Forwarded-* lines.
    assert got.startswith(sent[:-2]), got
    rest = got[len(sent) - 4:]
    assert ID_LINE.match(rest), got
    assert got.endswith(b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"), got


@pytest.mark.parametrize("sent, line", [
    (b"\r\n\r\nGET /p/lead HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /p/lead HTTP/1.1\r\n"),
    (b"\r\n" * 9 + b"GET /p/lead HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /p/lead HTTP/1.1\r\n"),
    (b"GET /p/two  HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /p/two HTTP/1.1\r\n"),
    (b"GET  /p/two HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /p/two HTTP/1.1\r\n"),
])
def test_a_request_line_llhttp_read_otherwise_is_rebuilt(proxy, route, sent, line):
    assert send(proxy, sent, 1).startswith(b"HTTP/1.1 200 ")
    [got] = heads(route, 1)
    head = one_head(got)
    assert head.startswith(line) and head.count(b"HTTP/1.1") == 1, got
    assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in head, got


def test_headers_without_a_space_and_blank_lines_after_the_head(proxy, route):
    """Short header lines make the head smaller than its parsed pieces suggest, and empty
    lines after it (allowed before a next request) end with a blank line too: the head
    sent upstream still ends where llhttp's did, with the X-Forwarded-* lines in it."""
    sent = b"GET /p/short HTTP/1.1\r\nHost:a\r\nA:1\r\nB:2\r\nC:3\r\n\r\n\r\n\r\n"
    assert send(proxy, sent, 1).startswith(b"HTTP/1.1 200 ")
    [got] = heads(route, 1)
    assert got == one_head(got), got  # nothing after the head
    assert got.startswith(b"GET /p/short HTTP/1.1\r\nHost:a\r\nA:1\r\nB:2\r\nC:3\r\n"), got
    assert got.endswith(b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"), got


def test_pipelined_heads_in_one_read_each_go_alone(proxy, route):
    first = b"GET /p/one HTTP/1.1\r\nHost: a\r\n\r\n"
    second = b"GET /p/two HTTP/1.1\r\nHost: a\r\n\r\n"
    got = send(proxy, first + second, 2)
    assert got.count(b"HTTP/1.1 200 ") == 2, got
    received = heads(route, 2)
    assert [one_head(h).split(b" ")[1] for h in received] == [b"/p/one", b"/p/two"]
    for h in received:
        assert h == one_head(h) and h.count(b"X-Forwarded-For: ") == 1, h


def test_a_body_in_the_same_read_follows_the_head(proxy, route):
    sent = b"POST /p/up HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello\r\n\r\nxy"
    assert send(proxy, sent, 1).startswith(b"HTTP/1.1 200 ")
    [got] = heads(route, 1)
    wait_until(lambda: route.heads[0].endswith(b"hello\r\n\r\nxy") or len(route.heads[0]) > len(got),
               what="the body upstream")
    head = one_head(got)
    assert head.startswith(b"POST /p/up HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n"), got
    assert head.endswith(b"X-Forwarded-Proto: http\r\n\r\n"), got


@pytest.mark.parametrize("extra, absent, present", [
    (b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nKeep-Alive: 5\r\n", (b"X-Drop", b"Keep-Alive", b"Connection"), ()),
    (b"TE: trailers\r\nProxy-Authorization: Basic eA==\r\n", (b"TE:", b"Proxy-Authorization"), ()),
    (b"X-Forwarded-For: 10.9.8.7\r\n", (), (b"X-Forwarded-For: 10.9.8.7, 127.0.0.1\r\n",)),
    (b"X-Forwarded-Proto: https\r\n", (), (b"X-Forwarded-Proto: https\r\n",)),
    (b"X-Request-ID: mine\r\n", (b"mine",), ()),
])
def test_a_head_with_headers_to_edit_is_rebuilt(proxy, route, extra, absent, present):
    sent = b"GET /p/edit HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"
    assert send(proxy, sent, 1).startswith(b"HTTP/1.1 200 ")
    [got] = heads(route, 1)
    head = one_head(got)
    for name in absent:
        assert name not in head, head
    for line in present:
        assert line in head, head
    assert head.count(b"X-Forwarded-For: ") == 1 and ID_LINE.search(head), head
