"""Rewriting message heads as they cross the proxy (RFC 9110 §7.6, RFC 9112).

Pure functions on bytes, so they are cheap to benchmark and test alone.

Requests: hop-by-hop headers (Connection and every header it names, Keep-Alive, TE,
Trailer, Upgrade, Proxy-*) are dropped, X-Forwarded-For gets the client address
appended and X-Forwarded-Proto is set; Host and everything else pass unchanged.
Transfer-Encoding stays: pyroute keeps chunked framing end to end (re-framing each
chunk), so the upstream sees the same message framing the client chose.

Responses: forwarded as received when nothing needs removing (the common case,
detected with a few substring tests), else rebuilt line by line.
"""

from __future__ import annotations

import re

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# A response head in which this finds nothing needs no edit (one C-level scan, ~0.3 us).
_HOP_BY_HOP_LINE = re.compile(rb"\n(?:connection|keep-alive|proxy-[!#$%&'*+.^_`|~0-9a-z-]*|trailer|upgrade|te)[ \t]*:", re.I)
_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Lower-cased tokens of every Connection header (the header names it makes hop-by-hop)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


REQUEST_LINE_END_11 = b" HTTP/1.1\r\n"
REQUEST_LINE_END_10 = b" HTTP/1.0\r\n"


def request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    client_ip: bytes,
    proto: bytes,
    line_end: bytes = REQUEST_LINE_END_11,
) -> bytes:
    """The head to send upstream, in the client's HTTP version (`line_end`).

    An HTTP/1.0 request stays HTTP/1.0 so that the upstream answers in a form an
    HTTP/1.0 client can read (never chunked); such an upstream connection is not reused.
    """
    parts = [method, b" ", target, line_end]
    forwarded_for = b""
    named: set[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection" and named is None:
                named = connection_tokens(headers)
            continue
        if lname == _XFF:
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            continue
        if lname == _XFP:
            continue
        if named and lname in named:
            continue
        parts += (name, b": ", value, b"\r\n")
    parts += (
        b"X-Forwarded-For: ",
        forwarded_for + b", " + client_ip if forwarded_for else client_ip,
        b"\r\nX-Forwarded-Proto: ",
        proto,
        b"\r\n\r\n",
    )
    return b"".join(parts)


def response_head_as_is(head: bytes) -> bool:
    """True when an HTTP/1.1 response head carries no hop-by-hop header to remove."""
    return head.startswith(b"HTTP/1.1 ") and _HOP_BY_HOP_LINE.search(head) is None


def rewrite_response_head(head: bytes, connection: bytes | None, drop_chunked: bool = False) -> bytes:
    """Rebuild a response head: HTTP/1.1 status line, hop-by-hop headers removed,
    `connection` (e.g. b"close" or b"keep-alive") added when given, and
    Transfer-Encoding removed when the body goes out de-chunked (HTTP/1.0 client)."""
    lines = head[:-4].split(b"\r\n")
    status_line = lines[0]
    if not status_line.startswith(b"HTTP/1.1 "):
        status_line = b"HTTP/1.1" + status_line[status_line.find(b" ") :]
    fields = []
    for line in lines[1:]:
        colon = line.find(b":")
        fields.append((line[:colon], line[colon + 1 :].strip(b" \t")))
    named = connection_tokens(fields)
    parts = [status_line, b"\r\n"]
    for name, value in fields:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in named or lname.startswith(b"proxy-"):
            continue
        if drop_chunked and lname == b"transfer-encoding":
            continue
        parts += (name, b": ", value, b"\r\n")
    if connection:
        parts += (b"Connection: ", connection, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
