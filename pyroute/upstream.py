"""Connections to the services: the backend address choice, the keep-alive pool, and the
response side of the forwarding state machine (one UpstreamConnection per TCP connection).

An UpstreamConnection parses responses with httptools but registers no per-header
callback: the response head is forwarded as the raw bytes received (the owner edits it
only when a hop-by-hop header is present). Content-Length and close-delimited bodies are
passed through as received; chunked bodies are re-framed from the parser's chunks, so
exactly the bytes of this response reach the client and nothing an upstream sends past
its end can desynchronise the client connection.
"""

from __future__ import annotations

import asyncio
import logging

import httptools

from .resolver import Resolver, is_ip

log = logging.getLogger("pyroute.upstream")

MAX_RESPONSE_HEAD = 64 * 1024  # a response head larger than this is refused (502)
CHUNK_END = b"0\r\n\r\n"


class Backend:
    """Where a route's requests go: a host (service VIP name, or IP) and a port.

    Addresses come from the shared resolver cache; several A records are used in turn.
    """

    __slots__ = ("host", "port", "resolver", "_ips", "_addresses", "_turn")

    def __init__(self, host: str, port: int, resolver: Resolver):
        self.host = host
        self.port = port
        self.resolver = resolver
        self._ips: tuple[str, ...] | None = None
        self._addresses: tuple[tuple[str, int], ...] = ()
        self._turn = 0
        if is_ip(host):
            self._use((host,))

    def _use(self, ips: tuple[str, ...]) -> None:
        self._ips = ips
        self._addresses = tuple((ip, self.port) for ip in ips)

    def address(self) -> tuple[str, int] | None:
        """An address to dial now, or None when the name must be resolved first."""
        ips = self._ips if self._fixed else self.resolver.cached(self.host)
        if ips is None:
            return None
        if ips is not self._ips:
            self._use(ips)
        addresses = self._addresses
        if len(addresses) == 1:
            return addresses[0]
        self._turn += 1
        return addresses[self._turn % len(addresses)]

    @property
    def _fixed(self) -> bool:
        return self._ips is not None and self._ips == (self.host,)

    async def resolve(self) -> tuple[str, int]:
        """Resolve (or wait for the lookup in flight) and pick an address; ResolveError if none."""
        ips = await self.resolver.resolve(self.host)
        if ips is not self._ips:
            self._use(ips)
        self._turn += 1
        return self._addresses[self._turn % len(self._addresses)]

    def __repr__(self) -> str:
        return f"{self.host}:{self.port}"


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an upstream address, bound to one exchange at a time.

    The owner (the client side, proxy.ClientConnection) receives:
    ``response_head(raw_head, status) -> bool`` (True: keep chunked framing),
    ``response_data(bytes)``, ``response_complete(upstream_keep_alive)``,
    ``response_failed(conn, reason, retryable)``, ``flush()``, and flow control
    ``upstream_writable(bool)``.
    """

    __slots__ = (
        "pool", "address", "transport", "parser", "owner", "head_buf", "in_head", "chunked",
        "rechunk", "head_request", "skip_body", "keep_alive", "responded", "closed", "reused",
        "idle_since", "last_io", "extra", "close_delimited",
    )

    def __init__(self, pool: UpstreamPool, address: tuple[str, int]):
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.owner = None
        self.head_buf = bytearray()
        self.in_head = True
        self.chunked = False
        self.rechunk = False
        self.head_request = False
        self.skip_body = False
        self.keep_alive = False
        self.responded = False  # any response byte seen for the current exchange
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.last_io = 0.0
        self.extra = False
        self.close_delimited = False

    # -- binding to an exchange -------------------------------------------------------
    def bind(self, owner, head_request: bool) -> None:
        self.owner = owner
        self.head_request = head_request
        self.in_head = True
        self.responded = False
        self.close_delimited = False
        self.pool.busy.add(self)
        self.last_io = self.pool.loop.time()

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.owner = None
        self.pool.busy.discard(self)
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.owner = None
        self.closed = True
        self.pool.busy.discard(self)
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:  # bytes on an idle connection: the upstream is out of step, drop it
            self.pool.discard(self)
            self.close()
            return
        self.responded = True
        self.last_io = self.pool.loop.time()
        if self.in_head:
            self.head_buf += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            return self._fail(f"invalid response: {exc}")
        if self.extra:
            return self._fail("data after the end of the response")
        if self.in_head and len(self.head_buf) > MAX_RESPONSE_HEAD:
            return self._fail("response head too large")
        if self.skip_body:  # response to HEAD: complete at the end of its head
            self.skip_body = False
            self.parser = httptools.HttpResponseParser(self)
            self._complete()
        if self.owner is not None:
            self.owner.flush()
        else:
            owner.flush()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc) -> None:
        was_closed = self.closed
        self.closed = True
        self.pool.busy.discard(self)
        owner = self.owner
        if owner is None:
            if not was_closed:
                self.pool.discard(self)
            return
        if self.close_delimited and not self.in_head:
            self._complete(keep_alive=False)
            owner.flush()
            return
        self.owner = None
        owner.response_failed(self, "upstream closed the connection", retryable=self.reused and not self.responded)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writable(False)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writable(True)

    # -- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if not self.in_head:
            self.extra = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        buf = self.head_buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.extra = True  # bare-LF heads: llhttp refuses them already; never forward a head we cannot delimit
            return
        end += 4
        head = bytes(buf[:end])
        del buf[:end]
        if status < 200 and status != 101:
            self.owner.response_interim(head)
            return
        self.in_head = False
        self.head_buf = bytearray()
        self.keep_alive = self.parser.should_keep_alive()
        self.chunked, has_length = _framing(head)
        if self.head_request:
            self.skip_body = True
        elif not self.chunked and not has_length and status not in (204, 304):
            self.close_delimited = True
            self.keep_alive = False
        self.rechunk = self.owner.response_head(head, status, self.chunked)

    def on_body(self, body: bytes) -> None:
        if self.skip_body or self.owner is None:
            return
        if self.rechunk:
            self.owner.response_data(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self.owner.response_data(body)

    def on_message_complete(self) -> None:
        if self.in_head or self.skip_body:
            return  # interim 1xx, or HEAD (completed after the feed)
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self._complete()

    # -- internals -------------------------------------------------------------------
    def _complete(self, keep_alive: bool | None = None) -> None:
        owner = self.owner
        if owner is None:
            return
        if self.rechunk:
            owner.response_data(CHUNK_END)
        self.owner = None
        self.pool.busy.discard(self)
        self.in_head = True
        owner.response_complete(self, self.keep_alive if keep_alive is None else keep_alive)

    def _fail(self, reason: str) -> None:
        owner = self.owner
        self.abort()
        if owner is not None:
            owner.response_failed(self, reason, retryable=False)


def _framing(head: bytes) -> tuple[bool, bool]:
    """(chunked, has Content-Length) of a response head; llhttp already refused conflicts."""
    lower = head.lower()
    at = lower.find(b"\ntransfer-encoding:")
    if at >= 0:
        line_end = lower.find(b"\r\n", at + 1)
        if lower[at:line_end].rstrip().endswith(b"chunked"):
            return True, False
    return False, b"\ncontent-length:" in lower


class UpstreamPool:
    """Idle keep-alive connections per upstream address, reused last-in first-out.

    LIFO keeps the busiest connections warm and lets the rest reach the idle timeout;
    a sweeper (driven by the server's periodic tick) closes those.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_idle: int, idle_timeout: float, connect_timeout: float):
        self.loop = loop
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self.busy: set[UpstreamConnection] = set()  # bound to an exchange; checked for TIMEOUT_SERVER
        self.connects = 0
        self.reuses = 0

    def acquire(self, address: tuple[str, int]) -> UpstreamConnection | None:
        conns = self.idle.get(address)
        while conns:
            conn = conns.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                self.reuses += 1
                return conn
        return None

    async def connect(self, address: tuple[str, int]) -> UpstreamConnection:
        """A new connection; raises OSError or asyncio.TimeoutError (after TIMEOUT_CONNECT)."""
        self.connects += 1
        _, conn = await asyncio.wait_for(
            self.loop.create_connection(lambda: UpstreamConnection(self, address), address[0], address[1]),
            self.connect_timeout,
        )
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        conns = self.idle.setdefault(conn.address, [])
        if conn.closed or len(conns) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        conns.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        conns = self.idle.get(conn.address)
        if conns and conn in conns:
            conns.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle longer than the idle timeout."""
        limit = now - self.idle_timeout
        for address, conns in list(self.idle.items()):
            keep = [c for c in conns if c.idle_since > limit and not c.closed]
            for conn in conns:
                if conn not in keep:
                    conn.close()
            if keep:
                self.idle[address] = keep
            else:
                del self.idle[address]

    def close_all(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()
