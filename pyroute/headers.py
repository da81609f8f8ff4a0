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
# Response headers that decide framing or must not be forwarded (one C-level scan of the head).
_RESPONSE_HEADER = re.compile(
    rb"\n(content-length|transfer-encoding|connection|keep-alive|proxy-[!#$%&'*+.^_`|~0-9a-z-]*|trailer|upgrade|te)[ \t]*:",
    re.I,
)
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
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


def inspect_response_head(head: bytes) -> tuple[bool, bool]:
    """(close_delimited, as_is) for a final response head.

    close_delimited: neither Content-Length nor a chunked Transfer-Encoding, so the body
    ends when the upstream closes (the caller rules out HEAD, 204 and 304).
    as_is: an HTTP/1.1 head with no hop-by-hop header, fit to forward unchanged.
    """
    names = _RESPONSE_HEADER.findall(head)
    http11 = head.startswith(b"HTTP/1.1 ")
    if len(names) == 1 and names[0] in (b"Content-Length", b"content-length"):  # the common case
        return False, http11
    lowered = [name.lower() for name in names]
    as_is = http11 and all(name in _FRAMING for name in lowered)
    if b"content-length" in lowered:
        return False, as_is
    if b"transfer-encoding" in lowered:
        lower = head.lower()
        at = lower.rfind(b"\ntransfer-encoding:")
        return not lower[at : lower.find(b"\r\n", at)].rstrip().endswith(b"chunked"), as_is
    return True, as_is


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
