"""The client side of the data plane: one ClientConnection per accepted socket.

Each request becomes an Exchange (exchange.py). Exchanges queue in arrival order
(pipelining) and only the head of the queue talks to an upstream, so responses leave in
request order. The request head is routed and rewritten once, at the end of the head,
where the route's response transforms are bound to the exchange; body chunks are
streamed to the upstream as they arrive (buffered, bounded, only while the upstream
connection is being opened). Response bytes come back through ``out``/``flush()``, one
write per upstream read; the connection is the upstream's ExchangeOwner, and its
response path (response_head, response_body) is the one place a response is edited.
Backpressure pauses reading on the opposite side; nothing is buffered whole.

No Task is created unless a request must wait (DNS miss, pool empty). Timeouts are
checked by the server's periodic tick against timestamps the hot path merely stores.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import deque

import httptools

from pyroute.dataplane import features
from pyroute.dataplane.balancer import sticky_cookie
from pyroute.dataplane.clock import clock
from pyroute.dataplane.exchange import UNLIMITED, Exchange
from pyroute.dataplane.forwarded import forwarded_client, is_trusted
from pyroute.dataplane.flow import PEER_FULL, ReadPauses
from pyroute.dataplane.pages import error_head_only, error_response
from pyroute.dataplane.limits import AddressLimit, body_too_slow
from pyroute.dataplane.requestid import RequestIds
from pyroute.dataplane.headers import (
    HOP_BY_HOP,
    REQUEST_LINE_END_10,
    REQUEST_LINE_END_11,
    client_response_head,
    forwarded_tail,
    inspect_response_head,
    request_head,
)
from pyroute.resolver import ResolveError
from pyroute.dataplane.routing import RouteTable
from pyroute.dataplane.servicelimits import LimitReached
from pyroute.dataplane.tunnel import Tunnel
from pyroute.dataplane.upstream import CHUNK_END, ExchangeOwner, ResponseRetried, UpstreamConnection, UpstreamPool

log = logging.getLogger("pyroute.dataplane.client")

MAX_PENDING_BODY = 256 * 1024  # body bytes buffered while the upstream connection opens
MAX_REPLAY_BODY = 64 * 1024  # body bytes kept to retry a request sent on a reused connection
HEAD_LINE_ROOM = 64  # raw bytes per head line beyond the limits' count: method, version, ": ", CRLF
CRLF = b"\r\n"  # the blank line that ends a head

# Why reading from the client is paused (a bit each, reading resumes when none is left: flow.py).
PAUSE_UPSTREAM = PEER_FULL  # the upstream's socket buffer is full
PAUSE_PIPELINE = 2  # a later request waits behind the one in flight
PAUSE_BUFFER = 4  # too much body buffered while connecting
PAUSE_UPGRADE = 8  # an Upgrade request waits for the upstream's 101 (or its refusal)
PAUSE_CLOSING = 16  # the last request asked to close: nothing more is read
CLOSED_CONNECTION = "Data after `Connection: close`"  # llhttp's error for bytes after such a request
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: closing sends a TCP reset
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))  # RFC 9110 §9.2.2: retryOn=503
# Request header names the upstream never gets as the client sent them: hop-by-hop ones and
# X-Forwarded-For/-Proto. A head with one goes through headers.request_head, which rebuilds it;
# a head without goes upstream as it came, its X-Forwarded-* lines added (_route).
EDITED = HOP_BY_HOP | {b"x-forwarded-for", b"x-forwarded-proto"}
# The lengths of every name on_header looks at (these, Host, the framing headers; the request
# ID's is added per server): a name of another length is passed over with one set lookup.
WATCHED_SIZES = frozenset(len(name) for name in (*EDITED, b"host", b"content-length", b"transfer-encoding"))


class ClientLimit:
    """MAXCONN for one process: the open client sockets of every public listener, HTTP and
    HTTPS alike, tunnels included. Reaching it calls on_full (the listeners stop accepting,
    new connections wait in the kernel's backlog); dropping below calls on_room.
    MAXCONN_PER_IP (`addresses`) refuses a connection whose client address has that many."""

    __slots__ = ("maxconn", "clients", "full", "on_full", "on_room", "addresses")

    def __init__(self, maxconn: int, maxconn_per_ip: int = 0):
        self.maxconn = maxconn
        self.clients = 0
        self.full = False
        self.on_full = self.on_room = lambda: None
        self.addresses = AddressLimit(maxconn_per_ip)

    def opened(self, address: bytes) -> bool:
        """Count a new client connection; False (not counted: close it) over MAXCONN_PER_IP."""
        if not self.addresses.admit(address):
            return False
        self.clients += 1
        if self.clients >= self.maxconn and not self.full:
            self.full = True
            self.on_full()
        return True

    def closed(self, address: bytes) -> None:
        self.addresses.release(address)
        self.clients -= 1
        if self.full and self.clients < self.maxconn:
            self.full = False
            self.on_room()

    def set_maxconn(self, maxconn: int) -> None:
        """A new MAXCONN (SIGHUP) may fill or free the process at once."""
        self.maxconn = maxconn
        full = self.clients >= maxconn
        if full != self.full:
            self.full = full
            self.on_full() if full else self.on_room()


class ProxyServer:
    """What every client connection shares: the current route table, the pool, settings."""

    def __init__(self, settings, loop: asyncio.AbstractEventLoop, pool: UpstreamPool, table: RouteTable,
                 unrouted, access_log=None, limit: ClientLimit | None = None):
        self.settings = settings
        self.loop = loop
        self.pool = pool
        self.table = table
        self.connections: set[ClientConnection] = set()
        self.tunnels: set[Tunnel] = set()
        self.proto = b"http"
        self.unrouted = unrouted  # metrics.ServiceStats of requests no route took
        self.access_log = access_log  # accesslog.AccessLog, or None when off
        self.accepted = 0
        self.closed_received = 0  # bytes of connections already closed
        self.closed_sent = 0
        self.limit = limit or ClientLimit(settings.maxconn, settings.maxconn_per_ip)  # shared by the process's ProxyServers
        self.configure(settings)

    def configure(self, settings) -> None:
        """Take new settings (start, SIGHUP): limits are read from here by every request."""
        self.settings = settings
        self.max_uri = settings.max_uri_size
        self.max_header_size = settings.max_header_size
        self.max_headers = settings.max_headers
        self.max_body = settings.max_request_body or UNLIMITED
        self.trusted_proxies = settings.trusted_proxies  # (forwarded.py) () = DFP's default
        # llhttp's caller holds an unfinished head line whole until it ends, so raw head (and
        # trailer) bytes are counted as they arrive and refused past what the limits allow.
        self.max_head_bytes = (settings.max_uri_size + settings.max_header_size
                               + HEAD_LINE_ROOM * (settings.max_headers + 1))
        self.pool.connect_timeout = settings.timeout_connect
        self.request_ids = (RequestIds(settings.request_id_header if settings.request_id else None,
                                       settings.traceparent == "generate")
                            if settings.request_id or settings.traceparent == "generate" else None)
        ids = self.request_ids
        self.watched_sizes = WATCHED_SIZES | {len(ids.lower)} if ids is not None and ids.lower else WATCHED_SIZES

    def factory(self) -> ClientConnection:
        return ClientConnection(self)

    def check_timeouts(self, now: float) -> None:
        """Called by the server's tick: enforce the client-side and tunnel timeouts."""
        for conn in list(self.connections):
            conn.check_timeouts(now)
        for tunnel in list(self.tunnels):
            tunnel.check_timeout(now)

    def check_upstream_timeouts(self, now: float) -> None:
        """Called by the server's tick, once for the pool the HTTP and HTTPS servers share:
        TIMEOUT_SERVER (or the route's timeoutServer), then the idle-connection sweep."""
        default = self.settings.timeout_server
        for upstream in list(self.pool.busy):  # each bound to an exchange (UpstreamConnection.bind)
            timeout = upstream.exchange.route.destination.timeout_server or default
            if now - upstream.last_io > timeout:
                owner = upstream.owner
                upstream.stats.timeouts += 1
                upstream.abort()
                if owner is not None:
                    owner.response_failed(upstream, "upstream timeout", retryable=False, status=504)
        self.pool.sweep(now)


class ClientConnection(ReadPauses, asyncio.Protocol, ExchangeOwner):
    """One accepted client socket: parses its requests, routes them, and owns their
    exchanges (the ExchangeOwner of the upstream connections bound to them)."""

    __slots__ = (
        "server", "loop", "pool", "transport", "parser", "client_ip", "url", "headers", "host", "chunked",
        "length", "head_size", "queue", "reading", "in_head", "head_started", "last_io", "paused",
        "out", "served", "closed", "received", "sent", "sent_mark", "received_mark", "upgrade",
        "head_bytes", "in_trailers", "trailers_at", "connection_header", "peer_trusted", "forwarded",
        "id_header", "id_header_seen", "edited", "raw", "forward_tail", "watched_sizes",
    )

    def __init__(self, server: ProxyServer):
        self.server = server
        self.loop = server.loop
        self.pool = server.pool
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""  # set before connection_made when a PROXY header gave it
        self.queue: deque[Exchange] = deque()
        self.reading: Exchange | None = None  # the exchange whose request body is being read
        self.in_head = False
        self.head_started = 0.0  # when the head (or the trailer section) being read began
        self.head_bytes = 0  # raw bytes of that head (or trailer section) so far
        self.in_trailers = False  # a chunked body's last chunk came: its trailers are being read
        self.trailers_at = 0  # the body's body_left when they began
        self.last_io = 0.0
        self.paused = 0
        self.out: list[bytes] = []  # response bytes to write at the next flush()
        self.served = 0
        self.closed = False
        self.received = 0  # bytes read from / written to the client, for metrics
        self.sent = 0
        self.received_mark = 0  # the counts when the last exchange finished
        self.sent_mark = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.chunked = False
        self.length = 0
        self.head_size = 0
        self.upgrade: bytes | None = None  # the Upgrade header of the head being read
        self.connection_header = False  # the head being read has a Connection or Proxy-Connection header
        self.peer_trusted = False  # the peer is one of TRUSTED_PROXIES (forwarded.py)
        self.forwarded = True  # the peer may set X-Forwarded-For/-Proto (TRUSTED_PROXIES empty, or trusted)
        request_ids = server.request_ids
        # The request ID's header, lowercase, noted as the head is parsed (requestid.py: tag()
        # looks for the client's ID only when it came).
        self.id_header = request_ids.lower if request_ids is not None else None
        self.id_header_seen = False
        self.watched_sizes = server.watched_sizes
        self.edited = False  # the head being read has a header the upstream must not get as is
        self.raw: bytes | None = None  # the read a head began with at its first byte, else None
        self.forward_tail = b""  # X-Forwarded-For/-Proto lines and the head's end (connection_made)

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.client_ip:
            peer = transport.get_extra_info("peername")
            self.client_ip = peer[0].encode() if peer else b"unknown"
        self.last_io = clock()
        server = self.server
        if server.trusted_proxies:
            self.forwarded = self.peer_trusted = is_trusted(self.client_ip, server.trusted_proxies)
        self.forward_tail = forwarded_tail(self.client_ip, server.proto)
        if not self._register():  # MAXCONN_PER_IP: closed at once, as HAProxy's
            self.parser = None  # `tcp-request connection reject`; connection_lost then has nothing to undo
            self.closed = True
            log.info("refusing a connection from %s: MAXCONN_PER_IP reached", self.client_ip.decode())
            transport.abort()
            return

    def _register(self) -> bool:
        """Count this client socket (MAXCONN, MAXCONN_PER_IP) and track it; False: refused.
        (An HTTP/2 stream, http2.StreamSide, is counted by its connection instead.)"""
        server = self.server
        if not server.limit.opened(self.client_ip):
            return False
        server.connections.add(self)
        server.accepted += 1
        return True

    def _unregister(self) -> None:
        """Undo _register at close, and keep the bytes this socket moved."""
        server = self.server
        server.connections.discard(self)
        server.limit.closed(self.client_ip)
        server.closed_received += self.received
        server.closed_sent += self.sent

    def data_received(self, data: bytes) -> None:
        self.last_io = now = clock()
        size = len(data)
        self.received += size
        if self.in_head or self.in_trailers:
            self.head_bytes += size
            self.raw = None
        elif self.reading is None:  # these bytes start a request head
            self.in_head = True
            self.head_started = now
            self.head_bytes = size
            self.raw = data
        else:
            self.raw = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._after_upgrade(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            if self.closed:  # a local answer closed the connection mid-read: the rest is not parsed
                return
            refused = exc.__context__  # what a callback raised: _Refused(status), else 400 (e.g. a ValueError)
            if refused is None and str(exc) == CLOSED_CONNECTION:
                return self._pause(PAUSE_CLOSING)  # answer what came before, then close; ignore the rest
            self._refuse(refused.status if isinstance(refused, _Refused) else 400, str(exc))
        else:
            if self.in_head:  # still unfinished after this read
                if self.head_bytes > self.server.max_head_bytes:
                    self._refuse(431, "request head too large")
            elif self.reading is not None and self.reading.chunked:
                self._watch_trailers(self.reading, now)

    def _watch_trailers(self, ex: Exchange, now: float) -> None:
        """After a read of a chunked body: no data since the last chunk-size line means the last
        chunk came and trailers are arriving (or a chunk's data is late). Those bytes get a head's
        limit and deadline (TIMEOUT_HTTP_REQUEST), not TIMEOUT_CLIENT that every byte renews."""
        if ex.chunk_mark != ex.body_left:  # data followed the last chunk-size line
            self.in_trailers = False
        elif not self.in_trailers or self.trailers_at != ex.body_left:
            self.in_trailers = True
            self.trailers_at = ex.body_left
            self.head_started = now
            self.head_bytes = 0  # (counted from the next read: this one held the last chunk)
        elif self.head_bytes > self.server.max_head_bytes:
            self._refuse(400, "chunk trailers too large")

    def eof_received(self) -> bool:
        """The client half-closed (shutdown(SHUT_WR), `nc -N`): the requests it sent whole are
        answered, then the connection closes. With nothing to answer, a request cut short or an
        upgrade pending (a tunnel would never see this end), it closes now; and on TLS, whose
        transports close on EOF whatever this returns (and log a warning for True)."""
        queue = self.queue
        if self.closed or not queue or self.reading is not None or queue[-1].upgrade is not None:
            return False
        if self.transport.get_extra_info("sslcontext") is not None:
            return False
        self._close_after_queue()
        return True

    def connection_lost(self, exc) -> None:
        if self.parser is None:
            return  # refused in connection_made: never counted
        self.closed = True
        self.parser = None  # it holds our bound callbacks: without the cycle we die by refcount
        self._unregister()
        if self.queue:  # requests that never got (all of) their response
            now = clock()
            for ex in self.queue:
                self._account(ex, ex.status, ex.broken or "CD", now)
        for ex in self.queue:
            if ex.upstream is not None:
                ex.upstream.abort()  # mid-exchange: the upstream connection cannot be reused
                ex.upstream = None
        self.queue.clear()
        self.reading = None

    def pause_writing(self) -> None:
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.transport.resume_reading()

    # -- httptools request callbacks ---------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.server.max_uri:
            raise _Refused(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        # llhttp has already refused CL+TE, a second or malformed Content-Length, a
        # Transfer-Encoding whose last coding is not chunked, folding and bad characters.
        if size in self.watched_sizes:  # (most names are none of these: one set lookup)
            lname = name.lower()
            if lname == b"host":
                if self.host is not None:
                    raise _Refused(400)  # two Host headers: which one did the client mean?
                self.host = value
            elif lname == b"content-length":
                self.length = int(value)
            elif lname == b"transfer-encoding":
                if value.lower() != b"chunked":
                    raise _Refused(400)  # "gzip, chunked" and the like: no upstream is known to decode them
                self.chunked = True
            elif lname in EDITED:  # hop-by-hop, X-Forwarded-*: the head is rebuilt (headers.request_head)
                self.edited = True
                if lname == b"upgrade":
                    self.upgrade = value
                elif lname == b"connection" or lname == b"proxy-connection":
                    self.connection_header = True  # (llhttp reads both for keep-alive)
            if lname == self.id_header:
                self.id_header_seen = self.edited = True
        headers = self.headers
        headers.append((name, value))
        self.head_size += size + len(value)
        server = self.server
        if self.head_size > server.max_header_size or len(headers) > server.max_headers:
            raise _Refused(431)

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        server = self.server
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        # llhttp accepts HTTP/0.9, 1.0, 1.1 and 2.0 only, and keeps a connection alive without a
        # Connection (or Proxy-Connection, which it reads alike) header for 1.1 only: then the
        # version is known without get_http_version()'s string formatting.
        version = "1.1" if keep_alive and not self.connection_header else parser.get_http_version()
        http11 = version == "1.1"
        url = self.url
        host = self.host
        headers = self.headers
        chunked = self.chunked
        length = self.length
        upgrade = self.upgrade
        raw = self.raw
        if raw is not None:
            # The head as sent, if it can go upstream so: no header to edit, and the request
            # line as llhttp read it ("M SP target SP HTTP/1.x CRLF": its first CRLF there means
            # no empty line before it and single spaces). llhttp takes no CR but in a CRLF and
            # no empty line inside a head, so the head ends at the first CRLF CRLF.
            if self.edited or raw.find(b"\r\n") != len(method) + len(url) + 10:
                raw = None
            else:
                raw = raw[: raw.find(b"\r\n\r\n") + 4]
        id_header_seen = self.id_header_seen
        ex = Exchange(keep_alive, http11, method, url, chunked, chunked or length > 0, self.head_started, self.last_io,
                      forwarded_client(headers, self.client_ip, server.trusted_proxies) if self.peer_trusted
                      else self.client_ip)
        access_log = server.access_log
        if access_log is not None and access_log.wants_headers:
            ex.log_headers = headers  # (Referer and User-Agent for the combined log format)
        self.reading = ex
        queue = self.queue
        queue.append(ex)
        # Ready for the next head (no on_message_begin callback: it costs a call per request).
        self.url = b""
        self.headers = []
        self.host = self.raw = None
        self.chunked = self.connection_header = self.edited = self.id_header_seen = False
        self.length = self.head_size = 0
        if host is None or not http11 or upgrade is not None:  # the unusual heads, checked off the fast path
            self.upgrade = None
            if upgrade is not None and not parser.should_upgrade():
                upgrade = None  # Upgrade without "Connection: upgrade": a plain request, header dropped
            ex.local = _unusual_head(version, host, upgrade, ex, method)
            if ex.local:
                ex.keep_alive = False
        if ex.local or method == b"CONNECT" or not url or url[0] != 47:  # (47: "/", an origin-form target)
            target = self._other_target(ex, method, url, host, headers)
            if target is not None:
                url, path, host, headers = target
                raw = None
        else:
            path = url.partition(b"?")[0]
        if not ex.local:
            self._route(ex, method, url, path, host, headers, raw, upgrade, id_header_seen, length)
        if len(queue) > 1:
            self._pause(PAUSE_PIPELINE)
            return
        if ex.local:
            self._respond_locally(ex, ex.local)
            if self.closed:  # llhttp would go on with the rest of the read: nothing after a refusal
                raise _Closed  # may reach an upstream
            return
        # The fast path, inline: a cached address and a pooled connection.
        address = ex.route.backend.address()
        if address is not None:
            upstream = self.pool.acquire(address)
            if upstream is not None:
                ex.upstream = upstream
                ex.address = address
                ex.sent_at = now = ex.head_done
                upstream.bind(self, ex, now)
                upstream.transport.write(ex.head)
                if ex.has_body:  # a pooled connection may turn out closed: keep the body to retry
                    ex.replay = _replay_buffer(ex, True)
                return
        self.loop.create_task(self._connect(ex, address))

    def _other_target(self, ex: Exchange, method: bytes, url: bytes, host: bytes | None,
                      headers: list) -> tuple[bytes, bytes, bytes | None, list] | None:
        """A head refused already (ex.local), CONNECT (405) or a target not in origin-form:
        absolute-form "http://h/p" is routed as "/p" with Host h (RFC 9112 §3.2.2), "*" (OPTIONS)
        as "/"; (url, path to route, host, headers), or None with ex.local set."""
        unrouted = self.server.unrouted
        if ex.local:
            ex.stats = unrouted
            return None
        if method == b"CONNECT":
            ex.local, ex.keep_alive, ex.stats = 405, False, unrouted
            return None
        given = host
        url, host = _origin_form(url, host, method)
        if url is None:
            ex.local, ex.keep_alive, ex.stats = 400, False, unrouted
            return None
        if host != given:  # the target's authority replaces the Host header
            headers = [(name, host if name.lower() == b"host" else value) for name, value in headers]
        return url, (b"/" if url == b"*" else url.partition(b"?")[0]), host, headers

    def _route(self, ex: Exchange, method: bytes, url: bytes, path: bytes, host: bytes | None, headers: list,
               raw: bytes | None, upgrade: bytes | None, id_header_seen: bool, length: int) -> None:
        """Route the request and make its upstream head (ex.route, ex.head), or set ex.local.

        `raw`: the head's bytes as the client sent them, when no header needs editing and its
        request line is the one llhttp read (a single space each side of the target, no empty
        line before it): then the head goes upstream as it came, with the request ID and
        X-Forwarded-* lines added; otherwise it is rebuilt."""
        server = self.server
        route = server.table.match(host, path, headers, self)
        if route is not None and route.sticky is not None:  # sessionType=sticky-server:
            route = route.sticky.route_for(headers)  # the variant for this client's cookie
            ex.set_cookie = route.set_cookie  # None when the cookie names a task in rotation
        if route is None:
            ex.local, ex.stats = 503, server.unrouted
            return
        ex.stats = route.stats
        if route.features:  # its steps may answer, edit target and headers, bind response edits
            req = features.run(self, ex, route, method, url, host, headers)
            if ex.local:
                return
            if req is not None:
                url, headers = req.path + req.query, req.headers
            raw = None
        ex.route = route
        request_ids = server.request_ids
        if raw is not None and (request_ids is None or request_ids.plain):
            ex.head = b"".join((raw[:-2], request_ids.fresh(ex) if request_ids is not None else b"", self.forward_tail))
        else:
            id_line = b""
            if request_ids is not None:  # (requestid.py)
                headers, id_line = request_ids.tag(ex, headers, self.peer_trusted, id_header_seen or route.features)
            ex.head = request_head(
                method, url, headers, self.client_ip, server.proto,
                REQUEST_LINE_END_11 if ex.http11 else REQUEST_LINE_END_10, upgrade, self.forwarded, id_line,
            )
        if ex.has_body:
            self._limit_body(ex, length)

    def on_body(self, body: bytes) -> None:
        ex = self.reading
        if ex.chunked:
            ex.body_left -= len(body)  # (also for a dropped body: _watch_trailers sees it move)
            if ex.local:
                return  # answered locally: the body is read and dropped
            if ex.body_left < 0:
                raise _Refused(413)
            body = b"%x\r\n%b\r\n" % (len(body), body)
        elif ex.local:
            return
        upstream = ex.upstream
        if upstream is not None:
            upstream.last_io = self.last_io
            upstream.transport.write(body)
            if ex.replay is not None:
                self._keep_for_replay(ex, body)
        else:
            self._buffer(ex, body)

    def on_chunk_header(self) -> None:
        ex = self.reading
        ex.chunk_mark = ex.body_left

    def on_message_complete(self) -> None:
        ex = self.reading
        self.reading = None
        ex.request_done = True
        if ex.chunked:
            self.in_trailers = False
            if self.headers:  # trailer fields came through on_header: they belong to no head
                self.headers = []
                self.host = self.upgrade = None
                self.chunked = self.connection_header = self.id_header_seen = False
                self.length = self.head_size = 0
            if not ex.local:
                if ex.upstream is not None:
                    ex.upstream.transport.write(CHUNK_END)
                    if ex.replay is not None:
                        self._keep_for_replay(ex, CHUNK_END)
                else:
                    self._buffer(ex, CHUNK_END)

    # -- forwarding ------------------------------------------------------------------------
    def _limit_body(self, ex: Exchange, length: int) -> None:
        """MAX_REQUEST_BODY (or the service's maxRequestBody): 413 now for a Content-Length
        over it; a chunked body is counted as it comes (on_body)."""
        own = ex.route.service.max_request_body
        limit = self.server.max_body if own is None else own or UNLIMITED
        if length > limit:
            ex.local, ex.keep_alive, ex.route = 413, False, None
        ex.body_left = limit

    def _buffer(self, ex: Exchange, body: bytes) -> None:
        if ex.pending is None:
            ex.pending = []
        ex.pending.append(body)
        ex.pending_size += len(body)
        if ex.pending_size > MAX_PENDING_BODY:
            self._pause(PAUSE_BUFFER)

    def _keep_for_replay(self, ex: Exchange, body: bytes) -> None:
        """Keep body bytes sent on a reused connection until the response starts; past
        MAX_REPLAY_BODY the request can no longer be retried."""
        replay = ex.replay
        replay += body
        if len(replay) > MAX_REPLAY_BODY:
            ex.replay = None

    def _start(self, ex: Exchange) -> None:
        """Begin the exchange now at the head of the queue (it waited behind another)."""
        if ex.local:
            return self._respond_locally(ex, ex.local)
        address = ex.route.backend.address()
        if address is not None:
            upstream = self.pool.acquire(address)
            if upstream is not None:
                return self._attach(ex, upstream)
        self.loop.create_task(self._connect(ex, address))

    async def _connect(self, ex: Exchange, address: tuple[str, int] | None, tried: tuple = ()) -> None:
        gate = getattr(ex.route.backend, "gate", None)  # a limited service (servicelimits.py)
        if gate is not None and ex.slot is None:
            address = await self._admit(ex, gate)
            if address is None:
                return
        while True:
            try:
                if address is None:
                    address = await ex.route.backend.resolve()
                upstream = await self.pool.connect(address, ex.route.stats.address(address))
                break
            except ResolveError as exc:
                log.info("%s: %s", ex.route.service.name, exc)
                return self._fail(ex, 503)
            except (OSError, asyncio.TimeoutError) as exc:
                log.info("%s: cannot connect to %s:%s: %s", ex.route.service.name, *address, str(exc) or "timeout")
                tried += (address,)
                # Nothing was sent: any request may go to another task (None: the name's balancing picks).
                other = ex.route.backend.redispatch(address, tried)
                if not _may_retry(ex, "connect-failure") or self.closed:
                    return self._fail(ex, 503)
                ex.retries += 1
                ex.route.stats.address(address).retries += 1
                address = other
        if self.closed or not self.queue or self.queue[0] is not ex:
            self.pool.release(upstream)  # the client went away meanwhile; keep the connection
            return
        self._attach(ex, upstream)

    async def _admit(self, ex: Exchange, gate) -> tuple[str, int] | None:
        """Pass the service's limits: the address admitted to, or None when answered (429/503)."""
        try:
            if gate.protection.rate:
                gate.take_token(ex.client_ip)  # the address the access log shows (TRUSTED_PROXIES)
            slot = await gate.admit(ex.route.backend.inner)
        except LimitReached as refused:
            if refused.retry_after:
                ex.reply = features.Reply(refused.status, b"Retry-After: %d\r\n" % refused.retry_after)
            self._fail(ex, refused.status)
            return None
        except ResolveError as exc:
            log.info("%s: %s", ex.route.service.name, exc)
            self._fail(ex, 503)
            return None
        if self.closed or not self.queue or self.queue[0] is not ex:
            slot.release()  # the client went away while it waited
            return None
        ex.slot = slot
        return slot.address

    def _attach(self, ex: Exchange, upstream: UpstreamConnection) -> None:
        ex.upstream = upstream
        ex.address = upstream.address
        ex.sent_at = now = clock()
        upstream.bind(self, ex, now)
        if ex.has_body:  # a pooled connection may turn out closed, a task answer 503: keep the body to retry
            ex.replay = _replay_buffer(ex, upstream.reused)
            if ex.replay is not None and ex.pending:
                ex.replay += b"".join(ex.pending)
        if ex.pending:
            upstream.transport.writelines([ex.head, *ex.pending])
            ex.pending = None
            ex.pending_size = 0
            self._resume(PAUSE_BUFFER)
        else:
            upstream.transport.write(ex.head)

    def _fail(self, ex: Exchange, status: int) -> None:
        if self.closed or not self.queue or self.queue[0] is not ex:
            return
        if ex.responded:  # part of the response is out: only a reset tells the client it is cut short
            ex.broken = "sD" if status == 504 else "SD"
            self.flush()
            transport = self.transport
            sock = transport.get_extra_info("socket")
            if sock is not None and not transport.is_closing():
                # a TCP reset: a plain abort sends a FIN, which the client takes for a clean end
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            transport.abort()
            return
        self._respond_locally(ex, status)

    def _respond_locally(self, ex: Exchange, status: int) -> None:
        # A request body still on its way is not worth reading: answer, then close.
        close = not ex.keep_alive or not ex.request_done
        ex.local = status
        ex.responded = True
        ex.close_after = close
        if ex.reply is not None:
            response = ex.reply.encode(close, ex.is_head)
        else:
            response = error_head_only(status, close) if ex.is_head else error_response(status, close)
        if ex.request_id is not None:  # routed, then no upstream answered (503, 502, 504)
            end = response.index(b"\r\n\r\n") + 4
            response = self.server.request_ids.on_response(response[:end], ex) + response[end:]
        self.out.append(response)
        self.response_complete(None, False)

    # -- callbacks from UpstreamConnection (ExchangeOwner) -----------------------------------
    def response_complete(self, upstream: UpstreamConnection | None, reusable: bool) -> None:
        """The exchange at the head of the queue has its whole response, from `upstream`
        (pooled again when `reusable` and the exchange allows it) or from pyroute itself
        (None): what is left of it goes out, it is accounted, and the next request starts."""
        queue = self.queue
        ex = queue.popleft()
        if upstream is not None:
            now = upstream.last_io  # the read that completed the response
            ex.upstream = None
            if reusable and ex.request_done and ex.http11:
                self.pool.release(upstream)
            else:
                upstream.close()
        else:
            now = clock()
        out = self.out
        if out:  # (flush, inline)
            data = out[0] if len(out) == 1 else b"".join(out)
            self.sent += len(data)
            self.transport.write(data)
            out.clear()
        self._account(ex, ex.local or ex.status, "", now)
        if ex.close_after:
            self.transport.close()
            self.closed = True
            return
        self.served += 1
        self.last_io = now  # the keep-alive idle time starts now
        if queue:
            self._start(queue[0])
            if len(queue) == 1:
                self._resume(PAUSE_PIPELINE)

    def response_interim(self, head: bytes) -> None:
        if self.queue[0].http11:  # 1xx (e.g. 100 Continue) means nothing to an HTTP/1.0 client
            self.out.append(head)

    # The response path: every head and body byte of a response passes here, and so every
    # transform bound to its exchange (sticky cookie, header edits, compression) is applied here.
    def response_head(self, head: bytes, forwardable: bytes | None, close_delimited: bool) -> bool:
        """Queue the response head; True when it goes out exactly as received.

        `forwardable` is headers.inspect_response_head's verdict for a keep-alive HTTP/1.1 client.
        """
        ex = self.queue[0]
        upstream = ex.upstream
        ex.status = status = upstream.status
        if status == 503 and ex.route.retry_503:
            self._retry_503(ex, upstream)  # raises ResponseRetried when it does
        ex.responded = True
        ex.response_at = upstream.last_io
        close = ex.close_after = not ex.keep_alive or not ex.request_done or close_delimited
        if ex.set_cookie is not None or ex.response_edit is not None:
            self._transform_head(ex, head, forwardable, close_delimited, close)
            return False
        if forwardable is None or close or not ex.http11:  # (else client_response_head's common case)
            sent = client_response_head(head, forwardable, close, ex.http11)
        else:
            sent = forwardable
        request_id = ex.request_id
        if request_id is not None and sent.find(request_id) < 0:  # (not when the upstream echoed it)
            self.out += (sent[:-2], ex.request_id_line, CRLF)  # (requestid.py; joined in flush)
            return False
        if sent is head:
            return True
        self.out.append(sent)
        return False

    def _retry_503(self, ex: Exchange, upstream: UpstreamConnection) -> None:
        """retryOn=503: an idempotent request whose body is kept (or that had none) goes to
        another task instead of passing this 503 on. The connection is aborted rather than
        read to the end of the 503, so nothing of it can reach the client or the pool."""
        if ex.method not in IDEMPOTENT or (ex.has_body and ex.replay is None) or not _may_retry(ex, "503"):
            return
        log.info("%s via %s:%s: answered 503, retrying", ex.route.service.name, *upstream.address)
        ex.upstream = None
        upstream.abort()
        self._retry_elsewhere(ex, upstream)
        raise ResponseRetried

    def _retry_elsewhere(self, ex: Exchange, upstream: UpstreamConnection) -> None:
        """Send the exchange again, with its kept body, to a task other than `upstream`'s;
        the retry is counted for the exchange (access log) and for that task (metrics)."""
        ex.retries += 1
        upstream.stats.retries += 1
        if ex.replay:
            ex.pending = [bytes(ex.replay), *(ex.pending or ())]
            ex.pending_size = sum(map(len, ex.pending))
        ex.replay = None
        failed = upstream.address
        self.loop.create_task(self._connect(ex, ex.route.backend.alternative(failed), (failed,)))

    def _transform_head(self, ex: Exchange, head: bytes, forwardable: bytes | None, close_delimited: bool,
                        close: bool) -> None:
        """response_head for an exchange with transforms, in their order: the sticky cookie,
        then the route's edits, which may start a body transform (compression)."""
        if ex.set_cookie is not None:
            head = head[:-2] + sticky_cookie(ex.set_cookie, ex.address) + b"\r\n"
            if forwardable is not None:
                forwardable = inspect_response_head(head)[1]
        transform = None
        if ex.response_edit is not None:
            head, transform = ex.response_edit.head(ex, head, close_delimited)
            forwardable = None  # an edited head is rebuilt whole
        head = client_response_head(head, forwardable, close, ex.http11)
        self.out.append(head if ex.request_id is None else self.server.request_ids.on_response(head, ex))
        if transform is not None:
            if transform.done:  # an empty body: its transformed form is complete already
                self.out.append(transform.take())
            else:
                ex.body_transform = transform

    def response_body(self, data: bytes) -> None:
        """Body bytes of a response with a body transform: what it makes of them goes out."""
        chunk = self.queue[0].body_transform.feed(data)
        if chunk:
            self.out.append(chunk)

    def retract_response(self) -> None:
        """Drop the response queued in `out` before any of it was written (its upstream broke)."""
        self.out.clear()
        if self.queue:
            ex = self.queue[0]
            ex.responded = False
            ex.body_transform = None

    def flush(self) -> None:
        out = self.out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.sent += len(data)
            self.transport.write(data)
            out.clear()

    def _account(self, ex: Exchange, status: int, termination: str, now: float) -> None:
        """Count one finished (or abandoned) exchange; write its access log line if logging is on."""
        received = self.received - self.received_mark
        sent = self.sent - self.sent_mark
        self.received_mark = self.received
        self.sent_mark = self.sent
        if ex.slot is not None:
            ex.slot.release()
        ex.stats.count(ex, status, now, received, sent)
        if self.server.access_log is not None:
            self.server.access_log.exchange(self, ex, status, termination, now, received, sent)

    def response_failed(self, upstream: UpstreamConnection, reason: str, retryable: bool, status: int = 502) -> None:
        if not self.queue or self.queue[0].upstream is not upstream:
            return
        ex = self.queue[0]
        ex.upstream = None
        if retryable and (ex.replay is not None or not ex.has_body) and _may_retry(ex, "empty-response"):
            # A reused connection closed before any response byte: the upstream had closed it
            # idle and processed nothing, so any request (its body kept in replay) goes again.
            return self._retry_elsewhere(ex, upstream)
        log.info("%s via %s:%s: %s", ex.route.service.name, *upstream.address, reason)
        self._fail(ex, status)

    upstream_writable = ReadPauses.peer_writable  # the upstream's send buffer filled or drained

    # -- flow control (_pause/_resume: flow.ReadPauses), errors, timeouts -------------------------
    def _after_upgrade(self, rest: bytes) -> None:
        """llhttp stops after an Upgrade (or CONNECT) head: HTTP may end on this connection.

        Reading pauses until the upstream answers; bytes the client sent ahead are kept for
        the tunnel. A refused upgrade (or a local answer) closes the connection after it.
        """
        if self.closed:
            return
        ex = self.queue[-1] if self.queue else None
        if ex is None or ex.local or ex.responded:
            return self._refuse(400, "bytes after a refused upgrade request") if rest else None
        ex.upgrade = rest
        ex.keep_alive = False
        self._pause(PAUSE_UPGRADE)

    def start_tunnel(self, upstream: UpstreamConnection, head: bytes, rest: bytes) -> bool:
        """The upstream answered 101: both sockets become a byte tunnel (tunnel.py).
        False when the request asked for no upgrade (the upstream is broken: 502)."""
        ex = self.queue[0] if self.queue else None
        if ex is None or ex.upstream is not upstream or ex.upgrade is None:
            return False
        ex.upstream = None
        if ex.slot is not None:
            ex.slot.release()  # a tunnel is no request in flight
        upstream.owner = upstream.exchange = None
        self.pool.busy.discard(upstream)
        self.queue.clear()
        self.closed = True
        self.parser = None  # HTTP is over on this socket (and the parser-callback cycle with it)
        self.server.connections.discard(self)
        self.out.append(head)
        self.out.append(rest)
        to_client = b"".join(self.out)
        self.out.clear()
        server = self.server
        Tunnel(server.tunnels, server.limit, self.loop).take_over(
            self.client_ip, self.transport, upstream.transport, to_client, ex.upgrade,
            ex.route.destination.timeout_tunnel or server.settings.timeout_tunnel)
        return True

    def _refuse(self, status: int, why: str) -> None:
        """A request that cannot be parsed (or did not arrive in time): answer it and close.

        Requests read whole before it keep their responses: the connection closes after the
        last of them instead, and the broken request is dropped without an answer.
        """
        log.debug("refusing request from %s: %s", self.client_ip.decode(), why)
        queue = self.queue
        reading = self.reading
        now = clock()
        termination = "cR" if status == 408 else "PR"
        if reading is not None and len(queue) > 1:  # its body broke while it waited behind others
            queue.pop()
            self._account(reading, reading.status, termination, now)
            self.reading = reading = None
        if reading is None and queue:
            return self._close_after_queue()
        self.closed = True
        for ex in self.queue:
            if ex.upstream is not None:
                ex.upstream.abort()
        responded = any(ex.responded for ex in self.queue)
        for ex in self.queue:  # the one whose body was being read gets the refusal; the others are cut off
            self._account(ex, status if ex is self.reading and not responded else ex.status, termination, now)
        if not responded:
            self.transport.write(error_response(status, True))
            if self.reading is None:  # the refused request never became an exchange
                self.server.unrouted.count_refused(status)
                if self.server.access_log is not None:
                    self.server.access_log.refused(self, status)
        self.queue.clear()
        self.transport.close()

    def _close_after_queue(self) -> None:
        """Read nothing more: the requests already queued are answered, then the connection closes."""
        last = self.queue[-1]
        last.keep_alive = False
        last.close_after = True  # (recomputed, to the same, by a response head still to come)
        self.in_head = False
        self._pause(PAUSE_CLOSING)

    def check_timeouts(self, now: float) -> None:
        settings = self.server.settings
        if self.closed:
            return
        if self.in_head:
            if now - self.head_started > settings.timeout_http_request:
                self._refuse(408, "request head timeout")
        elif self.reading is not None and not self.paused:
            if self.in_trailers:
                if now - self.head_started > settings.timeout_http_request:
                    self._refuse(408, "chunk trailers timeout")
            elif now - self.last_io > settings.timeout_client:
                self._refuse(408, "client timeout while sending the body")
            elif body_too_slow(now, self.reading.head_done, self.received - self.received_mark,
                               settings.timeout_client, settings.min_body_rate):
                self._refuse(408, "request body slower than MIN_BODY_RATE")
        elif not self.queue:
            idle = settings.timeout_http_keep_alive if self.served else settings.timeout_http_request
            if now - self.last_io > idle:
                self.closed = True
                self.transport.close()


def _may_retry(ex: Exchange, condition: str) -> bool:
    """Whether the service's retry policy allows one more try after `condition`."""
    protection = ex.route.service.protection
    return condition in protection.retry_on and ex.retries < protection.retries


def _replay_buffer(ex: Exchange, reused: bool) -> bytearray | None:
    """Where to keep the body while it may have to be sent again: on a `reused` connection
    of a service retrying empty responses, or for an idempotent request of one retrying 503s;
    None otherwise."""
    if reused and _may_retry(ex, "empty-response"):
        return bytearray()
    return bytearray() if ex.route.retry_503 and ex.method in IDEMPOTENT and _may_retry(ex, "503") else None


def _unusual_head(version: str, host: bytes | None, upgrade: bytes | None, ex: Exchange, method: bytes) -> int:
    """The status refusing a head that is not plain HTTP/1.1 with a Host, or 0 to go on."""
    if version not in ("1.1", "1.0"):
        return 400  # HTTP/0.9 or a 2.x/3.x version in an HTTP/1 message
    if host is None and version == "1.1":
        return 400  # RFC 9112 §3.2: a 1.1 request without Host gets 400
    if ex.chunked and version == "1.0":
        return 400  # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing
    if upgrade is not None and method != b"CONNECT":
        if version != "1.1" or ex.has_body:
            return 400  # a tunnel must not start behind a body the upstream may frame differently
        ex.upgrade = b""
    return 0


class _Refused(Exception):
    """Raised inside a parser callback to refuse the request with `status`."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


Refused = _Refused  # for connection subclasses elsewhere (connections.ClientCertConnection)


class _Closed(Exception):
    """Raised inside a parser callback once the connection is closed: llhttp stops there."""


def _origin_form(url: bytes, host: bytes | None, method: bytes) -> tuple[bytes | None, bytes | None]:
    """absolute-form "http://h/p?q" -> ("/p?q", b"h") (RFC 9112 §3.2.2); "*" stays for
    OPTIONS (routed as "/"); url None for any other form (400)."""
    if url == b"*":
        return (url if method == b"OPTIONS" else None), host
    lower = url[:8].lower()
    if lower.startswith(b"http://"):
        rest = url[7:]
    elif lower.startswith(b"https://"):
        rest = url[8:]
    else:
        return None, host
    slash = rest.find(b"/")
    if slash < 0:
        return b"/", rest
    return rest[slash:], rest[:slash]


origin_form = _origin_form
