"""The client side of the data plane: one ClientConnection per accepted socket.

Each request becomes an Exchange. Exchanges queue in arrival order (pipelining) and
only the head of the queue talks to an upstream, so responses leave in request order.
The request head is routed and rewritten once, at the end of the head; body chunks are
streamed to the upstream as they arrive (buffered, bounded, only while the upstream
connection is being opened). Response bytes come back through ``out``/``flush()``, one
write per upstream read. Backpressure pauses reading on the opposite side; nothing is
buffered whole.

No Task is created unless a request must wait (DNS miss, pool empty). Timeouts are
checked by the server's periodic tick against timestamps the hot path merely stores.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import httptools

from .errors import error_head_only, error_response
from .headers import REQUEST_LINE_END_10, REQUEST_LINE_END_11, request_head, rewrite_response_head
from .resolver import ResolveError
from .routing import RouteTable
from .upstream import CHUNK_END, UpstreamConnection, UpstreamPool

log = logging.getLogger("pyroute.proxy")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
MAX_PENDING_BODY = 256 * 1024  # body bytes buffered while the upstream connection opens
MAX_HEADERS = 100
MAX_HEAD_BYTES = 64 * 1024

# Why reading from the client is paused (a bit each, reading resumes when none is left).
PAUSE_PIPELINE = 1  # a later request waits behind the one in flight
PAUSE_UPSTREAM = 2  # the upstream's socket buffer is full
PAUSE_BUFFER = 4  # too much body buffered while connecting


class Exchange:
    """One request/response pair on a client connection."""

    __slots__ = (
        "route", "head", "keep_alive", "http11", "is_head", "idempotent", "has_body", "chunked",
        "pending", "pending_size", "request_done", "upstream", "responded", "retried", "local",
        "close_after",
    )

    def __init__(self, keep_alive: bool, http11: bool, is_head: bool, chunked: bool, has_body: bool):
        self.keep_alive = keep_alive
        self.http11 = http11
        self.is_head = is_head
        self.chunked = chunked
        self.has_body = has_body
        self.route = None
        self.idempotent = False
        self.head = b""
        self.pending: list[bytes] | None = None  # body chunks waiting for the upstream connection
        self.pending_size = 0
        self.request_done = False
        self.upstream: UpstreamConnection | None = None
        self.responded = False
        self.retried = False
        self.local = 0  # status pyroute answers itself, 0 = forward
        self.close_after = False


class ProxyServer:
    """What every client connection shares: the current route table, the pool, settings."""

    def __init__(self, settings, loop: asyncio.AbstractEventLoop, pool: UpstreamPool, table: RouteTable):
        self.settings = settings
        self.loop = loop
        self.pool = pool
        self.table = table
        self.connections: set[ClientConnection] = set()
        self.proto = b"http"

    def factory(self) -> ClientConnection:
        return ClientConnection(self)

    def check_timeouts(self, now: float) -> None:
        """Called by the server's tick: enforce client-side and TIMEOUT_SERVER timeouts."""
        for conn in list(self.connections):
            conn.check_timeouts(now)
        limit = now - self.settings.timeout_server
        for upstream in [u for u in self.pool.busy if u.last_io < limit]:
            owner = upstream.owner
            upstream.abort()
            if owner is not None:
                owner.response_failed(upstream, "upstream timeout", retryable=False, status=504)
        self.pool.sweep(now)


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "server", "loop", "pool", "transport", "parser", "client_ip", "url", "headers", "host", "chunked",
        "length", "head_size", "queue", "reading", "in_head", "head_started", "last_io", "paused",
        "out", "served", "closed",
    )

    def __init__(self, server: ProxyServer):
        self.server = server
        self.loop = server.loop
        self.pool = server.pool
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""
        self.queue: deque[Exchange] = deque()
        self.reading: Exchange | None = None  # the exchange whose request body is being read
        self.in_head = False
        self.head_started = 0.0
        self.last_io = 0.0
        self.paused = 0
        self.out: list[bytes] = []  # response bytes to write at the next flush()
        self.served = 0
        self.closed = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.chunked = False
        self.length = 0
        self.head_size = 0

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0].encode() if peer else b"unknown"
        self.last_io = self.loop.time()
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_io = now = self.loop.time()
        if not self.in_head and self.reading is None:  # these bytes start a request head
            self.in_head = True
            self.head_started = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._after_upgrade(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            self._refuse(refused.status if isinstance(refused, _Refused) else 400, str(exc))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
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
        if len(self.url) > MAX_HEAD_BYTES:
            raise _Refused(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size == 4 and name.lower() == b"host":
            self.host = value
        elif size == 17 and name.lower() == b"transfer-encoding":
            self.chunked = True
        elif size == 14 and name.lower() == b"content-length":
            self.length = int(value)
        self.headers.append((name, value))
        self.head_size += size + len(value)
        if self.head_size > MAX_HEAD_BYTES or len(self.headers) > MAX_HEADERS:
            raise _Refused(431)

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        method = parser.get_method()
        http11 = parser.get_http_version() == "1.1"
        ex = Exchange(parser.should_keep_alive(), http11, method == b"HEAD", self.chunked, self.chunked or self.length > 0)
        self.reading = ex
        queue = self.queue
        queue.append(ex)
        url = self.url
        host = self.host
        headers = self.headers
        self.url = b""  # ready for the next head (no on_message_begin callback: it costs a call per request)
        self.headers = []
        self.host = None
        self.chunked = False
        self.length = 0
        self.head_size = 0
        if url[:1] != b"/":
            url, host = _origin_form(url, host)
        if method == b"CONNECT":
            ex.local, ex.keep_alive = 405, False
        elif url is None:
            ex.local, ex.keep_alive = 400, False
        else:
            query = url.find(b"?")
            route = self.server.table.match(host, url if query < 0 else url[:query])
            if route is None:
                ex.local = 503
            else:
                ex.route = route
                ex.idempotent = method in IDEMPOTENT
                ex.head = request_head(
                    method, url, headers, self.client_ip, self.server.proto,
                    REQUEST_LINE_END_11 if http11 else REQUEST_LINE_END_10,
                )
        if len(queue) > 1:
            self._pause(PAUSE_PIPELINE)
            return
        if ex.local:
            return self._respond_locally(ex, ex.local)
        # The fast path, inline: a cached address and a pooled connection.
        address = ex.route.backend.address()
        if address is not None:
            upstream = self.pool.acquire(address)
            if upstream is not None:
                ex.upstream = upstream
                upstream.bind(self, ex.is_head, self.last_io)
                upstream.transport.write(ex.head)
                return
        self.loop.create_task(self._connect(ex, address))

    def on_body(self, body: bytes) -> None:
        ex = self.reading
        if ex.local:
            return  # answered locally: the body is read and dropped
        if ex.chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        upstream = ex.upstream
        if upstream is not None:
            upstream.last_io = self.last_io
            upstream.transport.write(body)
        else:
            self._buffer(ex, body)

    def on_message_complete(self) -> None:
        ex = self.reading
        self.reading = None
        ex.request_done = True
        if ex.chunked and not ex.local:
            if ex.upstream is not None:
                ex.upstream.transport.write(CHUNK_END)
            else:
                self._buffer(ex, CHUNK_END)

    # -- forwarding ------------------------------------------------------------------------
    def _buffer(self, ex: Exchange, body: bytes) -> None:
        if ex.pending is None:
            ex.pending = []
        ex.pending.append(body)
        ex.pending_size += len(body)
        if ex.pending_size > MAX_PENDING_BODY:
            self._pause(PAUSE_BUFFER)

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

    async def _connect(self, ex: Exchange, address: tuple[str, int] | None) -> None:
        try:
            if address is None:
                address = await ex.route.backend.resolve()
            upstream = await self.pool.connect(address)
        except ResolveError as exc:
            log.info("%s: %s", ex.route.service.name, exc)
            return self._fail(ex, 503)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("%s: cannot connect to %s:%s: %s", ex.route.service.name, *address, exc or "timeout")
            return self._fail(ex, 503)
        if self.closed or not self.queue or self.queue[0] is not ex:
            self.pool.release(upstream)  # the client went away meanwhile; keep the connection
            return
        self._attach(ex, upstream)

    def _attach(self, ex: Exchange, upstream: UpstreamConnection) -> None:
        ex.upstream = upstream
        upstream.bind(self, ex.is_head, self.loop.time())
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
            self.flush()
            self.transport.abort()
            return
        self._respond_locally(ex, status)

    def _respond_locally(self, ex: Exchange, status: int) -> None:
        # A request body still on its way is not worth reading: answer, then close.
        close = not ex.keep_alive or not ex.request_done
        ex.local = status
        ex.responded = True
        ex.close_after = close
        self.out.append(error_head_only(status, close) if ex.is_head else error_response(status, close))
        self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        out = self.out
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        if ex.close_after:
            self.transport.close()
            self.closed = True
            return
        self.served += 1
        self.last_io = self.loop.time()  # the keep-alive idle time starts now
        if queue:
            self._start(queue[0])
            if len(queue) == 1:
                self._resume(PAUSE_PIPELINE)

    # -- callbacks from UpstreamConnection ---------------------------------------------------
    def response_interim(self, head: bytes) -> None:
        if self.queue[0].http11:  # 1xx (e.g. 100 Continue) means nothing to an HTTP/1.0 client
            self.out.append(head)

    def response_head(self, head: bytes, forwardable: bytes | None, close_delimited: bool) -> bool:
        """Queue the response head; True when it goes out exactly as received.

        `forwardable` is headers.inspect_response_head's verdict for a keep-alive HTTP/1.1 client.
        """
        ex = self.queue[0]
        ex.responded = True
        close = not ex.keep_alive or not ex.request_done or close_delimited
        ex.close_after = close
        if ex.http11:
            if forwardable is not None and not close:
                if forwardable is head:
                    return True
                self.out.append(forwardable)
                return False
            self.out.append(rewrite_response_head(head, b"close" if close else None))
        else:
            self.out.append(rewrite_response_head(head, b"close" if close else b"keep-alive"))
        return False

    def flush(self) -> None:
        out = self.out
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def response_complete(self, upstream: UpstreamConnection, upstream_keep_alive: bool) -> None:
        ex = self.queue[0]
        ex.upstream = None
        if upstream_keep_alive and ex.request_done and ex.http11:
            self.pool.release(upstream)
        else:
            upstream.close()
        self._finish(ex)

    def response_failed(self, upstream: UpstreamConnection, reason: str, retryable: bool, status: int = 502) -> None:
        if not self.queue or self.queue[0].upstream is not upstream:
            return
        ex = self.queue[0]
        ex.upstream = None
        if retryable and ex.idempotent and not ex.has_body and ex.request_done and not ex.retried:
            # The pooled connection had been closed by the upstream: one new try.
            ex.retried = True
            self.loop.create_task(self._connect(ex, upstream.address))
            return
        log.info("%s via %s:%s: %s", ex.route.service.name, *upstream.address, reason)
        self._fail(ex, status)

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self._resume(PAUSE_UPSTREAM)
        else:
            self._pause(PAUSE_UPSTREAM)

    # -- flow control, errors, timeouts ---------------------------------------------------------
    def _pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.last_io = self.loop.time()  # the client was not idle while we did not read
                self.transport.resume_reading()

    def _after_upgrade(self, rest: bytes) -> None:
        # httptools stops at an Upgrade (or CONNECT) request. pyroute does not forward
        # Upgrade yet, so the request went out as a plain one: resume parsing after it.
        self.parser = httptools.HttpRequestParser(self)
        if rest and not self.closed:
            self.data_received(rest)

    def _refuse(self, status: int, why: str) -> None:
        """A request that cannot be parsed: answer (if nothing else is in flight) and close."""
        log.debug("refusing request from %s: %s", self.client_ip.decode(), why)
        self.closed = True
        for ex in self.queue:
            if ex.upstream is not None:
                ex.upstream.abort()
        responded = any(ex.responded for ex in self.queue)
        self.queue.clear()
        if not responded:
            self.transport.write(error_response(status, True))
        self.transport.close()

    def check_timeouts(self, now: float) -> None:
        settings = self.server.settings
        if self.closed:
            return
        if self.in_head:
            if now - self.head_started > settings.timeout_http_request:
                self._refuse(408, "request head timeout")
        elif self.reading is not None and not self.paused:
            if now - self.last_io > settings.timeout_client:
                self._refuse(408, "client timeout while sending the body")
        elif not self.queue:
            idle = settings.timeout_http_keep_alive if self.served else settings.timeout_http_request
            if now - self.last_io > idle:
                self.closed = True
                self.transport.close()


class _Refused(Exception):
    """Raised inside a parser callback to refuse the request with `status`."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


Refused = _Refused  # for connection subclasses elsewhere (server.ClientCertConnection)


def _origin_form(url: bytes, host: bytes | None) -> tuple[bytes | None, bytes | None]:
    """absolute-form "http://h/p?q" -> ("/p?q", b"h") (RFC 9112 §3.2.2); url None for any other form."""
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
