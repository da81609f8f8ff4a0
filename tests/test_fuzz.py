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
any_bytes = st.binary(max_size=24)
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"get", b"G ET", b""])
targets = st.one_of(
    st.builds(lambda p: b"/fz/" + p.encode(), st.text("abc/%?=&.-_~;:@!$'()*+,", max_size=30)),
    st.sampled_from([b"*", b"http://a/fz/x", b"a:80", b"/fz/\x00", b"/fz/ x", b"", b"/fz/" + b"a" * 600]),
    any_bytes,
)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1.1 ", b"http/1.1", b""])
header_names = st.one_of(
    st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"Expect",
                     b"Transfer-Encoding ", b" Host", b"Content-Length\t", b"X-Forwarded-For", b"TE"]),
    token.map(str.encode),
    any_bytes,
)
header_values = st.one_of(
    st.sampled_from([b"a", b"chunked", b"gzip, chunked", b"identity", b"0", b"5", b"-1", b"+3", b"0x10", b"3, 3",
                     b"close", b"keep-alive", b"upgrade", b"websocket", b"100-continue", b"\tchunked", b"chunked\r\n x"]),
    st.integers(0, 40).map(lambda n: str(n).encode()),
    any_bytes,
)
line_ends = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


@st.composite
def requests(draw):
    eol = draw(line_ends)
    head = draw(methods) + b" " + draw(targets) + b" " + draw(versions) + eol
    if draw(st.booleans()):
        head += b"Host: a" + eol
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=6)):
        head += name + b": " + value + eol
    body = draw(any_bytes)
    if draw(st.booleans()):   # a chunked body, well-formed or not
        body = draw(st.sampled_from([b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body), b"%x\r\n%b\r\n" % (len(body), body),
                                     b"zz\r\n" + body, b"%x;e=1\r\n%b\r\n0\r\nT: 1\r\n\r\n" % (len(body), body)]))
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
    assert proxy.alive()
    # every client connection is gone, and at most the pool's idle upstream connections remain
    wait_until(lambda: fd_count(proxy.proc.pid) <= baseline + 2, timeout=10,
               what=f"pyroute's fds back near {baseline}")
