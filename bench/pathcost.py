"""Python cost of one proxied request, without sockets: a steadier number than wrk on a
noisy machine, for iterating on the hot path.

Drives the real ClientConnection and UpstreamConnection with in-memory transports:
one keep-alive client connection, one pooled upstream connection, the request bytes
fed to the client side and the response bytes to the upstream side, N times. What it
leaves out is exactly what it cannot change: the kernel's read/write/epoll.

    python bench/pathcost.py [--requests 200000] [--routes 1] [--response nginx|plain] [--bytecodes]

`--bytecodes`: instead of timing, count the bytecodes each Python function executes per
request (sys.settrace opcode events over 10 requests): the profile that stays the same on
any machine, per function, for finding what the interpreter spends its time on.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
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


def rig(routes: int, response: bytes):
    """One keep-alive client connection and one pooled upstream connection on a table of
    `routes` routes: -> (one, client_transport, upstream_transport), `one()` a whole exchange."""
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
    return one


async def measure(requests: int, routes: int, response: bytes) -> None:
    one = rig(routes, response)
    gc.collect()
    gc.freeze()
    start = time.perf_counter()
    for _ in range(requests):
        one()
    elapsed = time.perf_counter() - start
    print(f"{elapsed / requests * 1e6:.2f} us of Python per request "
          f"({requests} requests, {routes} route(s), {len(response)}-byte response)")


async def count_bytecodes(routes: int, response: bytes, requests: int = 10) -> None:
    one = rig(routes, response)
    counts: dict[tuple[str, str], int] = {}

    def trace(frame, event, arg):
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            key = (frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name)
            counts[key] = counts.get(key, 0) + 1
        return trace

    sys.settrace(trace)
    for _ in range(requests):
        one()
    sys.settrace(None)
    counts = {key: n for key, n in counts.items() if key[0] != "pathcost.py"}  # (the rig's own)
    print(f"{sum(counts.values()) / requests:,.0f} bytecodes per request "
          f"({routes} route(s), {len(response)}-byte response); per function:")
    for (file, name), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{n / requests:7.0f}  {file}:{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--routes", type=int, default=1)
    parser.add_argument("--response", choices=sorted(RESPONSES), default="nginx")
    parser.add_argument("--bytecodes", action="store_true", help="count bytecodes per function instead of timing")
    args = parser.parse_args()
    import uvloop

    if args.bytecodes:
        uvloop.run(count_bytecodes(args.routes, RESPONSES[args.response]))
    else:
        uvloop.run(measure(args.requests, args.routes, RESPONSES[args.response]))


if __name__ == "__main__":
    main()
