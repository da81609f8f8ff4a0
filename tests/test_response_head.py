"""Property-based: headers.inspect_response_head's verdict on heads built from generated header
lists (the names that matter, their look-alikes, in any case, duplicated, with the values
that change the verdict), checked against what the header list says, not against another
implementation. Pure code, no process."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyroute.dataplane.headers import AmbiguousResponse, inspect_response_head

HOP_BY_HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"upgrade"}
NAMES = [
    b"Content-Length", b"Transfer-Encoding", b"Connection", b"Keep-Alive", b"TE", b"Trailer", b"Upgrade",
    b"Proxy-Authenticate", b"Proxy-X", b"Content-Type", b"Date", b"Server", b"Set-Cookie",
    b"Tea", b"X-Connection", b"Connections", b"Content-Length-X", b"Keep-Alive-X", b"Upgraded", b"Tee",
]
VALUES = {
    b"content-length": [b"0", b"14", b"5123"],
    b"transfer-encoding": [b"chunked", b"Chunked", b"gzip, chunked", b"gzip", b"xchunked", b"chunked, gzip", b"chunked "],
    b"connection": [b"keep-alive", b"close", b"Keep-Alive", b"CLOSE", b"x-secret", b"close, x-secret",
                    b"content-length", b"close, Transfer-Encoding", b"upgrade"],
}
OTHER_VALUES = [b"", b"timeout=5", b"text/plain", b"nginx/1.22.1", b"a=b; Path=/", b"keep-alive", b"chunked"]


def random_case(draw, name: bytes) -> bytes:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(c ^ 0x20 if flip and chr(c).isalpha() else c for c, flip in zip(name, flips))


@st.composite
def header_lists(draw):
    fields = []
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=8)):
        value = draw(st.sampled_from(VALUES.get(name.lower(), OTHER_VALUES)))
        canonical = draw(st.integers(0, 2))  # mostly as servers send them; else in any case
        fields.append((name if canonical else random_case(draw, name), value))
    return fields


def build(status_line: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    return status_line + b"".join(name + b": " + value + b"\r\n" for name, value in fields) + b"\r\n"


def is_hop_by_hop(name: bytes) -> bool:
    return name.lower() in HOP_BY_HOP or name.lower().startswith(b"proxy-")


def refused(status_line: bytes, fields: list[tuple[bytes, bytes]]) -> bool:
    """The framing a client could read differently (AmbiguousResponse)."""
    if not status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
        return True
    codings = [value for name, value in fields if name.lower() == b"transfer-encoding"]
    if len(codings) > 1 or codings and codings[0].rsplit(b",", 1)[-1].strip().lower() != b"chunked":
        return True
    for name, value in fields:
        if name.lower() == b"connection" and value.strip().lower() not in (b"keep-alive", b"close"):
            if {t.strip() for t in value.lower().split(b",")} & {b"content-length", b"transfer-encoding"}:
                return True
    return False


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 404 Not Found\r\n", b"HTTP/1.0 200 OK\r\n", b"HTTP/2 200\r\n"]),
       header_lists())
def test_verdict_follows_the_header_list(status_line, fields):
    head = build(status_line, fields)
    if refused(status_line, fields):
        with pytest.raises(AmbiguousResponse):
            inspect_response_head(head)
        return
    close_delimited, forwardable = inspect_response_head(head)
    names = [name.lower() for name, _ in fields]
    assert close_delimited == (b"content-length" not in names and b"transfer-encoding" not in names)
    named_others = any(
        name.lower() == b"connection" and value.strip().lower() not in (b"keep-alive", b"close") for name, value in fields
    )
    if status_line.startswith(b"HTTP/1.0 ") or named_others:
        assert forwardable is None
        return
    kept = [(name, value) for name, value in fields if not is_hop_by_hop(name)]
    assert forwardable == build(status_line, kept)
    if len(kept) == len(fields):
        assert forwardable is head  # nothing to cut: no copy


@pytest.mark.parametrize(
    "head, verdict",
    [
        (b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n", (True, b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n")),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\nVary: A\r\n\r\n",
         (False, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nVary: A\r\n\r\n")),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
         (False, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n",
         (False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\nConnection\t: keep-alive\r\n\r\n",  # (llhttp refuses these)
         (False, b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n")),
        (b"HTTP/1.1 200 OK\r\nX: 1\r\nProxy-Foo: 2\r\nTe: trailers\r\n\r\n", (True, b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\n")),
    ],
)
def test_fixed_verdicts(head, verdict):
    assert inspect_response_head(head) == verdict
