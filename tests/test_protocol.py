"""The fast protocol tier: the client protocol fed bytes in memory (tests/support/memory.py).

Framing, pipelining, keep-alive and pyroute's own error answers, checked on the bytes each
side was sent, in milliseconds per test. The black-box tier (real processes and sockets)
covers the same ground end to end; this tier pins the state machine down case by case.
"""
import gzip

import pytest

from support.memory import Rig

DEMO = {"serviceName": "demo", "servicePath": "/demo"}
NO_RETRY = {"serviceName": "once", "servicePath": "/once", "retries": "0"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def rig():
    r = Rig([DEMO, NO_RETRY], {"MAX_URI_SIZE": "100", "MAX_HEADER_SIZE": "512", "MAX_REQUEST_BODY": "50"})
    yield r
    r.close()


def head_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_a_get_goes_upstream_with_forwarding_headers_and_its_response_comes_back_unchanged(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo/a HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n")
    lines = head_lines(up.received())
    assert lines[0] == b"GET /demo/a HTTP/1.1"
    assert b"Host: h" in lines and b"X-A: 1" in lines
    assert b"X-Forwarded-For: 127.0.0.1" in lines and b"X-Forwarded-Proto: http" in lines
    up.reply(OK)
    assert client.received() == OK
    assert rig.pool.idle[up.conn.address] == [up.conn]  # back in the pool for the next request
    assert not client.transport.closed


def test_keep_alive_requests_reuse_the_pooled_upstream_connection(rig):
    up = rig.idle_upstream()
    client = rig.client()
    for n in range(3):
        client.send(b"GET /demo/%d HTTP/1.1\r\nHost: h\r\n\r\n" % n)
        assert up.received().startswith(b"GET /demo/%d " % n)
        up.reply(OK)
        assert client.received() == OK
    assert not up.transport.closed


def test_pipelined_requests_go_upstream_one_at_a_time_and_answer_in_order(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo/1 HTTP/1.1\r\nHost: h\r\n\r\nGET /demo/2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert up.received().startswith(b"GET /demo/1 ")
    assert not client.transport.reading  # the second waits: nothing more is read meanwhile
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert client.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"
    assert up.received().startswith(b"GET /demo/2 ")
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert client.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2"
    assert client.transport.reading


def test_a_chunked_request_is_reframed_without_its_extensions(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"POST /demo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n")
    sent = up.received()
    head, body = sent.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head.split(b"\r\n")
    assert body == b"3\r\nabc\r\n0\r\n\r\n"


def test_a_chunked_response_passes_through_and_the_connection_stays_open(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo HTTP/1.1\r\nHost: h\r\n\r\n")
    up.received()
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    up.reply(response[:30])
    up.reply(response[30:])
    assert client.received() == response
    assert not client.transport.closed and rig.pool.idle[up.conn.address] == [up.conn]


def test_a_close_delimited_response_ends_the_client_connection_after_it(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo HTTP/1.1\r\nHost: h\r\n\r\n")
    up.received()
    up.reply(b"HTTP/1.1 200 OK\r\n\r\nbody")
    up.hang_up()
    data = client.received()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in head_lines(data)
    assert data.endswith(b"body")
    assert client.transport.closed and not client.transport.aborted


def test_an_http10_request_with_proxy_connection_keep_alive_stays_http10(rig):
    # llhttp reads Proxy-Connection as Connection: keep-alive here is not HTTP/1.1's default
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo HTTP/1.0\r\nHost: h\r\nProxy-Connection: keep-alive\r\n\r\n")
    assert up.received().startswith(b"GET /demo HTTP/1.0\r\n")
    up.reply(OK)
    assert head_lines(client.received())[0].startswith(b"HTTP/1.1 200")


def test_an_http10_client_gets_connection_close_and_the_socket_closes(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo HTTP/1.0\r\nHost: h\r\n\r\n")
    assert up.received().startswith(b"GET /demo HTTP/1.0\r\n")
    up.reply(OK)
    assert b"Connection: close" in head_lines(client.received())
    assert client.transport.closed


def test_connection_close_from_the_client_is_honoured_and_later_bytes_are_not_forwarded(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /demo/2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert up.received().count(b"GET ") == 1
    up.reply(OK)
    assert b"Connection: close" in head_lines(client.received())
    assert client.transport.closed
    assert up.received() == b""


def test_hop_by_hop_response_headers_are_removed(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo HTTP/1.1\r\nHost: h\r\n\r\n")
    up.received()
    up.reply(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nX-Secret: s\r\n"
             b"Content-Length: 2\r\n\r\nok")
    lines = [line.lower() for line in head_lines(client.received())]
    assert not any(line.startswith((b"keep-alive", b"x-secret", b"connection")) for line in lines)


def test_a_head_response_has_no_body_whatever_its_content_length(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"HEAD /demo HTTP/1.1\r\nHost: h\r\n\r\n")
    up.received()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert client.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    client.send(b"GET /demo HTTP/1.1\r\nHost: h\r\n\r\n")  # the connection is in step for the next one
    assert up.received().startswith(b"GET /demo ")


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n", 503),
    (b"GET /demo HTTP/1.1\r\n\r\n", 400),
    (b"POST /demo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /demo/" + b"x" * 200 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    (b"GET /demo HTTP/1.1\r\nHost: h\r\nX-Big: " + b"x" * 600 + b"\r\n\r\n", 431),
    (b"POST /demo HTTP/1.1\r\nHost: h\r\nContent-Length: 51\r\n\r\n", 413),
    (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 405),
    (b"GET /demo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
], ids=["no route", "no Host", "CL and TE", "long URI", "big head", "big body", "CONNECT", "two Hosts"])
def test_pyroute_answers_itself_and_forwards_nothing(rig, request_bytes, status):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(request_bytes)
    data = client.received()
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert up.received() == b""
    if status != 503:
        assert client.transport.closed and b"Connection: close" in head_lines(data)


def test_a_chunked_body_over_the_limit_is_cut_with_413(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"POST /demo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"40\r\n" + b"x" * 64 + b"\r\n")
    assert client.received().startswith(b"HTTP/1.1 413 ")
    assert client.transport.closed
    assert up.transport.aborted  # the upstream saw part of a message: that connection cannot be reused


def test_an_invalid_response_is_a_502_and_its_connection_is_dropped(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo HTTP/1.1\r\nHost: h\r\n\r\n")
    up.received()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok")
    assert client.received().startswith(b"HTTP/1.1 502 ")
    assert up.transport.aborted and up.conn not in rig.pool.idle.get(up.conn.address, [])


def test_bytes_after_the_end_of_a_response_never_reach_the_client(rig):
    up = rig.idle_upstream()
    client = rig.client()
    client.send(b"GET /demo HTTP/1.1\r\nHost: h\r\n\r\n")
    up.received()
    up.reply(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON")
    data = client.received()
    assert b"POISON" not in data and data.startswith(b"HTTP/1.1 502 ")
    assert up.transport.aborted


def test_a_post_is_never_replayed_when_its_service_says_retries_0(rig):
    up = rig.idle_upstream()
    up.conn.reused = True  # a pooled connection the upstream may have closed while it idled
    client = rig.client()
    client.send(b"POST /once HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    assert up.received().endswith(b"\r\n\r\nhi")
    up.hang_up()
    assert client.received().startswith(b"HTTP/1.1 502 ")  # (a replay would dial port 9: 503)


UPGRADE = b"GET /demo/ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"


def upgraded(rig):
    """A client connection whose upstream answered 101: (client, upstream), now a tunnel."""
    up = rig.idle_upstream()
    client = rig.client()
    client.send(UPGRADE + b"early")  # bytes sent ahead of the 101 wait for the tunnel
    assert up.received().startswith(b"GET /demo/ws ")
    assert not client.transport.reading
    up.reply(SWITCH + b"hello")
    assert client.received() == SWITCH + b"hello"
    assert up.received() == b"early"
    return client, up


def test_an_upgraded_connection_tunnels_bytes_both_ways_with_backpressure(rig):
    client, up = upgraded(rig)
    client_end, upstream_end = client.transport.protocol, up.transport.protocol
    assert client.transport.reading and up.transport.reading
    client_end.data_received(b"ping")
    upstream_end.data_received(b"pong")
    assert up.received() == b"ping" and client.received() == b"pong"
    client_end.pause_writing()  # the client's send buffer is full: stop reading the upstream
    assert not up.transport.reading and client.transport.reading
    upstream_end.pause_writing()  # and the upstream's: stop reading the client too
    assert not client.transport.reading
    client_end.resume_writing()
    assert up.transport.reading and not client.transport.reading
    upstream_end.resume_writing()
    assert client.transport.reading


def test_a_tunnel_passes_half_closes_on_and_keeps_its_place_in_maxconn_until_closed(rig):
    client, up = upgraded(rig)
    assert rig.limit.clients == 1 and len(rig.server.tunnels) == 1  # counted from accept, through the switch
    client_end, upstream_end = client.transport.protocol, up.transport.protocol
    assert client_end.eof_received() is True  # the client is done sending: the upstream is told
    assert up.transport.eof_written and not up.transport.closed
    upstream_end.data_received(b"last words")  # the other direction still flows
    assert client.received() == b"last words"
    assert upstream_end.eof_received() is False  # both sides done: the tunnel closes
    assert client.transport.closed and up.transport.closed
    rig.settle()
    assert rig.limit.clients == 0 and not rig.server.tunnels


def test_an_idle_tunnel_is_cut_by_the_tick_after_timeout_tunnel(rig):
    client, up = upgraded(rig)
    now = rig.loop.time()
    rig.server.check_timeouts(now + rig.settings.timeout_tunnel - 1)
    assert not client.transport.closed
    rig.server.check_timeouts(now + rig.settings.timeout_tunnel + 1)
    assert client.transport.aborted and up.transport.aborted
    rig.settle()
    assert rig.limit.clients == 0


# -- the response path's transforms (bound to the exchange when it is routed) -------------------
GZIP = {"serviceName": "gz", "servicePath": "/gz", "compressionAlgo": "gzip", "compressionType": "text/plain"}
EDITS = {"serviceName": "ed", "servicePath": "/ed", "addResHeader": "X-Added yes,X-Client %[src]",
         "setResHeader": "Content-Type text/x-test", "delResHeader": "X-Upstream"}
SLOW = {"serviceName": "slow", "servicePath": "/slow", "timeoutServer": "90"}
GZIP_GET = b"GET /gz HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n\r\n"


@pytest.fixture
def routes():
    r = Rig([DEMO, GZIP, EDITS, SLOW], {"TIMEOUT_SERVER": "20"})
    yield r
    r.close()


def forwarded(rig, request: bytes):
    """(client, upstream) once `request` has reached the upstream."""
    up = rig.idle_upstream()
    client = rig.client()
    client.send(request)
    assert up.received().startswith(request.split(b" ", 2)[0] + b" ")
    return client, up


def dechunk(body: bytes) -> bytes:
    data = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            assert rest == b"\r\n"  # the last chunk, no trailers: the message ends exactly here
            return data
        assert rest[n : n + 2] == b"\r\n"
        data, body = data + rest[:n], rest[n + 2 :]


def test_a_compressed_route_sends_a_valid_gzip_chunked_body_and_the_connection_stays_in_step(routes):
    client, up = forwarded(routes, GZIP_GET)
    text = b"hello, compressed world! " * 200
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(text) + text[:1000])
    up.reply(text[1000:])  # the rest of the body in a later read
    head, body = client.received().split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert b"Content-Encoding: gzip" in lines and b"Transfer-Encoding: chunked" in lines
    assert b"Vary: Accept-Encoding" in lines and not any(line.startswith(b"Content-Length") for line in lines)
    assert gzip.decompress(dechunk(body)) == text
    client.send(b"GET /gz/b HTTP/1.1\r\nHost: h\r\n\r\n")  # no Accept-Encoding: the body passes as sent
    assert up.received().startswith(b"GET /gz/b ")
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
    data = client.received()
    assert data.endswith(b"\r\n\r\nok") and b"Vary: Accept-Encoding" in head_lines(data)


def test_an_empty_compressed_body_is_a_complete_gzip_stream(routes):
    client, up = forwarded(routes, GZIP_GET)
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n")
    head, body = client.received().split(b"\r\n\r\n", 1)
    assert b"Content-Encoding: gzip" in head.split(b"\r\n")
    assert gzip.decompress(dechunk(body)) == b""


def test_a_response_that_breaks_in_its_first_read_on_a_compressed_route_is_a_plain_502(routes):
    client, up = forwarded(routes, GZIP_GET)
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    data = client.received()
    assert data.startswith(b"HTTP/1.1 502 ") and b"Content-Encoding" not in data
    assert up.transport.aborted


def test_response_header_edits_apply_and_the_head_keeps_its_framing(routes):
    client, up = forwarded(routes, b"GET /ed HTTP/1.1\r\nHost: h\r\n\r\n")
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Upstream: secret\r\nConnection: keep-alive\r\n"
             b"Content-Length: 2\r\n\r\nok")
    data = client.received()
    lines = head_lines(data)
    assert b"X-Added: yes" in lines and b"X-Client: 127.0.0.1" in lines and b"Content-Type: text/x-test" in lines
    assert not any(line.lower().startswith((b"x-upstream", b"connection")) for line in lines)
    assert data.endswith(b"\r\n\r\nok") and not client.transport.closed
    client.send(b"GET /ed HTTP/1.0\r\nHost: h\r\n\r\n")  # an HTTP/1.0 client: the edits, and its close
    up.received()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    lines = head_lines(client.received())
    assert b"X-Added: yes" in lines and b"Connection: close" in lines
    assert client.transport.closed


@pytest.mark.parametrize("path, timeout", [("/slow", 90), ("/demo", 20)], ids=["timeoutServer", "TIMEOUT_SERVER"])
def test_the_timeout_scan_uses_the_routes_timeout_server_else_the_default(routes, path, timeout):
    client, up = forwarded(routes, b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path.encode())
    sent = up.conn.last_io
    routes.server.check_upstream_timeouts(sent + timeout - 1)  # (for /slow: long past TIMEOUT_SERVER)
    assert client.received() == b"" and not up.transport.closed
    routes.server.check_upstream_timeouts(sent + timeout + 1)
    assert client.received().startswith(b"HTTP/1.1 504 ") and up.transport.aborted
