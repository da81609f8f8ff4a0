"""Connections to the services: the backend address choice, the keep-alive pool, and the
response side of the forwarding state machine (one UpstreamConnection per TCP connection).

An UpstreamConnection parses responses with httptools but registers no per-header or
body callback: llhttp validates the bytes and finds where each message ends, and the
bytes themselves are forwarded as received, head included unless a hop-by-hop header or
the client's connection semantics need it edited. Bytes an upstream sends past the end
of a response fail the exchange (502) instead of reaching the client, so a broken
upstream cannot desynchronise a client connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Protocol

import httptools

from pyroute.dataplane.clock import clock
from pyroute.dataplane.exchange import Exchange
from pyroute.dataplane.headers import AmbiguousResponse, inspect_interim_head, inspect_response_head
from pyroute.resolver import Resolver, is_ip

log = logging.getLogger("pyroute.dataplane.upstream")

MAX_RESPONSE_HEAD = 64 * 1024  # a response head larger than this is refused (502)
CHUNK_END = b"0\r\n\r\n"  # the last chunk of a chunked body (no trailers)


class ResponseRetried(Exception):
    """Raised by ExchangeOwner.response_head for a response it will not take (a 503 it retries
    on another task): it has aborted the connection, and nothing more of it is read."""


class TlsAddress(tuple):
    """(ip, port) of an upstream spoken to over TLS: pooled apart from plain (ip, port)."""

    __slots__ = ()

    def __eq__(self, other) -> bool:
        return type(other) is TlsAddress and tuple.__eq__(self, other)

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(("tls", *self))


def upstream_tls_context(alpn: str = "http/1.1") -> ssl.SSLContext:
    """sslVerifyNone: encrypt to the upstream without checking its certificate (DFP's `ssl verify none`).

    `alpn`: the one protocol offered (h2 for upstreamProto=h2, h2upstream.py)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    return ctx


class Backend:
    """Where a route's requests go: a host (service VIP name, or IP) and a port.

    Addresses come from the shared resolver cache; several A records are used in turn.
    """

    __slots__ = ("host", "port", "resolver", "fixed", "_ips", "_addresses", "_turn", "tls", "_entry")

    def __init__(self, host: str, port: int, resolver: Resolver, tls: bool = False):
        self.host = host
        self.port = port
        self.resolver = resolver
        self.tls = tls
        self.fixed: tuple[str, int] | None = None  # an IP needs no DNS
        if is_ip(host):
            self.fixed = TlsAddress((host, port)) if tls else (host, port)
        self._ips: tuple[str, ...] | None = None
        self._addresses: tuple[tuple[str, int], ...] = ()
        self._turn = 0
        self._entry = None  # the resolver's entry the addresses came from, kept until it is due

    def _use(self, ips: tuple[str, ...]) -> None:
        self._ips = ips
        self._addresses = tuple(TlsAddress((ip, self.port)) if self.tls else (ip, self.port) for ip in ips)

    def address(self) -> tuple[str, int] | None:
        """An address to dial now, or None when the name must be resolved first."""
        if self.fixed is not None:
            return self.fixed
        entry = self._entry
        if entry is None or entry.due:  # (due: time to refresh, or a newer answer replaced it)
            entry = self._entry = self.resolver.current(self.host)
            if entry is None:
                return None
            if entry.addresses is not self._ips:
                self._use(entry.addresses)
        addresses = self._addresses
        if len(addresses) == 1:
            return addresses[0]
        self._turn += 1
        return addresses[self._turn % len(addresses)]

    def redispatch(self, failed: tuple[str, int], tried: tuple) -> tuple[str, int] | None:
        """Another address after a failed connect: none, the name's own balancing decides."""
        return None

    def alternative(self, failed: tuple[str, int], tried: tuple = ()) -> tuple[str, int] | None:
        """Another address for a retry: none, the name's own balancing decides."""
        return None

    async def resolve(self) -> tuple[str, int]:
        """Resolve (or wait for the lookup in flight) and pick an address; ResolveError if none."""
        if self.fixed is not None:
            return self.fixed
        ips = await self.resolver.resolve(self.host)
        if ips is not self._ips:
            self._use(ips)
        self._turn += 1
        return self._addresses[self._turn % len(self._addresses)]

    def __repr__(self) -> str:
        return f"{self.host}:{self.port}"


class ExchangeOwner(Protocol):
    """What an UpstreamConnection needs from whoever owns the exchange bound to it
    (client.ClientConnection): where response bytes go, and what it must be told.

    Bytes of one upstream read collect in `out` and leave in one write, at `flush()` or
    when the response completes. The owner decides what the client gets: the head
    (`response_head`), and the body when the exchange transforms it (`response_body`,
    called instead of `out.append` while `Exchange.body_transform` is set).
    """

    __slots__ = ()
    loop: asyncio.AbstractEventLoop
    out: list[bytes]  # response bytes to write at the next flush()

    def flush(self) -> None:
        """Write what `out` holds to the client, in one write."""

    def response_interim(self, head: bytes) -> None:
        """A 1xx head (not 101) before the final response."""

    def response_head(self, head: bytes, forwardable: bytes | None, close_delimited: bool) -> bool:
        """The final response head (`forwardable`: headers.inspect_response_head's verdict).
        True: it goes out exactly as received, as part of the raw bytes of the read;
        False: the owner queued its own head in `out`, and raw bytes resume after it.
        Raises ResponseRetried when the owner let go of the connection to try elsewhere."""

    def response_body(self, data: bytes) -> None:
        """Raw body bytes of a response whose exchange transforms its body."""

    def retract_response(self) -> None:
        """Drop what `out` holds of a response before any of it was written (it broke)."""

    def response_complete(self, upstream: UpstreamConnection, reusable: bool) -> None:
        """The response ended; `reusable`: the connection may carry another exchange."""

    def response_failed(self, upstream: UpstreamConnection, reason: str, retryable: bool, status: int = 502) -> None:
        """The response cannot complete; `retryable`: a reused connection failed before any byte."""

    def upstream_writable(self, writable: bool) -> None:
        """The upstream's send buffer filled (False) or drained (True)."""

    def start_tunnel(self, upstream: UpstreamConnection, head: bytes, rest: bytes) -> bool:
        """The upstream answered 101 (`head`, then `rest`): both sockets become a tunnel.
        False when the exchange asked for no upgrade."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an upstream address, bound to one exchange at a time.

    Response bytes are forwarded as received: llhttp validates them and finds the end of
    each message, and the bytes of one read go to the client in one write (head edited
    only when needed). What happens to them is the owner's (ExchangeOwner) to decide.
    """

    __slots__ = (
        "pool", "address", "transport", "parser", "owner", "exchange", "partial", "view", "emit_from",
        "scan_from", "in_head", "keep_alive", "done", "responded", "closed", "reused",
        "idle_since", "last_io", "extra", "close_delimited", "status", "stats", "switch_head",
    )

    def __init__(self, pool: UpstreamPool, address: tuple[str, int], stats):
        self.pool = pool
        self.address = address
        self.stats = stats  # metrics.AddressStats of the service and address that opened it
        self.status = 0  # of the response being received
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.owner: ExchangeOwner | None = None
        self.exchange: Exchange | None = None  # bound with the owner (HEAD or not, body transform, timeoutServer)
        self.partial = b""  # head bytes from earlier reads, not yet forwarded
        self.view = b""  # partial + the current read, while a head is being parsed
        self.emit_from = 0  # offset in view from which bytes are forwarded raw
        self.scan_from = 0  # offset in view from which to look for the end of a head
        self.in_head = True
        self.keep_alive = False
        self.done = False
        self.responded = False  # any response byte seen for the current exchange
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.last_io = 0.0
        self.extra = False
        self.close_delimited = False
        self.switch_head = b""  # a 101 head: the connection becomes a tunnel after it

    # -- binding to an exchange -------------------------------------------------------
    def bind(self, owner: ExchangeOwner, exchange: Exchange, now: float) -> None:
        self.owner = owner
        self.exchange = exchange
        self.responded = False
        self.close_delimited = False
        self.last_io = now
        self.pool.busy.add(self)

    def close(self) -> None:
        self.owner = self.exchange = None
        self.pool.busy.discard(self)
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.owner = self.exchange = None
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
        self.last_io = clock()
        in_head = self.in_head
        if in_head:
            partial = self.partial
            self.emit_from = 0
            if partial:  # the head began in an earlier read
                self.view = partial + data
                self.scan_from = len(partial) - 3 if len(partial) > 3 else 0
            else:
                self.view = data
                self.scan_from = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if not self.switch_head:
                return self._fail("upgrade without 101")
            if owner.out:
                owner.flush()
            if not owner.start_tunnel(self, self.switch_head, data[exc.args[0] :]):
                self._fail("101 to a request that asked for no upgrade")
            return
        except httptools.HttpParserError as exc:
            if type(exc.__context__) is ResponseRetried:
                return
            if in_head:
                owner.retract_response()  # the head this read completed never went out: 502
            return self._fail(f"invalid response: {exc.__context__ or exc}")
        if self.extra:  # never pass on what follows the end of a response
            if in_head:
                owner.retract_response()  # none of it was written yet: the client gets a 502
            else:
                owner.out.clear()
            return self._fail("data after the end of the response")
        if in_head:
            view = self.view
            self.view = b""  # (no read kept alive by an idle connection)
            if self.in_head:  # the head is not complete yet (or only 1xx heads were)
                self.partial = view[self.emit_from :]
                if len(self.partial) > MAX_RESPONSE_HEAD:
                    return self._fail("response head too large")
                if owner.out:
                    owner.flush()
                return
            if partial:
                self.partial = b""
            emit_from = self.emit_from
            if not emit_from:
                owner.out.append(view)  # the head as received, and what followed it in this read
            elif emit_from < len(view):
                if self.exchange.body_transform is None:
                    owner.out.append(view[emit_from:])
                else:
                    owner.response_body(view[emit_from:])
            if self.exchange.is_head:  # no body follows a response to HEAD, whatever its headers say
                self.parser = httptools.HttpResponseParser(self)
                self.done = True
        elif self.exchange.body_transform is None:
            owner.out.append(data)
        else:
            owner.response_body(data)
        if self.done:
            self._complete(self.keep_alive)
        else:
            owner.flush()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc) -> None:
        self.parser = None  # it holds our bound callbacks: without the cycle we die by refcount
        was_closed = self.closed
        self.closed = True
        self.pool.busy.discard(self)
        owner = self.owner
        if owner is None:
            if not was_closed:
                self.pool.discard(self)
            return
        if self.close_delimited and not self.in_head and exc is None:  # a clean close ends the body
            self.last_io = clock()
            self._complete(False)
            return
        self.owner = self.exchange = None
        # A reset (exc) cuts a close-delimited body short: the client gets a reset too, never a clean end.
        reason = f"upstream reset the connection: {exc}" if exc is not None else "upstream closed the connection"
        owner.response_failed(self, reason, retryable=self.reused and not self.responded)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writable(False)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writable(True)

    # -- httptools callbacks (no per-header or body callback: bytes pass through raw) ----------
    def on_message_begin(self) -> None:
        if not self.in_head:
            self.extra = True

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        view = self.view
        start = self.emit_from
        end = view.find(b"\r\n\r\n", self.scan_from)
        if end < 0:  # llhttp accepted a head we cannot delimit: never forward it
            self.extra = True
            return
        end += 4
        if end - start > MAX_RESPONSE_HEAD:  # (a head that arrived in pieces is checked as they come)
            raise AmbiguousResponse("response head too large")
        head = view[start:end] if start or end < len(view) else view
        self.emit_from = self.scan_from = end
        if status < 200:
            inspect_interim_head(head)
            if status == 101:  # llhttp stops right after this head (HttpParserUpgrade)
                self.switch_head = head
                self.extra = True  # anything but the switch llhttp signals is a broken upstream
            else:
                self.owner.response_interim(head)
            return
        self.in_head = False
        self.status = status
        self.keep_alive = parser.should_keep_alive()  # llhttp resets it when the message ends
        close_delimited, forwardable = inspect_response_head(head)
        if close_delimited and not self.exchange.is_head and status != 204 and status != 304:
            self.close_delimited = True
            self.keep_alive = False
        else:
            close_delimited = False
        if self.owner.response_head(head, forwardable, close_delimited):
            self.emit_from = start  # forwarded unchanged: as part of the raw bytes of this read

    def on_message_complete(self) -> None:
        if not self.in_head:  # (1xx heads complete as messages of their own)
            self.done = True
            self.keep_alive = self.keep_alive and self.parser.should_keep_alive()

    # -- internals -------------------------------------------------------------------
    def _complete(self, reusable: bool) -> None:
        owner = self.owner
        self.owner = self.exchange = None
        self.done = False
        self.in_head = True
        self.pool.busy.discard(self)
        owner.response_complete(self, reusable)

    def _fail(self, reason: str) -> None:
        owner = self.owner
        self.abort()
        if owner is not None:
            owner.response_failed(self, reason, retryable=False)


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
        # address -> (pool, address, stats) -> connection, for addresses that need their own class
        # (balancer.TrackedConnection for task addresses); UpstreamConnection otherwise.
        self.connection_factories: dict[tuple[str, int], Callable] = {}
        self.tls_context = upstream_tls_context()

    def acquire(self, address: tuple[str, int]) -> UpstreamConnection | None:
        conns = self.idle.get(address)
        while conns:
            conn = conns.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                conn.stats.reuses += 1
                return conn
        return None

    async def connect(self, address: tuple[str, int], stats) -> UpstreamConnection:
        """A new connection; raises OSError or asyncio.TimeoutError (after TIMEOUT_CONNECT).

        `stats` (metrics.AddressStats) counts the attempt and tracks the address's health.
        """
        make = self.connection_factories.get(address, UpstreamConnection)
        tls = {"ssl": self.tls_context} if type(address) is TlsAddress else {}
        began = time.perf_counter()  # (the loop's clock ticks in ms: too coarse for a local connect)
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: make(self, address, stats), address[0], address[1], **tls),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            stats.connect_failed(str(exc) or "connect timeout")
            raise
        stats.connected(time.perf_counter() - began)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        conns = self.idle.get(conn.address)
        if conns is None:
            conns = self.idle[conn.address] = []
        if conn.closed or len(conns) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = conn.last_io or clock()  # (the read that completed its last response)
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
