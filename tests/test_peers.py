"""The fan-out client (pyroute/controlplane/peers.py) against real sockets: method, path, query and
body reach every replica, distribute=false replaces distribute=true, and a replica that
refuses, stays silent, or answers garbage is reported with why, not waited on forever."""
from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import httptools
import pytest

from pyroute.controlplane.peers import Peers
from pyroute.resolver import Resolver
from support.upstream import free_port

PEM = b"-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n" * 2000  # ~116 KB, several reads


class Recorder(asyncio.Protocol):
    """A minimal admin stand-in: records each request, answers 200 with its own address."""

    def __init__(self, log, ip, mode):
        self.log, self.ip, self.mode = log, ip, mode
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.body = b"", b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_url(self, url):
        self.url += url

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.log.append((self.ip, self.parser.get_method().decode(), self.url.decode(), self.body))
        if self.mode == "silent":
            return
        if self.mode == "garbage":
            self.transport.write(b"NOT HTTP\r\n\r\n")
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.ip), self.ip.encode()))
        self.transport.close()


async def serve(ips_modes, port, log):
    loop = asyncio.get_running_loop()
    return [await loop.create_server(lambda ip=ip, m=m: Recorder(log, ip, m), ip, port) for ip, m in ips_modes]


def test_fan_out_sends_method_query_and_body_to_every_replica():
    async def main():
        port = free_port("127.0.0.120")
        log = []
        servers = await serve([("127.0.0.120", "ok"), ("127.0.0.121", "ok")], port, log)
        peers = Peers("unused", port, Resolver(("127.0.0.1:9",), 1.0), timeout=2)
        results = await peers.fan_out("PUT", "/v1/docker-flow-proxy/cert", {"certName": "x.pem", "distribute": "true"},
                                      PEM, addresses=("127.0.0.120", "127.0.0.121"))
        for s in servers:
            s.close()
        return results, log

    results, log = asyncio.run(main())
    assert [(r.address, r.status, r.body) for r in results] == [
        ("127.0.0.120", 200, b"127.0.0.120"), ("127.0.0.121", 200, b"127.0.0.121")]
    assert sorted(ip for ip, *_ in log) == ["127.0.0.120", "127.0.0.121"]
    for _, method, target, body in log:
        parts = urlsplit(target)
        assert method == "PUT" and parts.path == "/v1/docker-flow-proxy/cert"
        assert parse_qs(parts.query) == {"certName": ["x.pem"], "distribute": ["false"]}
        assert body == PEM


@pytest.mark.parametrize("mode,why", [("silent", "no answer within"), ("garbage", "")])
def test_a_failing_replica_is_reported_with_why(mode, why):
    async def main():
        port = free_port("127.0.0.122")
        log = []
        servers = await serve([("127.0.0.122", "ok"), ("127.0.0.123", mode)], port, log)
        peers = Peers("unused", port, Resolver(("127.0.0.1:9",), 1.0), timeout=0.5)
        results = await peers.fan_out("GET", "/v1/docker-flow-proxy/remove", {"serviceName": "s"},
                                      addresses=("127.0.0.122", "127.0.0.123", "127.0.0.99"))
        for s in servers:
            s.close()
        return results

    ok, bad, dead = asyncio.run(main())
    assert ok.ok and not bad.ok and not dead.ok
    assert bad.status == 0 and why in bad.error and bad.error
    assert dead.status == 0 and dead.error  # connection refused
