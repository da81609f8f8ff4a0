"""Per-route features, compiled into request and response steps when a route table is built.

A route with no feature has empty step tuples and the proxy never calls into this module
for it. A route with features runs its request steps in this fixed phase order (the order
compile_request_steps builds them in):

    access   IP allow/deny lists (403), https/domain redirects (30x), denyHttp and
             method rules (403), basic auth (401; Authorization is not forwarded)
    rewrite  reqPathSearchReplace on the path, request header add/set/del (DFP's order)
    forward  the proxy builds the upstream head from the edited target and headers
             (headers.request_head, as for every route)
    response response header add/set/del, gzip/deflate compression: bound to the exchange
             (ResponseEdit, Compressor) and applied by the client's response path

A request step is ``step(req) -> Reply | None``: a Reply answers the request locally,
None lets the next step run. Steps see one ``FeatureRequest`` and may edit its target
and header list.
"""

from __future__ import annotations

import ipaddress
import os
import re
import zlib
from collections.abc import Callable

import httptools

from pyroute.basicauth import Userlist
from pyroute.dataplane.pages import PAGES, error_response
from pyroute.dataplane.headers import normalize_host
from pyroute.patterns import compile_pattern, compile_replacement, substitute_first
from pyroute.services import ENV, FETCH, REQ_HDR, split_condition

_NOT_IN_VALUE = re.compile(r"[^\t\x20-\x7e]")
UNAUTHORIZED_BODY = (b"<html><body><h1>401 Unauthorized</h1>\nYou need a valid user and password "
                     b"to access this content.\n</body></html>\n")


class FeatureRequest:
    """The request as the steps see and edit it."""

    __slots__ = ("conn", "client_ip", "method", "path", "query", "host", "headers")

    def __init__(self, conn, client_ip: bytes, method: bytes, url: bytes, host: bytes | None,
                 headers: list[tuple[bytes, bytes]]):
        self.conn = conn
        self.client_ip = client_ip  # Exchange.client_ip: the address IP lists and %[src] use
        self.method = method
        q = url.find(b"?")
        self.path, self.query = (url, b"") if q < 0 else (url[:q], url[q:])
        self.host = host
        self.headers = headers

    def header(self, lname: bytes) -> bytes | None:
        for name, value in self.headers:
            if name.lower() == lname:
                return value
        return None

    def local_port(self) -> int:
        sockname = self.conn.transport.get_extra_info("sockname")
        return sockname[1] if sockname else 0


class Reply:
    """A response pyroute gives itself for a feature (401, 403, 30x)."""

    __slots__ = ("status", "extra", "body")

    def __init__(self, status: int, extra: bytes = b"", body: bytes | None = None):
        self.status = status
        self.extra = extra  # complete header lines, CRLF-terminated
        self.body = body

    def encode(self, close: bool, head_only: bool) -> bytes:
        if self.body is None:
            page = error_response(self.status, False) if self.status in PAGES else b"\r\n\r\n"
            body = page[page.index(b"\r\n\r\n") + 4 :]
        else:
            body = self.body
        title = {401: "Unauthorized", 301: "Moved Permanently", 302: "Found", 303: "See Other",
                 307: "Temporary Redirect", 308: "Permanent Redirect"}.get(self.status) or PAGES[self.status][0]
        head = (b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nCache-Control: no-cache\r\n" % (self.status, title.encode(), len(body))
                + (b"Content-Type: text/html\r\n" if body else b"") + self.extra
                + (b"Connection: close\r\n" if close else b"") + b"\r\n")
        return head if head_only else head + body


FORBIDDEN = Reply(403)
REWRITE_FAILED = Reply(500)
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")  # controls and space end or split a request line


# -- header value templates ---------------------------------------------------------------
def compile_value(text: str) -> Callable[[FeatureRequest], bytes] | bytes:
    """A header value: constant bytes, or a function of the request for %[...] fetches."""
    parts: list = []
    last = 0
    for match in FETCH.finditer(text):
        parts.append(text[last : match.start()].encode("latin-1"))
        fetch = match.group(1)
        if fetch == "src":
            parts.append(lambda req: req.client_ip)
        elif fetch == "dst_port":
            parts.append(lambda req: str(req.local_port()).encode())
        elif m := REQ_HDR.match(fetch):
            lname = m.group(1).lower().encode()
            parts.append(lambda req, lname=lname: req.header(lname) or b"")
        else:  # env(NAME), one HEADER_ENV_ALLOW lists (checked at validation), fixed for the life of the table
            value = os.environ.get(ENV.match(fetch).group(1), "")
            parts.append(_NOT_IN_VALUE.sub("", value).encode("ascii"))
        last = match.end()
    parts.append(text[last:].encode("latin-1"))
    if all(isinstance(p, bytes) for p in parts):
        return b"".join(parts)
    return lambda req: b"".join(p if isinstance(p, bytes) else p(req) for p in parts)


def _value(template, req: FeatureRequest) -> bytes:
    return template if isinstance(template, bytes) else template(req)


def _compile_edits(delete, set_, add) -> tuple:
    """Edits in DFP's order (add-header, set-header, del-header): (drop names, additions, tls)
    per op; tls True/False: the op applies only when the client connection is / is not TLS
    (`if { ssl_fc }` / `unless { ssl_fc }`), None: always."""
    ops = []
    for names, edits in ((False, add), (True, set_)):
        for n, text in edits:
            value, tls = split_condition(text)
            ops.append((frozenset({n.lower().encode()}) if names else frozenset(),
                        ((n.encode(), compile_value(value)),), tls))
    if delete:
        ops.append((frozenset(n.lower().encode() for n in delete), (), None))
    return tuple(ops)


def _apply_edits(ops, headers: list, req) -> list:
    for drop, additions, tls in ops:
        if tls is not None and (req.conn.server.proto == b"https") != tls:
            continue
        if drop:
            headers = [(n, v) for n, v in headers if n.lower() not in drop]
        for name, template in additions:
            headers.append((name, _value(template, req)))
    return headers


# -- request steps --------------------------------------------------------------------------
def _ip_step(allowed: tuple[str, ...], denied: tuple[str, ...]):
    allow = tuple(ipaddress.ip_network(n) for n in allowed)
    deny = tuple(ipaddress.ip_network(n) for n in denied)

    def ip_rules(req: FeatureRequest) -> Reply | None:
        try:
            ip = ipaddress.ip_address(req.client_ip.decode())
        except ValueError:
            return FORBIDDEN
        if any(ip in n for n in deny) or (allow and not any(ip in n for n in allow)):
            return FORBIDDEN
        return None

    return ip_rules


def _redirect(code: int, location: bytes) -> Reply:
    return Reply(code, b"Location: " + location + b"\r\n", b"")


def _https_only_step(code: int):
    def https_only(req: FeatureRequest) -> Reply | None:
        if req.conn.server.proto == b"http":
            return _redirect(code, b"https://" + (req.host or b"") + req.path + req.query)
        return None

    return https_only


def _proto_header_step(code: int, redirect_when: bytes | None):
    """redirectWhenHttpProto (X-Forwarded-Proto is http) / redirectUnlessHttpsProto (is not https)."""

    def proto_redirect(req: FeatureRequest) -> Reply | None:
        proto = req.conn.server.proto
        if proto == b"http" and req.conn.forwarded:  # else the header is replaced with this (headers.py)
            proto = (req.header(b"x-forwarded-proto") or b"").strip().lower()
        if (proto == b"http") if redirect_when else (proto != b"https"):
            return _redirect(code, b"https://" + (req.host or b"") + req.path + req.query)
        return None

    return proto_redirect


def _domain_redirect_step(sources: tuple[str, ...], target: str):
    """DFP: ``http-request redirect code 301 prefix http://<first domain> if { hdr_beg(host) -i <from> }``."""
    prefix = b"http://" + target.encode()

    def domain_redirect(req: FeatureRequest) -> Reply | None:
        host = normalize_host(req.host or b"")
        if host.startswith(sources):
            return _redirect(301, prefix + req.path + req.query)
        return None

    return domain_redirect


def _deny_http_step(req: FeatureRequest) -> Reply | None:
    return FORBIDDEN if req.conn.server.proto == b"http" else None


def _method_step(allowed: tuple[str, ...], denied: tuple[str, ...]):
    allow = frozenset(m.encode() for m in allowed)
    deny = frozenset(m.encode() for m in denied)

    def methods(req: FeatureRequest) -> Reply | None:
        if req.method in deny or (allow and req.method not in allow):
            return FORBIDDEN
        return None

    return methods


def _auth_step(users: tuple[tuple[str, str], ...], encrypted: bool, realm: str):
    allows = Userlist(users, encrypted).allows
    challenge = Reply(401, b'WWW-Authenticate: Basic realm="' + realm.encode() + b'"\r\n', UNAUTHORIZED_BODY)

    def basic_auth(req: FeatureRequest) -> Reply | None:
        return None if allows(req.header(b"authorization")) else challenge

    return basic_auth


def _drop_authorization(req: FeatureRequest) -> None:
    """Credentials checked by pyroute are not the upstream's business (DFP: del-header Authorization)."""
    req.headers[:] = [(n, v) for n, v in req.headers if n.lower() != b"authorization"]


def _rewrite_step(rewrites: tuple[tuple[str, str], ...]):
    compiled = []
    for search, replace in rewrites:
        pattern = compile_pattern(search)
        compiled.append((pattern, compile_replacement(replace, pattern)))

    def rewrite_path(req: FeatureRequest) -> Reply | None:
        path = req.path
        for pattern, template in compiled:
            path = substitute_first(pattern, template, path)
        # The operator's rule, not the client, made a target that cannot be sent (too long
        # for MAX_URI_SIZE, not origin-form): 500, as HAProxy answers a failed rewrite in
        # its default strict mode. It is never forwarded.
        if (len(path) + len(req.query) > req.conn.server.max_uri or path[:1] != b"/"
                or _NOT_IN_TARGET.search(path)):
            return REWRITE_FAILED
        req.path = path
        return None

    return rewrite_path


def _request_headers_step(ops):
    def request_headers(req: FeatureRequest) -> None:
        req.headers[:] = _apply_edits(ops, list(req.headers), req)

    return request_headers


def compile_request_steps(service, destination) -> tuple:
    """The request steps of one route, in phase order (empty for a plain route)."""
    d = destination
    steps: list = []
    if d.allowed_ips or d.denied_ips:
        steps.append(_ip_step(d.allowed_ips, d.denied_ips))
    if d.redirect_from and d.domains:
        steps.append(_domain_redirect_step(d.redirect_from, d.domains[0]))
    if d.https_only:
        steps.append(_https_only_step(d.https_redirect_code))
    if service.redirect_when_http_proto:
        steps.append(_proto_header_step(d.https_redirect_code, b"http"))
    elif service.redirect_unless_https_proto:
        steps.append(_proto_header_step(d.https_redirect_code, None))
    if d.deny_http:
        steps.append(_deny_http_step)
    if d.allowed_methods or d.denied_methods:
        steps.append(_method_step(d.allowed_methods, d.denied_methods))
    if not d.ignore_authorization and (service.users or service.global_users):
        # DFP checks the service's userlist, then the global one: credentials must pass both
        if service.users:
            steps.append(_auth_step(service.users, service.users_encrypted, f"{service.name}Realm"))
        if service.global_users:
            steps.append(_auth_step(service.global_users, service.global_users_encrypted, "defaultRealm"))
        steps.append(_drop_authorization)
    if d.path_rewrites:
        steps.append(_rewrite_step(d.path_rewrites))
    ops = _compile_edits(service.req_del, service.req_set, service.req_add)
    if ops:
        steps.append(_request_headers_step(ops))
    return tuple(steps)


# -- response side --------------------------------------------------------------------------
class ResponsePlan:
    """What a route does to responses: header edits and/or compression of some MIME types."""

    __slots__ = ("ops", "dynamic", "compress", "wbits", "types")
    # compressionAlgo -> (the coding a client accepts and the response names, zlib window bits):
    # gzip wrapper, zlib wrapper (HTTP "deflate"), and HAProxy's raw-deflate (no wrapper, sent as "deflate")
    CODINGS = {"gzip": (b"gzip", 31), "deflate": (b"deflate", 15), "raw-deflate": (b"deflate", -15)}

    def __init__(self, service):
        self.ops = _compile_edits(service.res_del, service.res_set, service.res_add)
        self.dynamic = any(tls is not None or any(not isinstance(t, bytes) for _, t in additions)
                           for _, additions, tls in self.ops)  # reads the request (or its connection)
        self.wbits: dict[bytes, int] = {}
        for algo in service.compression_algo.split():
            if algo in self.CODINGS:  # the first algorithm naming a coding wins ("identity" names none)
                self.wbits.setdefault(*self.CODINGS[algo])
        self.compress = tuple(self.wbits)
        self.types = tuple(t.encode() for t in service.compression_types)

    def __bool__(self) -> bool:
        return bool(self.ops or self.compress)

    def edit(self, ex, head: bytes, close_delimited: bool, req: FeatureRequest | None,
             coding: bytes | None) -> tuple[bytes, int]:
        """(the head with the route's edits, zlib window bits to compress the body with or 0).

        Compression adds Vary and swaps the framing headers for Content-Encoding and chunked
        Transfer-Encoding; the header operations come last. The Connection header is not
        decided here: the client's response path does that for every head alike.
        """
        lines = head[:-4].split(b"\r\n")
        fields = []
        for line in lines[1:]:
            colon = line.find(b":")
            fields.append((line[:colon], line[colon + 1 :].strip(b" \t")))
        compressing = False
        if self.compress:
            compressing = self._compressible(lines[0], fields, ex) and not close_delimited
            if compressing or self._type_matches(fields):
                fields = [(n, v) for n, v in fields if n.lower() != b"vary" or b"accept-encoding" not in v.lower()]
                fields.append((b"Vary", b"Accept-Encoding"))
            compressing = compressing and coding is not None
            if compressing:
                fields = [(n, v) for n, v in fields if n.lower() not in (b"content-length", b"transfer-encoding")]
                fields += [(b"Content-Encoding", coding), (b"Transfer-Encoding", b"chunked")]
        fields = _apply_edits(self.ops, fields, req)
        edited = b"\r\n".join([lines[0], *(n + b": " + v for n, v in fields)]) + b"\r\n\r\n"
        return edited, self.wbits[coding] if compressing else 0

    def _type_matches(self, fields) -> bool:
        ctype = next((v for n, v in fields if n.lower() == b"content-type"), None)
        if ctype is None:
            return False
        mime = ctype.split(b";")[0].strip().lower()
        return not self.types or mime in self.types

    def _compressible(self, status_line: bytes, fields, ex) -> bool:
        if ex.is_head or not ex.http11 or status_line[9:12] != b"200":
            return False
        for name, value in fields:
            lname = name.lower()
            if lname == b"content-encoding" or (lname == b"cache-control" and b"no-transform" in value.lower()):
                return False
        return self._type_matches(fields)


class ResponseEdit:
    """A route's ResponsePlan bound to one exchange (Exchange.response_edit): the request its
    header templates read (%[req.hdr(...)]; None when none does) and the coding its client
    accepts (None: the body is not compressed)."""

    __slots__ = ("plan", "request", "coding")

    def __init__(self, plan: ResponsePlan, request: FeatureRequest | None, coding: bytes | None):
        self.plan = plan
        self.request = request
        self.coding = coding

    def head(self, ex, head: bytes, close_delimited: bool) -> tuple[bytes, Compressor | None]:
        """The edited head, and the Compressor its body goes through (None: it passes as sent)."""
        edited, wbits = self.plan.edit(ex, head, close_delimited, self.request, self.coding)
        return edited, Compressor(head, wbits) if wbits else None


def _accepted(value: bytes | None, offered: tuple[bytes, ...]) -> bytes | None:
    """The first of `offered` that Accept-Encoding names (or covers with *) with a q-value above 0."""
    accepted = {}
    for item in (value or b"").lower().split(b","):
        coding, _, params = item.strip().partition(b";")
        q = params.strip()
        try:
            accepted[coding.strip()] = not q.startswith(b"q=") or float(q[2:]) > 0
        except ValueError:
            accepted[coding.strip()] = False
    for coding in offered:
        if accepted.get(coding, accepted.get(b"*", False)):
            return coding
    return None


class Compressor:
    """A response body compressed on its way to the client (Exchange.body_transform).

    The raw upstream body bytes are de-framed by a second llhttp parser, fed the upstream's
    head first so that it knows the framing, and come out as compressed chunks; the last
    chunk follows the end of the upstream's message.
    """

    __slots__ = ("zip", "parser", "done", "ready")

    def __init__(self, head: bytes, wbits: int):
        self.zip = zlib.compressobj(6, zlib.DEFLATED, wbits)
        self.ready: list[bytes] = []  # chunks made since the last take()
        self.done = False
        self.parser = httptools.HttpResponseParser(self)
        self.parser.feed_data(head)  # an empty body ends here already (done)

    def feed(self, data: bytes) -> bytes:
        """The chunks these raw body bytes complete (b"" while zlib holds them)."""
        self.parser.feed_data(data)
        return self.take()

    def take(self) -> bytes:
        ready = b"".join(self.ready)
        self.ready.clear()
        return ready

    def on_body(self, body: bytes) -> None:
        chunk = self.zip.compress(body) + self.zip.flush(zlib.Z_SYNC_FLUSH)
        if chunk:
            self.ready.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))

    def on_message_complete(self) -> None:
        tail = self.zip.flush()
        self.ready.append(b"%x\r\n%b\r\n0\r\n\r\n" % (len(tail), tail))
        self.done = True
        self.parser = None  # (it holds our bound callbacks: no cycle left for the collector)


def run(conn, ex, route, method: bytes, url: bytes, host: bytes | None, headers) -> FeatureRequest | None:
    """The proxy's hook for a route with features: run the request steps and bind the
    route's response edits to the exchange. Returns the request as the steps left it
    (target and headers for the upstream head), or None when a step answered it
    (ex.local and ex.reply are set)."""
    req = FeatureRequest(conn, ex.client_ip, method, url, host, headers)
    for step in route.request_steps:
        reply = step(req)
        if reply is not None:
            ex.local = reply.status
            ex.reply = reply
            return None
    plan = route.response_plan
    if plan:
        coding = _accepted(req.header(b"accept-encoding"), plan.compress) if plan.compress else None
        ex.response_edit = ResponseEdit(plan, req if plan.dynamic else None, coding)
    return req
