"""Rewriting message heads as they cross the proxy (RFC 9110 §7.6, RFC 9112).

Pure functions on bytes, so they are cheap to benchmark and test alone.

Requests: hop-by-hop headers (Connection and every header it names, Keep-Alive, TE,
Trailer, Upgrade, Proxy-*) are dropped, X-Forwarded-For gets the client address
appended and X-Forwarded-Proto set as DFP does (`https` on TLS, else the client's value,
else `http`; from a peer outside TRUSTED_PROXIES, when set, both are replaced: see
forwarded.py); Host and everything else pass unchanged. A
Connection header naming Content-Length, Transfer-Encoding or Host is refused: dropping
a framing header would forward the body as the next request(s) (request smuggling).
Transfer-Encoding stays: pyroute keeps chunked framing end to end (re-framing each
chunk), so the upstream sees the same message framing the client chose.

Responses: forwarded as received when nothing needs removing (the common case,
detected with a few substring tests), else rebuilt line by line. A response whose
Connection header names Content-Length or Transfer-Encoding is malformed (502): without
its framing header the client could not tell where it ends.
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
# The lookahead on the first letter is only for speed: re tries the case-blind alternation at
# every line start, but the lookahead turns most lines (Date, Server, ETag...) away in one test.
_RESPONSE_HEADER = re.compile(
    rb"\n(?=[cCtTkKpPuU])"
    rb"(content-length|transfer-encoding|connection|keep-alive|proxy-[!#$%&'*+.^_`|~0-9a-z-]*|trailer|upgrade|te)[ \t]*:",
    re.I,
)
# Headers a Connection header may not name: the message's framing and its Host are never hop-by-hop.
NEVER_HOP_BY_HOP_REQUEST = frozenset({b"content-length", b"transfer-encoding", b"host"})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_FRAMING_HEADER = re.compile(rb"\n(?:content-length|transfer-encoding)[ \t]*:", re.I)
_CONTENT_LENGTH = (b"Content-Length", b"content-length")
_CHUNKED_LINE = b"\r\nTransfer-Encoding: chunked\r\n"
_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Lower-cased tokens of every Connection header (the header names it makes hop-by-hop)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


class ConnectionNamesFraming(ValueError):
    """A request whose Connection header names Content-Length, Transfer-Encoding or Host (400)."""


REQUEST_LINE_END_11 = b" HTTP/1.1\r\n"
REQUEST_LINE_END_10 = b" HTTP/1.0\r\n"


def request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    client_ip: bytes,
    proto: bytes,
    line_end: bytes = REQUEST_LINE_END_11,
    upgrade: bytes | None = None,
    forwarded: bool = True,
    extra: bytes = b"",
) -> bytes:
    """The head to send upstream, in the client's HTTP version (`line_end`): the one
    builder for every routed request (features only edit `target` and `headers` first).

    An HTTP/1.0 request stays HTTP/1.0 so that the upstream answers in a form an
    HTTP/1.0 client can read (never chunked); such an upstream connection is not reused.
    `upgrade`: the protocol an Upgrade request asks for, passed on with its Connection
    header (the only hop-by-hop pair that is). `forwarded`: the peer may set X-Forwarded-For
    (appended to) and, on plain HTTP, X-Forwarded-Proto (passed on); False: both are replaced.
    `extra`: header lines to add as they are (the request ID's, requestid.py).
    Raises ConnectionNamesFraming (checked only when a Connection header is present).
    """
    parts = [method, b" ", target, line_end]
    forwarded_for = b""
    given_proto = b""
    named: set[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection" and named is None:
                named = connection_tokens(headers)
                if not named.isdisjoint(NEVER_HOP_BY_HOP_REQUEST):
                    raise ConnectionNamesFraming("Connection names a framing header or Host")
            continue
        if lname == _XFF:
            if forwarded:
                forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            continue
        if lname == _XFP:
            if forwarded and not given_proto and proto == b"http":  # TLS here: always https
                given_proto = value
            continue
        if named and lname in named:
            continue
        parts += (name, b": ", value, b"\r\n")
    parts += (
        extra,
        b"X-Forwarded-For: ",
        forwarded_for + b", " + client_ip if forwarded_for else client_ip,
        b"\r\nX-Forwarded-Proto: ",
        given_proto or proto,
        b"\r\n\r\n" if upgrade is None else b"\r\nConnection: upgrade\r\nUpgrade: " + upgrade + b"\r\n\r\n",
    )
    return b"".join(parts)


def forwarded_tail(client_ip: bytes, proto: bytes) -> bytes:
    """The X-Forwarded-For/-Proto lines and the blank line that end a head the client sent
    with neither header (request_head writes the same lines into the heads it rebuilds):
    made once per connection for the heads that go upstream as they came."""
    return b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\n\r\n" % (client_ip, proto)


def inspect_response_head(head: bytes) -> tuple[bool, bytes | None]:
    """(close_delimited, forwardable) for a final response head, from one scan.

    close_delimited: neither Content-Length nor a chunked Transfer-Encoding, so the body
    ends when the upstream closes (the caller rules out HEAD, 204 and 304).
    forwardable: the head fit to go to an HTTP/1.1 keep-alive client: `head` itself when
    nothing needs removing (the common case), else a copy with the hop-by-hop lines cut
    out (e.g. nginx's "Connection: keep-alive"); None when only a full rewrite will do
    (not HTTP/1.1, or a Connection header naming other headers).
    Raises AmbiguousResponse for framing llhttp lets through but a client could read
    differently (two Transfer-Encoding lines; a status line that is not HTTP/1.0 or 1.1;
    a Connection header naming Content-Length or Transfer-Encoding; a Transfer-Encoding
    whose last coding is not chunked).
    """
    names = _RESPONSE_HEADER.findall(head)
    http11 = head[:9] == b"HTTP/1.1 "  # (cheaper than startswith, which parses its arguments)
    if http11:  # the common cases, decided without match objects
        count = len(names)
        if not count:
            return True, head
        # One framing header first: a Content-Length, or a Transfer-Encoding that the one
        # exact "chunked" line must be (the only line the scan matched with that name).
        if names[0] in _CONTENT_LENGTH or names[0] == b"Transfer-Encoding" and head.find(_CHUNKED_LINE) >= 0:
            if count == 1:
                return False, head
            # nginx: and "Connection: keep-alive"; Node.js: and "Keep-Alive: timeout=5" after it.
            node = count == 3 and names[2] == b"Keep-Alive"
            if (count == 2 or node) and names[1] == b"Connection":
                cut = head.replace(b"\r\nConnection: keep-alive\r\n", b"\r\n", 1)
                if len(cut) < len(head):
                    if not node:
                        return False, cut
                    start = cut.find(b"\r\nKeep-Alive:")
                    if start >= 0:
                        return False, cut[:start] + cut[cut.find(b"\r\n", start + 13) :]
    close_delimited = True
    cuts: list[tuple[int, int]] = []
    rewrite = not http11
    if rewrite and not head.startswith(b"HTTP/1.0 "):
        raise AmbiguousResponse("not an HTTP/1.x status line")
    transfer_encoding = False
    for match in _RESPONSE_HEADER.finditer(head):
        name = match.group(1).lower()
        line_end = head.find(b"\r\n", match.end())
        if name == b"content-length":
            close_delimited = False
        elif name == b"transfer-encoding":
            if transfer_encoding:
                raise AmbiguousResponse("Transfer-Encoding given twice")
            transfer_encoding = True
            # RFC 9112 §6.3 makes such a response close-delimited, but pyroute passes bodies on
            # without decoding transfer codings, and a client that reads "xchunked" (or any coding
            # it does not know) differently would lose the message boundary: refused.
            if head[match.end() : line_end].rsplit(b",", 1)[-1].strip().lower() != b"chunked":
                raise AmbiguousResponse("Transfer-Encoding whose last coding is not chunked")
            close_delimited = False
        else:
            if name == b"connection":
                value = head[match.end() : line_end].strip().lower()
                if value not in (b"keep-alive", b"close"):
                    if not _FRAMING.isdisjoint(token.strip() for token in value.split(b",")):
                        raise AmbiguousResponse("Connection names a framing header")
                    rewrite = True
            cuts.append((match.start() - 1, line_end))  # from the CR before the line to its CR
    if rewrite:
        return close_delimited, None
    if not cuts:
        return close_delimited, head
    pieces = []
    previous = 0
    for start, end in cuts:
        pieces.append(head[previous:start])
        previous = end
    pieces.append(head[previous:])
    return close_delimited, b"".join(pieces)


def inspect_interim_head(head: bytes) -> None:
    """A 1xx head has no body (RFC 9110 §8.6, §6.1): one that declares framing is malformed."""
    if _FRAMING_HEADER.search(head):
        raise AmbiguousResponse("1xx response with Content-Length or Transfer-Encoding")


class AmbiguousResponse(ValueError):
    """A response head whose framing pyroute will not pass on (the exchange gets 502)."""


def client_response_head(head: bytes, forwardable: bytes | None, close: bool, http11: bool) -> bytes:
    """The response head as the client gets it, once the exchange's fate is known: `close`
    (the client's connection closes after this response) or keep-alive.

    An HTTP/1.1 client that keeps the connection gets `forwardable` (inspect_response_head's
    verdict; `head` itself when it goes out as received); otherwise the head is rebuilt with
    the Connection header the client's version needs: "close", or for HTTP/1.0 "keep-alive".
    """
    if http11:
        if forwardable is not None and not close:
            return forwardable
        return rewrite_response_head(head, b"close" if close else None)
    return rewrite_response_head(head, b"close" if close else b"keep-alive")


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


def normalize_host(raw: bytes) -> str:
    """Host header value -> lower-case name without the port ("[::1]:80" -> "[::1]")."""
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0] if ":" in host else host
