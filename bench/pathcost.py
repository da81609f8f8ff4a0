"""Python cost of one proxied request, without sockets: a steadier number than wrk on a
noisy machine, for iterating on the hot path.

Drives the real ClientConnection and UpstreamConnection with in-memory transports:
one keep-alive client connection, one pooled upstream connection, the request bytes
fed to the client side and the response bytes to the upstream side, N times. What it
leaves out is exactly what it cannot change: the kernel's read/write/epoll.

    python bench/pathcost.py [--requests 200000] [--routes 1] [--response nginx|plain]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

from pyroute.config import Settings
from pyroute.metrics import DataStats
from pyroute.dataplane.client import ProxyServer
from pyroute.resolver import Resolver
from pyroute.dataplane.routing import RouteTable
from pyroute.services import parse_service
from pyroute.dataplane.upstream import Backend, UpstreamConnection, UpstreamPool

REQUEST = b"GET /demo/hello HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"
RESPONSES = {
    "plain": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\nhello, world!\n",
    "nginx": (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 17:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 14\r\nConnection: keep-alive\r\n\r\nhello, world!\n"
    ),
}


class MemoryTransport:
    """Just enough of asyncio.Transport: counts what is written."""

    def __init__(self, peer=("127.0.0.1", 40000)):
        self.peer = peer
        self.written = 0
        self.writes = 0

    def write(self, data):
        self.written += len(data)
        self.writes += 1

    def writelines(self, chunks):
        for chunk in chunks:
            self.write(chunk)

    def get_extra_info(self, name, default=None):
        return self.peer if name in ("peername", "sockname") else default

    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        raise AssertionError("the benchmark connection must stay open")

    abort = close


async def measure(requests: int, routes: int, response: bytes) -> None:
    loop = asyncio.get_running_loop()
    settings = Settings(default_ports=(), dns_nameservers=("127.0.0.1",))
    resolver = Resolver(("127.0.0.1",), 5.0)
    pool = UpstreamPool(loop, 64, 30.0, 5.0)
    services = [parse_service({"serviceName": f"svc-{i}", "servicePath": f"/svc-{i}/", "port": "8080"})
                for i in range(routes - 1)]
    services.append(parse_service({"serviceName": "go-demo", "servicePath": "/demo", "port": "9000",
                                   "outboundHostname": "127.0.0.1"}))
    stats = DataStats()
    table = RouteTable(services, lambda host, port, service, tls=False: Backend(host, port, resolver), make_stats=stats.service)
    proxy = ProxyServer(settings, loop, pool, table, stats.unrouted)

    client = proxy.factory()
    client_transport = MemoryTransport()
    client.connection_made(client_transport)
    upstream = UpstreamConnection(pool, ("127.0.0.1", 9000), stats.service("go-demo").address(("127.0.0.1", 9000)))
    upstream_transport = MemoryTransport()
    upstream.connection_made(upstream_transport)
    pool.release(upstream)

    def one():
        client.data_received(REQUEST)
        upstream.data_received(response)

    for _ in range(1000):  # warm up, and check the exchange really completes
        one()
    assert client_transport.writes == 1000 and upstream_transport.writes == 1000, "not one write per side"
    gc.collect()
    gc.freeze()
    start = time.perf_counter()
    for _ in range(requests):
        one()
    elapsed = time.perf_counter() - start
    print(f"{elapsed / requests * 1e6:.2f} us of Python per request "
          f"({requests} requests, {routes} route(s), {len(response)}-byte response)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--routes", type=int, default=1)
    parser.add_argument("--response", choices=sorted(RESPONSES), default="nginx")
    args = parser.parse_args()
    import uvloop

    uvloop.run(measure(args.requests, args.routes, RESPONSES[args.response]))


if __name__ == "__main__":
    main()
