"""A byte tunnel between a client and an upstream, after a 101 Switching Protocols.

Once the upstream accepts an Upgrade (WebSocket), HTTP is over on both sockets: each
transport is handed a TunnelEnd protocol that copies bytes to the other side. A full
send buffer on one side pauses reading on the other (backpressure). A half-close is
passed on; when either socket is gone the other is closed once its buffer is written.
Inactivity (TIMEOUT_TUNNEL, or the service's timeoutTunnel) is checked by the server's
tick against `last_io`, like every other timeout.
"""

from __future__ import annotations

import asyncio


class Tunnel:
    """Both ends of one upgraded connection and its inactivity limit."""

    __slots__ = ("client", "upstream", "timeout", "last_io", "loop", "server", "closed", "client_ip")

    def __init__(self, server, timeout: float, client_ip: bytes):
        self.server = server  # proxy.ProxyServer: its `tunnels` set is what the tick checks
        self.client_ip = client_ip  # the client connection's count in the server's ClientLimit
        self.loop = server.loop
        self.timeout = timeout
        self.last_io = self.loop.time()
        self.closed = False
        self.client = TunnelEnd(self)
        self.upstream = TunnelEnd(self)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        server.tunnels.add(self)

    def start(self, client: asyncio.Transport, upstream: asyncio.Transport, to_client: bytes, to_upstream: bytes) -> None:
        """Take over both transports; write what either side sent ahead of the switch."""
        self.client.transport = client
        self.upstream.transport = upstream
        client.set_protocol(self.client)
        upstream.set_protocol(self.upstream)
        if to_client:
            client.write(to_client)
        if to_upstream:
            upstream.write(to_upstream)
        client.resume_reading()
        upstream.resume_reading()

    def check_timeout(self, now: float) -> None:
        if now - self.last_io > self.timeout:
            self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.tunnels.discard(self)
        for end in (self.client, self.upstream):
            if end.transport is not None and not end.transport.is_closing():
                end.transport.abort() if abort else end.transport.close()


class TunnelEnd(asyncio.Protocol):
    """The protocol of one socket of a tunnel: what it reads goes to `peer`."""

    __slots__ = ("tunnel", "transport", "peer", "eof")

    def __init__(self, tunnel: Tunnel):
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.peer: TunnelEnd | None = None
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.tunnel.last_io = self.tunnel.loop.time()
        peer = self.peer.transport
        if not peer.is_closing():  # the other side is gone: the tunnel is closing anyway
            peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer.transport
        if self.peer.eof or not peer.can_write_eof():
            self.tunnel.close()
            return False
        peer.write_eof()
        return True  # keep the socket open: the other direction may still carry data

    def connection_lost(self, exc) -> None:
        if self is self.tunnel.client:
            self.tunnel.server.limit.closed(self.tunnel.client_ip)
        self.tunnel.close()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()
