"""Byte tunnels: after a 101 Switching Protocols, and every reqMode=tcp/sni connection.

A Tunnel is two TunnelEnd protocols, one per socket, each writing what it reads to the
other. It starts one of two ways:

- ``take_over``: an HTTP client connection whose upstream answered 101 (WebSocket) hands
  both transports over, with the bytes either side sent ahead of the switch;
- from accept (l4.py's listeners, or a TLS port's acceptor for an sni name): the client
  end is the accepted socket's protocol; the tunnel picks its target from the l4 ``Port``
  (tcp: at once; sni: from the ClientHello, which is kept and sent on), then connects to
  it within the target's connect timeout. Client bytes are buffered meanwhile (reading
  pauses past MAX_PENDING). A target that cannot be reached closes only this connection.

Either way: a full send buffer on one side pauses reading on the other (flow.PEER_FULL);
a half-close is passed on, and when either socket is gone the other is closed once its
buffer is written. The client socket counts in the process's ClientLimit (MAXCONN,
MAXCONN_PER_IP) from accept to close: an upgraded connection was counted by its
ClientConnection, a tcp/sni one is counted here. Timeouts are stamps checked by the data
plane's tick: the first bytes (sni) within the port's timeoutClient, the connect within
the target's connect timeout, then TIMEOUT_TUNNEL (or timeoutTunnel) without a byte
either way.
"""

from __future__ import annotations

import asyncio
import logging

from pyroute.dataplane.clock import clock
from pyroute.dataplane.flow import ReadPauses

log = logging.getLogger("pyroute.dataplane.tunnel")

MAX_PENDING = 256 * 1024  # client bytes buffered while the upstream connection opens
PENDING_FULL = 2  # a TunnelEnd's read-pause reason: MAX_PENDING bytes wait for the upstream


class NoTarget(Exception):
    """The connection's first bytes pick no target (not TLS, no sni service for the name);
    `reply`: bytes the client gets before the close (a TLS alert)."""

    def __init__(self, why: str, reply: bytes = b""):
        super().__init__(why)
        self.reply = reply


class Tunnel:
    """Both ends of one tunnel, its deadline and its place in the ClientLimit."""

    __slots__ = ("tunnels", "limit", "loop", "client_ip", "client", "upstream", "port", "target",
                 "timeout", "started", "connected", "counted", "closed", "pending", "pending_size")

    def __init__(self, tunnels: set, limit, loop: asyncio.AbstractEventLoop, port=None, client_ip: bytes = b""):
        self.tunnels = tunnels  # the set the tick checks and a drain closes
        self.limit = limit  # the process's ClientLimit
        self.loop = loop
        self.client_ip = client_ip  # a PROXY header's address, else the peer's (set on accept)
        self.port = port  # l4.Port: picks the target of a tcp/sni connection; None after a 101
        self.target = None  # l4.Target, once picked
        self.client = TunnelEnd(self)
        self.upstream = TunnelEnd(self)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.timeout = 0.0  # of the current phase: first bytes, connect, then inactivity
        self.started = clock()  # when the current phase began (until connected)
        self.connected = False
        self.counted = False  # holds one place in `limit`, given back when the client socket closes
        self.closed = False
        self.pending: list[bytes] = []  # client bytes waiting for the upstream connection
        self.pending_size = 0

    # -- starting ---------------------------------------------------------------------------------
    def take_over(self, client_ip: bytes, client: asyncio.Transport, upstream: asyncio.Transport,
                  to_client: bytes, to_upstream: bytes, timeout: float) -> None:
        """After a 101: take both transports (the client's place in the limit with them) and
        write what either side sent ahead of the switch."""
        self.client_ip = client_ip
        self.counted = True
        self.tunnels.add(self)
        self._established(timeout)
        self.client.attach(client)
        self.upstream.attach(upstream)
        client.set_protocol(self.client)
        upstream.set_protocol(self.upstream)
        if to_client:
            client.write(to_client)
        if to_upstream:
            upstream.write(to_upstream)
        client.resume_reading()
        upstream.resume_reading()

    def accepted(self, transport: asyncio.Transport) -> None:
        """A tcp/sni client connection: count it, then wait for its target (sni) or open it (tcp)."""
        self.client.attach(transport)
        port = self.port
        if port is None:  # accepted just as its service went away
            return self.close()
        if not self.client_ip:
            peer = transport.get_extra_info("peername")
            self.client_ip = peer[0].encode() if peer else b"unknown"
        if not self.limit.opened(self.client_ip):
            log.info("refusing a connection from %s: MAXCONN_PER_IP reached", self.client_ip.decode())
            return self.close(abort=True)
        self.counted = True
        self.tunnels.add(self)
        self.timeout = port.timeout_client
        self._first_bytes(b"")

    def _first_bytes(self, data: bytes) -> None:
        """Client bytes before the upstream is connected: kept for it; the first ones pick the target."""
        if data:
            self.pending.append(data)
            self.pending_size += len(data)
        if self.target is None:
            try:
                target = self.port.pick(b"".join(self.pending))
            except NoTarget as exc:
                if exc.reply:
                    self.client.transport.write(exc.reply)
                return self._give_up(str(exc))
            if target is not None:
                self.target = target
                self.started = clock()
                self.timeout = target.timeout_connect
                self.loop.create_task(self._connect(target))
        elif self.pending_size > MAX_PENDING:
            self.client._pause(PENDING_FULL)

    async def _connect(self, target) -> None:
        backend = target.backend
        try:
            address = backend.address() or await backend.resolve()
            transport, _ = await asyncio.wait_for(
                self.loop.create_connection(lambda: self.upstream, *address), target.timeout_connect)
        except Exception as exc:  # resolve errors, refusals, timeouts: this connection only
            return self._give_up(f"{target.service}: cannot connect: {exc or 'timeout'}")
        if self.closed:
            transport.close()
            return
        self._established(target.timeout_tunnel)
        if self.pending:
            transport.writelines(self.pending)
            self.pending = []
            self.pending_size = 0
        self.client._resume(PENDING_FULL)

    def _established(self, timeout: float) -> None:
        self.connected = True
        self.timeout = timeout
        self.client.last_io = self.upstream.last_io = clock()

    def _give_up(self, why: str) -> None:
        if not self.closed:
            log.info("closing %s connection: %s", self.port.mode, why)
            self.close()

    # -- ending -----------------------------------------------------------------------------------
    def check_timeout(self, now: float) -> None:
        """Called by the tick: the current phase's deadline (inactivity once connected)."""
        since = max(self.client.last_io, self.upstream.last_io) if self.connected else self.started
        if now - since > self.timeout and not self.closed:
            self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        """Close both sockets (each once its buffer is written, unless `abort`)."""
        if self.closed:
            return
        self.closed = True
        self.tunnels.discard(self)
        for end in (self.client, self.upstream):
            end.closed = True
            transport = end.transport
            if transport is not None and not transport.is_closing():
                transport.abort() if abort else transport.close()

    def client_gone(self) -> None:
        if self.counted:
            self.counted = False
            self.limit.closed(self.client_ip)
        self.close()


class TunnelEnd(ReadPauses, asyncio.Protocol):
    """The protocol of one socket of a tunnel: what it reads goes to `peer`."""

    __slots__ = ("tunnel", "loop", "transport", "peer", "paused", "closed", "last_io", "eof")

    def __init__(self, tunnel: Tunnel):
        self.tunnel = tunnel
        self.loop = tunnel.loop
        self.transport: asyncio.Transport | None = None
        self.peer: TunnelEnd | None = None
        self.paused = 0  # flow.ReadPauses reasons
        self.closed = True  # until it has a transport
        self.last_io = 0.0
        self.eof = False

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.closed = self.tunnel.closed

    def connection_made(self, transport) -> None:
        if self is self.tunnel.client:
            self.tunnel.accepted(transport)
        else:
            self.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.last_io = clock()
        peer = self.peer.transport
        if peer is None:  # a tcp/sni client before its upstream connection is open
            return self.tunnel._first_bytes(data)
        if not peer.is_closing():  # the other side is gone: the tunnel is closing anyway
            peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer.transport
        if self.peer.eof or peer is None or not peer.can_write_eof():
            self.tunnel.close()
            return False
        peer.write_eof()
        return True  # keep the socket open: the other direction may still carry data

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self is self.tunnel.client:
            self.tunnel.client_gone()
        else:
            self.tunnel.close()

    def pause_writing(self) -> None:
        self.peer.peer_writable(False)

    def resume_writing(self) -> None:
        self.peer.peer_writable(True)
