"""Property-based: hypothesis generates request heads and bodies, valid and not, against a
live pyroute. Whatever arrives, pyroute answers well-formed HTTP/1.1 responses or closes,
stays up, leaks no file descriptor, and forwards only messages the strict h11 upstream
accepts (autouse fixture `no_upstream_protocol_errors`). FUZZ_EXAMPLES raises the count."""
import os
import socket

import httptools
from hypothesis import HealthCheck, given, settings, strategies as st

from support.upstream import wait_until

PYROUTE_ENV = {"TIMEOUT_HTTP_REQUEST": "0.5", "TIMEOUT_CLIENT": "0.5", "MAX_HEADERS": "30", "MAX_URI_SIZE": "512"}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
END = b"GET /fz/hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"

token = st.text("abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789!#$%&'*+.^_`|~", min_size=1, max_size=12)
value_text = st.text("abcdefghijklmnopqrstuvwxyz ABC0123456789-_.,;:=/\"'()", max_size=20).map(lambda v: v.strip())
any_bytes = st.binary(max_size=24)


def mostly(valid, hostile):
    """The valid strategy 14 times in 15, so that many requests get deep enough to be forwarded."""
    return st.integers(0, 14).flatmap(lambda n: hostile if n == 0 else valid)


methods = mostly(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]),
                 st.sampled_from([b"CONNECT", b"get", b"G ET", b"", b"HEAD\x00"]))
targets = mostly(
    st.builds(lambda p: b"/fz/" + p.encode(), st.text("abc/%?=&.-_~;:@!$'()*+,", max_size=30)),
    st.one_of(st.sampled_from([b"*", b"http://a/fz/x", b"a:80", b"/fz/\x00", b"/fz/ x", b"", b"/fz/" + b"a" * 600]),
              any_bytes))
versions = mostly(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]),
                  st.sampled_from([b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1.1 ", b"http/1.1", b""]))
line_ends = mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\r\n "]))
plain_headers = st.tuples(token.map(str.encode), value_text.map(str.encode))
hostile_headers = st.tuples(
    st.one_of(st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade",
                               b"Expect", b"Transfer-Encoding ", b" Host", b"Content-Length\t", b"TE"]), any_bytes),
    st.one_of(st.sampled_from([b"chunked", b"gzip, chunked", b"identity", b"0", b"5", b"-1", b"+3", b"0x10",
                               b"3, 3", b"close", b"upgrade", b"websocket", b"100-continue", b"\tchunked",
                               b"chunked\r\n x"]), any_bytes))
headers = st.lists(mostly(plain_headers, hostile_headers), max_size=6)
framings = mostly(st.sampled_from(["none", "length", "chunked"]), st.sampled_from(["wrong length", "bad chunks"]))


@st.composite
def requests(draw):
    eol = draw(line_ends)
    head = draw(methods) + b" " + draw(targets) + b" " + draw(versions) + eol
    if draw(mostly(st.just(True), st.just(False))):
        head += b"Host: a" + eol
    for name, value in draw(headers):
        head += name + b": " + value + eol
    body = draw(any_bytes)
    framing = draw(framings)
    if framing == "length":
        head += b"Content-Length: %d" % len(body) + eol
    elif framing == "wrong length":
        head += b"Content-Length: %d" % draw(st.integers(0, 40)) + eol
    elif framing == "chunked":
        head += b"Transfer-Encoding: chunked" + eol
        body = b"%x;e=1\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\nT: 1\r\n\r\n"
    elif framing == "bad chunks":
        head += b"Transfer-Encoding: chunked" + eol
        body = draw(st.sampled_from([b"zz\r\n" + body, b"%x\r\n%b" % (len(body) + 3, body), b"3\nabc\n0\n\n"]))
    else:
        body = b""
    return head + eol + body


def responses_are_well_formed(data: bytes) -> None:
    """Every byte pyroute sent parses as a sequence of HTTP/1.1 responses (the last may be cut
    by a reset only if it was pyroute's own abort of a streamed response)."""
    class Sink:
        def __init__(self):
            self.complete = 0

        def on_message_complete(self):
            self.complete += 1

    sink = Sink()
    parser = httptools.HttpResponseParser(sink)
    parser.feed_data(data)   # raises on anything malformed
    assert data.count(b"HTTP/1.1 ") >= sink.complete
    assert not data or data.startswith(b"HTTP/1.1 ")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_fuzzed_requests(proxy, dns, replicas):
    up = replicas[0]
    dns.set_service("fz", up.ip)
    proxy.reconfigure(serviceName="fz", servicePath="/fz", port=up.port)
    assert proxy.get("/fz/hello")[0] == 200      # warm: the pooled upstream connection exists
    baseline = fd_count(proxy.proc.pid)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests())
    def one(data):
        s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=15)
        got = b""
        try:
            s.sendall(data + END)
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
        finally:
            s.close()
        responses_are_well_formed(got)
        assert proxy.alive(), proxy.log()

    one()
    assert len(up.requests("/fz/")) > 10   # the generator does reach the upstream
    assert proxy.alive()
    # every client connection is gone; the pool holds no more upstream connections than before
    wait_until(lambda: fd_count(proxy.proc.pid) <= baseline, timeout=10,
               what=f"pyroute back to {baseline} fds")
