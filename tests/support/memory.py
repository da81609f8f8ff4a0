"""The fast protocol tier's rig: pyroute's client protocol driven with bytes, no sockets.

`Rig` builds the real `ProxyServer` (real route table, real features, real pool) on an
event loop of its own and connects clients and upstreams through `MemoryTransport`s that
record what each side was sent. An upstream is a real `UpstreamConnection` placed in the
pool as an idle keep-alive connection, so the proxy takes it on its fast path; the test
plays the upstream by reading what it was sent and feeding response bytes back.
"""
from __future__ import annotations

import asyncio

from pyroute.config import load_settings
from pyroute.dataplane.client import ProxyServer
from pyroute.dataplane.routing import RouteTable
from pyroute.dataplane.upstream import Backend, UpstreamConnection, UpstreamPool
from pyroute.metrics import DataStats
from pyroute.resolver import Resolver
from pyroute.services import parse_service

UPSTREAM = ("127.0.0.1", 9)  # a fixed address: no DNS; nothing is ever dialled


class MemoryTransport(asyncio.Transport):
    """Records writes; remembers close/abort and read pausing, as the protocol asked."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer=("127.0.0.1", 50000)):
        super().__init__()
        self.loop = loop
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.eof_written = False
        self.peer = peer
        self.protocol = None

    def write(self, data) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def take(self) -> bytes:
        """What was written since the last take()."""
        data = bytes(self.written)
        self.written.clear()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_protocol(self):
        return self.protocol

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_extra_info(self, name, default=None):
        return {"peername": self.peer}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0


class Rig:
    """One ProxyServer with the given services, every route to UPSTREAM."""

    def __init__(self, services: list[dict], env: dict | None = None):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        # (REQUEST_ID off: these tests compare exact bytes; test_request_id.py covers the IDs)
        self.settings = load_settings([], {"DNS_NAMESERVERS": "127.0.0.1", "REQUEST_ID": "false", **(env or {})})
        self.resolver = Resolver(self.settings.dns_nameservers, self.settings.dns_ttl_cap, self.settings.dns_timeout)
        s = self.settings
        self.pool = UpstreamPool(self.loop, s.upstream_max_idle, s.upstream_idle_timeout, s.timeout_connect)
        self.stats = DataStats()
        parsed = [parse_service({"outboundHostname": UPSTREAM[0], "port": str(UPSTREAM[1]), **p}) for p in services]
        table = RouteTable(parsed, lambda host, port, service, tls=False: Backend(host, port, self.resolver, tls),
                           1, s.longest_match, self.stats.service)
        self.server = ProxyServer(s, self.loop, self.pool, table, self.stats.unrouted)
        self.limit = self.server.limit

    def close(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        asyncio.set_event_loop(None)

    def settle(self) -> None:
        """Run the callbacks the last step scheduled (connection_lost after a close)."""
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    def client(self) -> Client:
        conn = self.server.factory()
        transport = MemoryTransport(self.loop)
        transport.protocol = conn
        conn.connection_made(transport)
        return Client(self, conn, transport)

    def idle_upstream(self) -> Upstream:
        """An open keep-alive connection to UPSTREAM waiting in the pool."""
        conn = UpstreamConnection(self.pool, UPSTREAM, self.stats.service("rig").address(UPSTREAM))
        transport = MemoryTransport(self.loop, UPSTREAM)
        transport.protocol = conn
        conn.connection_made(transport)
        self.pool.release(conn)
        upstream = Upstream(self, conn, transport)
        return upstream


class Client:
    def __init__(self, rig: Rig, conn, transport: MemoryTransport):
        self.rig, self.conn, self.transport = rig, conn, transport

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)
        self.rig.settle()

    def received(self) -> bytes:
        return self.transport.take()


class Upstream:
    def __init__(self, rig: Rig, conn: UpstreamConnection, transport: MemoryTransport):
        self.rig, self.conn, self.transport = rig, conn, transport

    def received(self) -> bytes:
        return self.transport.take()

    def reply(self, data: bytes) -> None:
        self.conn.data_received(data)
        self.rig.settle()

    def hang_up(self) -> None:
        """The upstream closes its side (EOF then connection_lost)."""
        self.transport.closed = True
        self.conn.eof_received()
        self.conn.connection_lost(None)
        self.rig.settle()
